"""The command line: parse, call one core function per verb, render. No logic lives here."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vidcap import __version__, captioner, config, dryrun, options, remote, tunnel
from vidcap.cli_common import ConfigOpt, ProfileOpt, _debug, _fail, err, out, profile_name
from vidcap.cli_doctor import doctor
from vidcap.cli_jobs import job_app
from vidcap.cli_report import report_cmd
from vidcap.cli_sync import sync
from vidcap.errors import ConfigError, UsageError, VidcapError

app = typer.Typer(
    help="Caption whole directories of videos with Qwen3-Omni served by vLLM, and bring the captions home.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Create, show and check config.toml.", no_args_is_help=True)
app.add_typer(config_app, name="config")
tunnel_app = typer.Typer(
    help="Keep SSH tunnels to the GPU node's servers up in the background.", no_args_is_help=True
)
app.add_typer(tunnel_app, name="tunnel")
app.add_typer(job_app, name="job")
app.command("sync")(sync)
app.command("report")(report_cmd)
app.command("doctor")(doctor)
files_app = typer.Typer(help="The file server that runs next to vLLM on the GPU node.", no_args_is_help=True)
app.add_typer(files_app, name="files")


@app.callback(invoke_without_command=True)
def _main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    _debug["on"] = debug
    if version:
        out.print(f"vidcap {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help())
        raise typer.Exit(2)


# -- config -------------------------------------------------------------------------------------------


@config_app.command("init")
def config_init(
    path: Path | None = typer.Option(None, "--path", help="Where to write (default: the user config dir)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented example config to edit."""
    target = path or config.user_config_dir() / "config.toml"
    if target.exists() and not force:
        _fail(UsageError(f"{target} exists; edit it, or pass --force to overwrite"))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(config.example_text(), encoding="utf-8")
    err.print(f"wrote {target}; edit the profile, then run 'vidcap config check'")


