"""`vidcap job ...`: wiring between the command line and vidcap.jobs."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.table import Table

from vidcap import config, jobs, oncluster, tunnel
from vidcap.cli_common import ConfigOpt, ProfileOpt, _fail, err, out, profile_name
from vidcap.errors import UsageError, VidcapError
from vidcap.slurm_parse import JobStatus

job_app = typer.Typer(
    help="Run the model server as a Slurm job (or a local process), or a captioning job next to it: submit, "
    "wait, status, logs, cancel, resubmit.",
    no_args_is_help=True,
)

JobArg = typer.Argument(None, help="Job id (default: the newest job vidcap submitted for the profile).")
LocalOpt = typer.Option(False, "--local", help="The local executor: the job script as a local process.")
JsonOpt = typer.Option(False, "--json", help="Print JSON on stdout.")


@contextlib.contextmanager
def _executor(config_path: Path | None, profile: str | None, local: bool) -> Iterator[tuple]:
    cfg, _ = config.load(config_path)
    name = profile_name(cfg, profile)
    ex = jobs.open_executor(cfg.profile(name), local)
    try:
        yield cfg, name, ex
    finally:
        ex.close()


def _status_dict(rec: jobs.JobRecord, status: JobStatus) -> dict:
    return {
        "id": rec.id,
        "profile": rec.profile,
        "model": rec.model,
        "executor": rec.executor,
        "state": status.state.value,
        "reason": status.reason,
        "node": status.node,
        "start": status.start,
        "elapsed": status.elapsed,
        "exit_code": status.exit_code,
        "describe": status.describe(),
        "log": rec.log,
        "job_dir": rec.job_dir,
        "submitted": rec.submitted,
    }


@job_app.command("submit")
def job_submit(
    local: bool = LocalOpt,
    new: bool = typer.Option(False, "--new", help="Submit even when a healthy job already serves the model."),
    time_limit: str | None = typer.Option(None, "--time", help="Time limit (overrides job.time)."),
    partition: str | None = typer.Option(None, "--partition", help="Partition (overrides job.partition)."),
    wait: bool = typer.Option(False, "--wait", help="Then wait until the server is ready (like 'job wait')."),
    timeout: float = typer.Option(3600.0, "--timeout", help="With --wait: give up after this many seconds."),
    caption: str | None = typer.Option(
        None,
        "--caption",
        help="Caption this cluster dir (PATH or PROFILE:PATH, under paths.videos_dir) inside the job, into "
        "paths.captions_dir/<model tag>; the job ends when captioning ends.",
    ),
    shards: int = typer.Option(
        1, "--shards", min=1, help="With --caption: a Slurm array of N jobs, task i captioning shard i/N."
    ),
    keep_server: bool = typer.Option(
        False, "--keep-server", help="With --caption: keep serving after captioning (until --time or cancel)."
    ),
    replicas: int = typer.Option(
        1,
        "--replicas",
        min=1,
        help="A Slurm array of N servers of the model: 'vidcap caption PROFILE:PATH' spreads its requests "
        "over every ready one.",
    ),
    as_json: bool = JsonOpt,
    profile: str | None = ProfileOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """Submit the job that serves the profile's model (vLLM + the file server on one GPU node).

    A healthy vidcap job serving the same model for this profile is reused unless --new. With --caption
    the job also captions a cluster directory itself (no laptop in the loop); follow it with
    'vidcap job status JOB', bring the captions home with 'vidcap sync'.
    """
    try:
        if caption is None and (shards > 1 or keep_server):
            raise UsageError("--shards and --keep-server go with --caption PATH")
        if caption is not None and replicas > 1:
            raise UsageError("--replicas serves the laptop's runs; a captioning job scales with --shards")
        with _executor(config_path, profile, local) as (cfg, name, ex):
            if caption is not None:
                done = oncluster.submit(
                    ex,
                    cfg,
                    name,
                    caption,
                    shards=shards,
                    keep_server=keep_server,
                    time_limit=time_limit,
                    partition=partition,
                )
                wait = False  # a captioning job is followed with job status / job wait --done
            elif replicas > 1:
                done = jobs.submit_replicas(
                    ex, cfg, name, replicas, time_limit=time_limit, partition=partition
                )
            else:
                done = jobs.submit(ex, cfg, name, new=new, time_limit=time_limit, partition=partition)
            rec = done.record
            result = {"id": rec.id, "reused": done.reused is not None, "record": rec.to_dict()}
            if done.reused is not None:
                err.print(
                    f"job {rec.id} already serves {rec.model} on {done.reused.node} (healthy): reusing it; "
                    "--new submits another",
                    highlight=False,
                )
            else:
                err.print(
                    f"submitted job {rec.id} ({rec.preset}: {rec.model}, {ex.kind}); log {rec.log}",
                    highlight=False,
                )
            if wait and done.reused is None:
                eps = jobs.wait_all_ready(
                    ex, rec, cfg.profile(name).paths.work_dir, timeout=timeout, **_reporter()
                )
                result["endpoint"] = eps[0].to_dict()
                if len(eps) > 1:
                    result["endpoints"] = [ep.to_dict() for ep in eps]
                _ready_note(eps, ex.kind)
            elif rec.caption is not None:
                what = f"{rec.shards} shards of " if rec.array_size > 1 else ""
                err.print(
                    f"captioning {what}{rec.caption['path']} into {rec.caption['out']} on the cluster; "
                    f"next: vidcap job status {rec.id}, vidcap job wait {rec.id} --done, vidcap sync",
                    highlight=False,
                )
            elif not wait and done.reused is None:
                err.print(f"next: vidcap job wait {rec.id}", highlight=False)
    except VidcapError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(rec.id)


def _reporter() -> dict:
    """A live status line on a terminal, a line per change otherwise."""
    last = {"text": ""}

    def report(p: jobs.Progress) -> None:
        if p.phase != last["text"]:
            last["text"] = p.phase
            err.print(f"job {p.status.job_id}: {p.phase}", highlight=False)

    return {"on_progress": report}


def _ready_note(eps: list[jobs.JobEndpoint], kind: str) -> None:
    if kind == "local":
        following = "vidcap caption DIR (it finds this job's port and key by itself)"
    else:
        following = "vidcap tunnel up, or vidcap caption PROFILE:PATH"
    for ep in eps:
        err.print(
            f"ready: {ep.model} on {ep.node} (job {ep.job_id}, vLLM port {ep.vllm_port}, files port "
            f"{ep.files_port})",
            highlight=False,
        )
    err.print(f"next: {following}", highlight=False)


@job_app.command("wait")
def job_wait(
    job_id: str | None = JobArg,
    timeout: float = typer.Option(3600.0, "--timeout", help="Give up after this many seconds (exit 3)."),
    poll: float = typer.Option(2.0, "--poll", min=0.1, help="Seconds between checks."),
    done: bool = typer.Option(
        False, "--done", help="Wait until the job (every shard of a captioning job) has ended instead."
    ),
    local: bool = LocalOpt,
    as_json: bool = JsonOpt,
    profile: str | None = ProfileOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """Wait until the job's server is ready: RUNNING, endpoint written, /health 200 and the model listed.

    On failure: the Slurm state and reason (e.g. PENDING (Resources), est. start) and the log's tail; exit 3.
    With --done: until the job has ended; exit 0 when every shard finished its videos, 1 when some
    videos failed (see 'vidcap report'), 3 when a shard did not finish (job resubmit --failed).
    """
    if done:
        _wait_done(job_id, timeout, poll, local, as_json, profile, config_path)
        return
    try:
        with _executor(config_path, profile, local) as (cfg, name, ex):
            rec = jobs.resolve_record(ex, cfg, name, job_id)
            if rec.caption is not None and rec.array_size > 1:  # shards end by themselves: wait for that
                raise UsageError(
                    f"job {rec.id} is an array: 'vidcap job wait {rec.id} --done' waits for it to end, "
                    f"'vidcap job wait {jobs.tasks_of(rec)[0].id}' for one task's server"
                )
            work_dir = cfg.profile(name).paths.work_dir
            with (
                err.status(f"job {rec.id}: checking") if err.is_terminal else contextlib.nullcontext() as spin
            ):
                report = _reporter()["on_progress"]

                def show(p: jobs.Progress) -> None:
                    if spin is not None:
                        spin.update(f"job {p.status.job_id}: {p.phase}")
                    else:
                        report(p)

                eps = jobs.wait_all_ready(ex, rec, work_dir, timeout=timeout, poll=poll, on_progress=show)
    except VidcapError as exc:
        _fail(exc)
    if as_json:  # one endpoint as before; an array of replicas: the list
        print(json.dumps(eps[0].to_dict() if len(eps) == 1 else [ep.to_dict() for ep in eps], indent=2))
    else:
        _ready_note(eps, ex.kind)


def _wait_done(
    job_id: str | None,
    timeout: float,
    poll: float,
    local: bool,
    as_json: bool,
    profile: str | None,
    config_path: Path | None,
) -> None:
    def show(states: list[oncluster.ShardState]) -> None:
        if len(states) == 1:
            err.print(f"job {states[0].task}: {states[0].status.describe()}", highlight=False)
        else:
            left = sum(not s.finished for s in states)
            err.print(f"job {rec.id}: {len(states) - left}/{len(states)} shards ended", highlight=False)

    try:
        with _executor(config_path, profile, local) as (cfg, name, ex):
            rec = jobs.resolve_record(ex, cfg, name, job_id)
            states = oncluster.wait_done(ex, rec, timeout=timeout, poll=poll, on_change=show)
    except VidcapError as exc:
        _fail(exc)
    if rec.caption is not None:
        _print_shards(oncluster.root_of(rec), states, as_json)
    elif as_json:
        print(json.dumps([s.to_dict() for s in states], indent=2))
    if any(s.failed for s in states):
        raise typer.Exit(3)
    raise typer.Exit(1 if any(s.failed_videos for s in states) else 0)


@job_app.command("status")
def job_status(
    job_id: str | None = JobArg,
    local: bool = LocalOpt,
    as_json: bool = JsonOpt,
    profile: str | None = ProfileOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """The job's Slurm state (squeue, then sacct once it has left the queue), reason, node and endpoint.

    For a captioning job (submit --caption): each shard's latest task (resubmits included), its state and
    its progress read from the run summaries on the cluster.
    """
    try:
        with _executor(config_path, profile, local) as (cfg, name, ex):
            rec = jobs.resolve_record(ex, cfg, name, job_id)
            if rec.caption is not None:
                states = oncluster.shard_states(ex, rec)
            else:
                status = jobs.status_of(ex, rec)
                row = _status_dict(rec, status)
                work_dir = cfg.profile(name).paths.work_dir
                ep = jobs.endpoint_of(ex, rec.id, work_dir)
                row["endpoint"] = ep.to_dict() if ep is not None else None
                if rec.array_size > 1:  # replicas: each task's own state and endpoint
                    tasks = jobs.tasks_of(rec)
                    by_id = ex.statuses(tasks)
                    row["tasks"] = []
                    for task in tasks:
                        task_ep = jobs.endpoint_of(ex, task.id, work_dir)
                        row["tasks"].append(
                            {
                                **_status_dict(task, by_id[task.id]),
                                "endpoint": task_ep.to_dict() if task_ep else None,
                            }
                        )
    except VidcapError as exc:
        _fail(exc)
    if rec.caption is not None:
        _print_shards(oncluster.root_of(rec), states, as_json)
        return
    if as_json:
        print(json.dumps(row, indent=2))
        return
    out.print(f"job {rec.id}: {status.describe()}", highlight=False)
    for task_row in row.get("tasks", []):
        task_end = task_row["endpoint"]
        where = f", vLLM port {task_end['vllm_port']} on {task_end['node']}" if task_end else ""
        out.print(f"  {task_row['id']}: {task_row['describe']}{where}", highlight=False)
    if ep is not None:
        out.print(
            f"  endpoint: {ep.model} on {ep.node}, vLLM port {ep.vllm_port}, files port {ep.files_port}"
        )
    out.print(f"  log: {rec.log}", highlight=False)


def _print_shards(root: jobs.JobRecord, states: list[oncluster.ShardState], as_json: bool) -> None:
    assert root.caption is not None
    if as_json:
        doc = {
            "id": root.id,
            "caption": {k: v for k, v in root.caption.items() if k != "config"},
            "shards": [s.to_dict() for s in states],
            "finished": all(s.finished for s in states),
            "failed": [s.shard for s in states if s.failed],
        }
        print(json.dumps(doc, indent=2))
        return
    table = Table(title=f"job {root.id}: captioning {root.caption['path']} into {root.caption['out']}")
    for col in ("shard", "task", "state", "progress"):
        table.add_column(col)
    for st in states:
        colour = "red" if st.failed else "green" if st.finished else "yellow"
        table.add_row(
            f"{st.shard}/{st.shards}", st.task, f"[{colour}]{st.status.describe()}[/]", st.progress()
        )
    out.print(table)
    failed = [st for st in states if st.failed]
    if failed:
        err.print(
            f"{len(failed)} shard(s) failed; 'vidcap job logs {failed[0].task}' shows why, "
            f"'vidcap job resubmit {root.id} --failed' runs them again (finished videos are not redone)",
            highlight=False,
        )


@job_app.command("resubmit")
def job_resubmit(
    job_id: str | None = JobArg,
    failed: bool = typer.Option(False, "--failed", help="Resubmit the shards whose last task failed."),
    time_limit: str | None = typer.Option(None, "--time", help="Time limit (overrides job.time)."),
    partition: str | None = typer.Option(None, "--partition", help="Partition (overrides job.partition)."),
    local: bool = LocalOpt,
    as_json: bool = JsonOpt,
    profile: str | None = ProfileOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """Submit again the shards of a captioning job that did not finish.

    A shard failed when its last task ended other than COMPLETED (failed, cancelled, timed out,
    preempted) before its run went through its videos. Same settings as the first submission; each shard
    resumes from its records. Running and pending shards are left alone; nothing failed -> nothing
    submitted (exit 0).
    """
    if not failed:
        _fail(UsageError("say which shards: --failed (the ones whose last task did not complete)"))
    try:
        with _executor(config_path, profile, local) as (cfg, name, ex):
            rec = jobs.resolve_record(ex, cfg, name, job_id)
            done, bad = oncluster.resubmit_failed(ex, cfg, rec, time_limit=time_limit, partition=partition)
    except VidcapError as exc:
        _fail(exc)
    result = {
        "id": done.record.id if done else None,
        "shards": [s.shard for s in bad],
        "was": {str(s.shard): s.status.describe() for s in bad},
    }
    if as_json:
        print(json.dumps(result, indent=2))
        return
    if done is None:
        err.print(f"job {rec.id}: no failed shard; nothing resubmitted", highlight=False)
        return
    shards = ", ".join(f"{s.shard} ({s.status.describe()})" for s in bad)
    err.print(f"resubmitted shard(s) {shards} as job {done.record.id}", highlight=False)
    print(done.record.id)


@job_app.command("logs")
def job_logs(
    job_id: str | None = JobArg,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
    lines: int = typer.Option(50, "--lines", "-n", min=0, help="Lines of the end of the log to print first."),
    local: bool = LocalOpt,
    profile: str | None = ProfileOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """Print the job's log (vLLM's and the file server's output, and the job script's own lines)."""

    def write(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    try:
        with _executor(config_path, profile, local) as (cfg, name, ex):
            rec = jobs.resolve_record(ex, cfg, name, job_id)
            if rec.array_size > 1:
                raise UsageError(
                    f"job {rec.id} is an array of {rec.shards} tasks, each with its own log: "
                    f"name one, e.g. 'vidcap job logs {jobs.tasks_of(rec)[0].id}'"
                )
            jobs.follow_log(ex, rec, write, lines=lines, follow=follow)
    except VidcapError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@job_app.command("cancel")
def job_cancel(
    job_id: str | None = JobArg,
    local: bool = LocalOpt,
    profile: str | None = ProfileOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """Cancel the job (scancel); its servers stop and its endpoint and secrets are removed.

    For a captioning job: every shard still queued or running, its resubmits included.
    """
    try:
        with _executor(config_path, profile, local) as (cfg, name, ex):
            rec = jobs.resolve_record(ex, cfg, name, job_id)
            work_dir = cfg.profile(name).paths.work_dir
            ids = [t.id for t in jobs.tasks_of(rec)] if rec.replicas else [rec.id]
            eps = [e for e in (jobs.endpoint_of(ex, i, work_dir) for i in ids) if e is not None]
            if rec.caption is not None:
                cancelled = oncluster.cancel_active(ex, rec)
            else:
                jobs.cancel(ex, rec)
                cancelled = [rec.id]
    except VidcapError as exc:
        _fail(exc)
    if cancelled:
        err.print(f"cancelled job {', '.join(cancelled)}", highlight=False)
    else:
        err.print(f"job {rec.id}: nothing left to cancel (every shard has ended)", highlight=False)
    # A tunnel to the cancelled job's servers would only forward to a closed port.
    state = tunnel.read_state(name)
    if eps and state is not None:
        remote_ends = {(t.remote_host, t.remote_port) for t in map(tunnel.Target.parse, state["targets"])}
        if any((ep.node, ep.vllm_port) in remote_ends for ep in eps) and tunnel.down(name):
            err.print(f"stopped the tunnel of profile {name!r} to that job", highlight=False)


@job_app.command("list")
def job_list(
    local: bool = LocalOpt,
    all_profiles: bool = typer.Option(False, "--all", help="Jobs of every profile."),
    as_json: bool = JsonOpt,
    profile: str | None = ProfileOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """The jobs vidcap submitted, with their state now (local records reconciled with Slurm)."""
    try:
        with _executor(config_path, profile, local) as (_cfg, name, ex):
            rows = [_status_dict(r, s) for r, s in jobs.list_jobs(ex, None if all_profiles else name)]
    except VidcapError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="vidcap jobs")
    for col in ("job", "profile", "model", "state", "node", "elapsed", "submitted"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["id"],
            r["profile"],
            r["model"],
            r["describe"],
            r["node"] or "",
            r["elapsed"] or "",
            r["submitted"],
        )
    out.print(table)
