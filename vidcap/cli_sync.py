"""`vidcap sync`: wiring between the command line and vidcap.sync."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import typer
from rich.markup import escape

from vidcap import config
from vidcap import sync as core
from vidcap.cli_common import ConfigOpt, ProfileOpt, _fail, err, out, profile_name
from vidcap.errors import ConfigError, UsageError, VidcapError


def sync(
    to: Path = typer.Option(
        Path("captions"),
        "--to",
        help="Local directory that receives the contents of the profile's paths.captions_dir.",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="List what would be transferred; change nothing. With --install-cron: print the line only.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary (files, bytes) on stdout."),
    bwlimit: int | None = typer.Option(None, "--bwlimit", min=1, help="Limit the transfer to N KiB/s."),
    install_cron: str | None = typer.Option(
        None,
        "--install-cron",
        metavar="SCHEDULE",
        help='Add a crontab line that runs this sync, e.g. "*/15 * * * *" (--remove-cron removes it).',
    ),
    remove_cron: bool = typer.Option(False, "--remove-cron", help="Remove the profile's crontab line."),
    profile: str | None = ProfileOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """Bring the cluster's captions home: rsync from the profile's paths.captions_dir over its SSH
    settings into --to (default ./captions). Never deletes local files; a newer local file is kept; an
    interrupted transfer resumes. Quiet unless on a terminal; one sync per profile at a time (a second
    one exits 0 at once with a note).

    Exit codes: 0 synced or nothing to do, 1 some files not transferred, 2 usage or config error (also
    when captions_dir is missing on the cluster), 3 cannot reach the cluster, 130 interrupted.
    """
    try:
        if install_cron is not None and remove_cron:
            raise UsageError("--install-cron and --remove-cron do not go together")
        cfg, path = config.load(config_path)
        name = profile_name(cfg, profile)
        if remove_cron:
            _remove(name, as_json)
            return
        if not cfg.profile(name).ssh.host:
            raise ConfigError(
                f"profile {name!r} has no ssh.host: vidcap sync pulls paths.captions_dir from a cluster"
            )
        if install_cron is not None:
            _install(install_cron, name, to, path, dry_run, as_json)
            return
        result = _sync(cfg, name, to, dry_run, bwlimit, as_json)
    except VidcapError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if as_json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def _sync(
    cfg: config.Config, name: str, to: Path, dry_run: bool, bwlimit: int | None, as_json: bool
) -> core.SyncResult:
    live = err.is_terminal and not as_json
    spin = err.status("vidcap sync: connecting") if live and not dry_run else None
    seen = {"files": 0, "bytes": 0}

    def on_file(rel: str, size: int) -> None:
        seen["files"] += 1
        seen["bytes"] += size
        if dry_run and not as_json:
            print(rel, flush=False)
        elif spin is not None:
            spin.update(escape(f"vidcap sync: {seen['files']} files, {_size(seen['bytes'])}: {rel}"))

    with spin if spin is not None else contextlib.nullcontext():
        result = core.run(cfg, name, to, dry_run=dry_run, bwlimit=bwlimit, on_file=on_file)
    for note in result.notes:
        err.print(f"[yellow]note[/]: {escape(note)}", highlight=False, soft_wrap=True)
    if result.status == "locked":
        err.print(result.message, highlight=False, markup=False, soft_wrap=True)
    elif result.status == "partial":
        err.print(f"[bold red]SyncError[/]: {escape(result.message)}", highlight=False, soft_wrap=True)
    elif dry_run and not as_json:
        what = f"{result.files} files ({_size(result.bytes)})"
        err.print(
            f"would transfer {what} from {result.source} to {result.dest}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    elif live:
        what = f"{result.files} files ({_size(result.bytes)})" if result.files else "nothing new"
        err.print(
            f"synced {what} from {result.source} to {result.dest} in {result.seconds:.1f}s",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    return result


def _install(schedule: str, name: str, to: Path, path: Path | None, dry_run: bool, as_json: bool) -> None:
    line = core.cron_entry(schedule, name, to, path)
    action = "dry-run" if dry_run else core.install_cron(line, name)
    log = str(core.log_path(name))
    if as_json:
        print(json.dumps({"action": action, "line": line, "log": log}, indent=2, ensure_ascii=False))
        return
    if dry_run:
        out.print(line, highlight=False, markup=False, soft_wrap=True)
        return
    said = {"added": "added a", "replaced": "replaced the", "unchanged": "already had the"}[action]
    err.print(
        f"{said} crontab line for profile {name} (log: {log}):", markup=False, highlight=False, soft_wrap=True
    )
    out.print(line, highlight=False, markup=False, soft_wrap=True)


def _remove(name: str, as_json: bool) -> None:
    removed = core.remove_cron(name)
    if as_json:
        print(json.dumps({"removed": removed}))
        return
    err.print(
        f"removed the crontab line for profile {name}" if removed else f"no crontab line for profile {name}",
        highlight=False,
        soft_wrap=True,
    )


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
