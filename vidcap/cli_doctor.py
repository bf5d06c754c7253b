"""`vidcap doctor`: wiring between the command line and vidcap.doctor."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from vidcap import doctor as checks
from vidcap.cli_common import ConfigOpt, ProfileOpt, err, out

_COLOURS = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the rows as a JSON list on stdout."),
    profile: str | None = ProfileOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """Check both ends: config, SSH and host key, vidcap and vLLM in the job's environment, the partition
    and its GPUs (sinfo), running jobs, the tunnel, and the server's /health and model.

    Every failing row says how to fix it. Exit 0 when no row fails (warnings allowed), 1 otherwise.
    """
    spin = err.status("vidcap doctor: checking") if err.is_terminal and not as_json else None
    with spin or contextlib.nullcontext():
        rows = checks.diagnose(config_path, profile)
    if as_json:
        print(json.dumps([r.to_dict() for r in rows], indent=2, ensure_ascii=False))
    else:
        table = Table(title="vidcap doctor", show_lines=True)
        for col in ("check", "status", "detail", "fix"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(
                r.name,
                f"[{_COLOURS[r.status]}]{r.status}[/]",
                escape(r.detail),
                escape(r.fix or ""),
            )
        out.print(table)
    raise typer.Exit(1 if checks.failed(rows) else 0)