@config_app.command("show")
def config_show(config_path: Path | None = ConfigOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the effective configuration (file values over defaults)."""
    try:
        cfg, path = config.load(config_path)
    except VidcapError as exc:
        _fail(exc)
    data = cfg.model_dump(mode="json")
    if as_json:
        out.print_json(data=data)
        return
    err.print(f"# from {path or 'built-in defaults (no config file found)'}")
    out.print_json(data=data)


@config_app.command("check")
def config_check(config_path: Path | None = ConfigOpt) -> None:
    """Validate the config file; exit 2 with the offending key when it is wrong."""
    try:
        cfg, path = config.load(config_path)
    except VidcapError as exc:
        _fail(exc)
    names = ", ".join(sorted(cfg.profiles))
    out.print(f"ok: {path or 'built-in defaults'} (profiles: {names}; default: {cfg.default_profile})")


# -- caption ------------------------------------------------------------------------------------------


@app.command()
def caption(
    source: str = typer.Argument(
        ..., help="Directory of videos (local path; PROFILE:PATH for a cluster path)."
    ),
    out_dir: Path | None = typer.Option(
        None, "--out", "-o", help="Output root (default: captions/<model tag>)."
    ),
    server: list[str] | None = typer.Option(
        None,
        "--server",
        help="OpenAI-compatible URL, e.g. http://host:8000/v1. Repeat it for replicas of the same model: "
        "requests are spread over them (--concurrency on each).",
    ),
    model: str | None = typer.Option(
        None, "--model", help="Served model name (default: the first the server lists)."
    ),
    prompt: str | None = typer.Option(None, "--prompt", help="Prompt text, or @FILE to read it from a file."),
    concurrency: int | None = typer.Option(None, "--concurrency", "-c", min=1, help="Requests in flight."),
    media: str | None = typer.Option(None, "--media", help="file | http | inline: how video reaches vLLM."),
    audio: str | None = typer.Option(None, "--audio", help="auto | on | off: send the audio track."),
    window: float | None = typer.Option(None, "--window", min=1.0, help="Force windows of S seconds."),
    force: bool = typer.Option(False, "--force", help="Redo videos that already have a record."),
    shard: str | None = typer.Option(None, "--shard", help="i/N: caption only shard i of N (by path hash)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Caption at most N videos this run."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (windows, tokens); send nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout."),
    api_key_file: Path | None = typer.Option(None, "--api-key-file", help="File holding the server API key."),
    job_id: str | None = typer.Option(
        None, "--job", help="For PROFILE:PATH: use this job's servers (default: the profile's running job)."
    ),
    profile: str | None = ProfileOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """Caption every video under SOURCE that has no up-to-date record; resumable, one JSON per video.

    Exit codes: 0 all done, 1 some videos failed (see OUT/_vidcap/failures*.jsonl), 2 usage or config
    error, 3 cannot reach the server, 130 interrupted.
    """
    try:
        cfg, _ = config.load(config_path)
        settings = options.Settings(
            source=source,
            out=out_dir,
            server=server,
            model=model,
            prompt=prompt,
            concurrency=concurrency,
            media=media,
            audio=audio,
            window=window,
            force=force,
            shard=shard,
            limit=limit,
            api_key_file=api_key_file,
            profile=profile,
        )
        resolved = options.resolve(cfg, settings)
        job, endpoint = resolved.job, resolved.endpoint
        if dry_run:

            def warn(message: str) -> None:
                err.print(f"[yellow]warning[/] {escape(message)}", highlight=False, soft_wrap=True)

            if resolved.remote:
                rows = asyncio.run(remote.plan(cfg, job, *resolved.remote, config_path, job_id, warn))
            else:
                rows = asyncio.run(dryrun.dry_run(job, None, endpoint, warn))
            _render_plan(rows, as_json)
            return
        with ProgressView(err) as progress:
            if resolved.remote:
                run = remote.caption(cfg, job, *resolved.remote, config_path, progress.handle, job_id)
            else:
                assert endpoint is not None
                run = captioner.run(job, resolved.endpoints or endpoint, progress.handle)
            summary = asyncio.run(run)
    except VidcapError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if as_json:
        print(summary.model_dump_json(by_alias=True, indent=2))
    else:
        _render_summary(summary)
    if summary.aborted:
        err.print(f"[bold red]stopped[/]: {summary.aborted}", highlight=False)
    raise typer.Exit(summary.exit_code or 0)


def _render_plan(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    table = Table(title="vidcap plan (nothing sent)")
    for col in ("video", "duration", "audio", "requests", "window", "fps", "frame", "est. tokens", "note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["path"],
            f"{r.get('duration_s', 0):.1f}s",
            str(r.get("audio", "")),
            str(r.get("requests", "")),
            f"{r['window_s']:.1f}s" if r.get("window_s") else "-",
            str(r.get("fps", "")),
            r.get("frame", ""),
            str(r.get("est_tokens", "")),
            r.get("note", ""),
        )
    out.print(table)
    total = sum(r.get("est_tokens", 0) for r in rows)
    reqs = sum(r.get("requests", 0) for r in rows)
    out.print(f"{len(rows)} videos, {reqs} requests, ~{total} prompt tokens of media")


def _render_summary(summary: Any) -> None:
    c = summary.counts
    rate = c.done / summary.wall_s if summary.wall_s else 0.0
    err.print(
        f"done {c.done}, skipped {c.skipped}, failed {c.failed} of {c.seen} videos in {summary.wall_s:.1f}s "
        f"({rate:.2f}/s); {c.requests} requests, {c.retried_requests} retried; "
        f"tokens {summary.usage.prompt_tokens}+{summary.usage.completion_tokens}; out: {summary.out}",
        highlight=False,
    )
    if c.failed:
        err.print(f"failures: {_ledger(summary)} (or 'vidcap report {summary.out}')")


def _ledger(summary: Any) -> Path:
    """The failure ledger the run wrote to (one per shard: see vidcap.store)."""
    from vidcap.discovery import parse_shard
    from vidcap.store import META, ledger_name

    return Path(summary.out) / META / ledger_name(parse_shard(summary.shard))


class ProgressView:
    """Renders pipeline events: a live bar on a terminal, a plain line every 10 s otherwise (cron, logs).
    Failures and warnings always get a line of their own."""

    def __init__(self, console: Console, interval: float = 10.0) -> None:
        self.console, self.interval = console, interval
        self.live = console.is_terminal
        self.counts = {"done": 0, "failed": 0, "skipped": 0, "seen": 0}
        self.total: float | None = None
        self.t0 = time.monotonic()
        self.last = self.t0
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressView:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]captioning"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("captioning", total=None, stats="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def _stats(self) -> str:
        c = self.counts
        rate = c["done"] / max(1e-9, time.monotonic() - self.t0)
        return f"done {c['done']} skipped {c['skipped']} failed {c['failed']} {rate:.2f} videos/s"

    def handle(self, event: captioner.Event) -> None:
        kind = event.kind
        if kind == "discovered":
            self.counts["seen"] += 1
        elif kind in ("done", "failed", "skipped"):
            self.counts[kind] += 1
        elif kind == "total":
            self.total = event.value
        if kind == "failed":
            self.console.print(f"[red]failed[/] {event.rel!r}: {event.message}", highlight=False)
        elif kind == "warning":
            where = f"{event.rel!r}: " if event.rel else ""
            self.console.print(f"[yellow]warning[/] {where}{event.message}", highlight=False)
        elif kind == "start":
            self.console.print(f"vidcap {__version__}: {event.message}", highlight=False)
        if self._bar is not None:
            finished = self.counts["done"] + self.counts["failed"] + self.counts["skipped"]
            self._bar.update(self._task, completed=finished, total=self.total, stats=self._stats())
        elif time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            self.console.print(f"vidcap: {self._stats()}", highlight=False)


# -- tunnel -------------------------------------------------------------------------------------------


@tunnel_app.command("up")
def tunnel_up(
    job_id: str | None = typer.Option(None, "--job", help="Tunnel to this job (default: the running one)."),
    profile: str | None = ProfileOpt,
    config_path: Path | None = ConfigOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Forward localhost ports to the vLLM and file server of the profile's running job (found on the
    cluster), in a background process that reconnects by itself. Idempotent: a tunnel that is already up
    to the same servers is left as it is; one to an earlier job is replaced."""
    try:
        cfg, path = config.load(config_path)
        name = profile_name(cfg, profile)
        located = remote.locate_over_ssh(cfg, name, job_id)
        state = tunnel.up(name, located.targets, path, replace=True)
    except VidcapError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps({**state, "job_id": located.job_id}, indent=2))
        return
    if state.get("replaced"):
        err.print("the tunnel pointed at other servers (an earlier job); replaced it", highlight=False)
    if located.job_id:
        err.print(f"job {located.job_id}", highlight=False)
    for spec in state["targets"]:
        t = tunnel.Target.parse(spec)
        err.print(f"{t.name}: localhost:{t.local_port} -> {t.remote_host}:{t.remote_port}", highlight=False)
    err.print(f"tunnel {name!r} up (pid {state['pid']}); 'vidcap tunnel down -p {name}' to stop it")


