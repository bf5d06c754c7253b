"""What every CLI module shares: the consoles, the common options, and turning an error into an exit."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from vidcap import config
from vidcap.errors import VidcapError

err = Console(stderr=True)
out = Console()
_debug = {"on": False}

ConfigOpt = typer.Option(None, "--config", help="Config file (default: ./vidcap.toml, then the user config).")
ProfileOpt = typer.Option(
    None, "--profile", "-p", help="Profile to use (default: the config's default_profile)."
)


def _fail(exc: BaseException) -> None:
    if _debug["on"]:
        err.print_exception()
    code = exc.exit_code if isinstance(exc, VidcapError) else 1
    # escape: rsync's "[sender]", an IPv6 "[::1]" or a path with brackets are text, not rich markup
    err.print(f"[bold red]{type(exc).__name__}[/]: {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def profile_name(cfg: config.Config, profile: str | None) -> str:
    """The profile a command acts on (checked to exist)."""
    name = profile or cfg.default_profile
    cfg.profile(name)
    return name