@tunnel_app.command("down")
def tunnel_down(profile: str | None = ProfileOpt, config_path: Path | None = ConfigOpt) -> None:
    """Stop the profile's tunnel process; no process or state is left behind."""
    try:
        cfg, _ = config.load(config_path)
        name = profile_name(cfg, profile)
    except VidcapError as exc:
        _fail(exc)
    err.print(f"tunnel {name!r} " + ("stopped" if tunnel.down(name) else "was not up"))


@tunnel_app.command("status")
def tunnel_status(
    profile: str | None = ProfileOpt,
    config_path: Path | None = ConfigOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Up or down, since when, reconnects, and whether each forward answers (vLLM /health)."""
    try:
        cfg, _ = config.load(config_path)
        names = [profile_name(cfg, profile)] if profile else sorted(cfg.profiles)
    except VidcapError as exc:
        _fail(exc)
    rows = tunnel.status(names)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="vidcap tunnels")
    for col in ("profile", "status", "since", "reconnects", "forwards", "checks"):
        table.add_column(col)
    for r in rows:
        forwards = "\n".join(
            f"{t.name} :{t.local_port} -> {t.remote_host}:{t.remote_port}"
            for t in map(tunnel.Target.parse, r.get("targets", []))
        )
        checks = " ".join(f"{k}={v}" for k, v in r.get("checks", {}).items())
        colour = {"up": "green", "down": "red"}.get(r["status"], "yellow")
        table.add_row(
            r["profile"],
            f"[{colour}]{r['status']}[/]",
            r.get("since", ""),
            str(r.get("reconnects", "")),
            forwards,
            checks,
        )
    out.print(table)


# -- files ----------------------------------------------------------------------------------------------


@files_app.command("serve")
def files_serve(
    directory: Path = typer.Argument(..., help="Root to serve: nothing outside it is reachable."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback unless told otherwise)."),
    port: int = typer.Option(0, "--port", help="Port; 0 picks a free one (see --port-file)."),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="Token file (created 0600 if missing)."
    ),
    port_file: Path | None = typer.Option(None, "--port-file", help="Write the bound port here."),
) -> None:
    """Serve listings, probes, byte ranges, audio spans and frames of DIR to vidcap and vLLM; every URL
    carries the token. Runs until SIGTERM/SIGINT."""
    from vidcap import fileserver

    if not directory.is_dir():
        _fail(UsageError(f"{directory} is not a directory"))
    token = fileserver.load_or_create_token(token_file)

    def ready(bound: int) -> None:
        err.print(f"vidcap file server on {host}:{bound}, root {directory.resolve()}", highlight=False)

    fileserver.serve(directory, host=host, port=port, token=token, port_file=port_file, ready=ready)


def main() -> None:
    try:
        app()
    except ConfigError as exc:  # pragma: no cover - commands catch their own
        _fail(exc)


if __name__ == "__main__":
    sys.exit(main())
