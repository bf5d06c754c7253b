"""The server job's lifecycle: submit (Slurm over SSH, or a local process), status, wait until ready, logs,
cancel, list; and finding the endpoint of a profile's running job.

Readiness is never read from the log. A job is ready when Slurm says RUNNING, the job has written
endpoint.json (it does so only after its own /health check), and, seen from here through the login node,
/health answers 200 and /v1/models (with the job's API key) lists the served model.

Local state: one 0600 JSON file per job vidcap submitted, under ``<state dir>/jobs/``; ``list`` reconciles
it with Slurm. Slurm stays the truth for the state; the record only says which jobs are ours, with which
profile and model. A job submitted from elsewhere is still found by ``discover`` through squeue.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import httpx

from vidcap import jobscript
from vidcap.config import Config, Profile
from vidcap.errors import ConfigError, JobError, UsageError
from vidcap.executors import JOB_NAME_PREFIX, Executor, open_executor
from vidcap.jobstate import JobRecord, find_record, load_records, now, save_record
from vidcap.slurm_parse import JobState, JobStatus, array_status

__all__ = ["Executor", "JobRecord", "load_records", "open_executor"]

LOG_TAIL_LINES = 30


@dataclass(frozen=True)
class JobEndpoint:
    """Where a ready job's servers are, as the login node reaches them."""

    job_id: str
    node: str
    vllm_port: int
    files_port: int
    model: str
    started: str
    secrets_path: str = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "secrets_path"}


def parse_endpoint(job_id: str, job_dir: str, text: bytes) -> JobEndpoint | None:
    try:
        data = json.loads(text)
        return JobEndpoint(
            job_id=job_id,
            node=str(data["node"]),
            vllm_port=int(data["vllm_port"]),
            files_port=int(data["files_port"]),
            model=str(data["model"]),
            started=str(data.get("started", "")),
            secrets_path=posixpath.join(job_dir, jobscript.SECRETS_FILE),
        )
    except (ValueError, KeyError, TypeError):
        return None  # half-written files never exist (the job renames), so this is not our file


# -- what the job serves --------------------------------------------------------------------------------


def choose_preset(cfg: Config, profile: Profile) -> jobscript.Preset:
    presets = jobscript.load_presets(cfg.presets)
    srv = profile.server
    if srv.preset:
        preset = presets.get(srv.preset)
        if preset is None:
            raise ConfigError(
                f"server.preset: no preset {srv.preset!r} (known: {', '.join(sorted(presets))})"
            )
        return preset
    found = jobscript.find_preset(presets, srv.model)
    if found is not None:
        return found
    # A model without a preset is served with `vllm serve MODEL` and the profile's vllm_args only.
    return jobscript.Preset(name="custom", model=srv.model, max_model_len=srv.max_model_len, audio=True)


def served_name(profile: Profile, preset: jobscript.Preset) -> str:
    return profile.server.served_name or preset.model


# -- readiness ------------------------------------------------------------------------------------------


def read_api_key(ex: Executor, ep: JobEndpoint) -> str | None:
    raw = ex.read(ep.secrets_path)
    if raw is None:
        return None
    with contextlib.suppress(ValueError, AttributeError):
        return json.loads(raw).get("api_key")
    return None


def check_server(ex: Executor, ep: JobEndpoint, api_key: str | None, timeout: float = 10.0) -> str | None:
    """None when the job's server answers /health and lists its model; else what is wrong."""
    try:
        with ex.http(ep.node, ep.vllm_port) as base, httpx.Client(timeout=timeout, trust_env=False) as http:
            health = http.get(f"{base}/health")
            if health.status_code != 200:
                return f"/health answered {health.status_code}"
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            models = http.get(f"{base}/v1/models", headers=headers)
            if models.status_code != 200:
                return f"/v1/models answered {models.status_code}"
            names = [m.get("id") for m in models.json().get("data", [])]
            if ep.model not in names:
                return f"the server lists {names}, not {ep.model!r}"
    except (httpx.HTTPError, ValueError, OSError) as exc:
        return (
            f"{ep.node}:{ep.vllm_port} does not answer from the login node ({type(exc).__name__}): "
            "is the port blocked between login and compute nodes?"
        )
    except Exception as exc:  # the SSH forward itself (TransportError, a channel refused by the node)
        return f"cannot reach {ep.node}:{ep.vllm_port} through the login node: {exc}"
    return None


def endpoint_of(ex: Executor, job_id: str, work_dir: str) -> JobEndpoint | None:
    job_dir = jobscript.job_dir(work_dir, job_id)
    raw = ex.read(posixpath.join(job_dir, jobscript.ENDPOINT_FILE))
    return None if raw is None else parse_endpoint(job_id, job_dir, raw)


def status_of(ex: Executor, rec: JobRecord) -> JobStatus:
    return ex.statuses([rec])[rec.id]


def log_tail(ex: Executor, rec: JobRecord, lines: int = LOG_TAIL_LINES) -> str:
    raw = ex.read(rec.log)
    if raw is None:
        return f"(no log at {rec.log} yet)"
    return "\n".join(raw.decode(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class Progress:
    """What ``wait`` reports each time something changes."""

    status: JobStatus
    phase: str


def wait_ready(
    ex: Executor,
    rec: JobRecord,
    work_dir: str,
    *,
    timeout: float,
    poll: float = 2.0,
    on_progress: Callable[[Progress], None] = lambda p: None,
) -> JobEndpoint:
    """Block until the job is ready (see the module doc); JobError with the Slurm state, the reason and
    the log's tail when it ends first or is not ready within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        status = status_of(ex, rec)
        if status.state.finished:
            raise JobError(
                f"job {rec.id} ended before it was ready: {status.describe()}"
                + (f", exit code {status.exit_code}" if status.exit_code else "")
                + f"\nlast lines of {rec.log}:\n{log_tail(ex, rec)}"
            )
        phase = status.describe()
        if status.state is JobState.RUNNING:
            ep = endpoint_of(ex, rec.id, work_dir)
            if ep is None:
                phase += ": the server is starting (no endpoint.json yet)"
            else:
                problem = check_server(ex, ep, read_api_key(ex, ep))
                if problem is None:
                    on_progress(Progress(status, f"ready on {ep.node}:{ep.vllm_port}"))
                    return ep
                phase += f": {problem}"
        if phase != last:
            on_progress(Progress(status, phase))
            last = phase
        if time.monotonic() >= deadline:
            tail = (
                f"\nlast lines of {rec.log}:\n{log_tail(ex, rec)}" if status.state is JobState.RUNNING else ""
            )
            raise JobError(f"job {rec.id} was not ready after {timeout:.0f} s: {phase}{tail}")
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())) or 0.05)


# -- the verbs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submitted:
    record: JobRecord
    reused: JobEndpoint | None = None  # set when a running job was reused instead


def submit(
    ex: Executor,
    cfg: Config,
    profile_name: str,
    *,
    new: bool = False,
    time_limit: str | None = None,
    partition: str | None = None,
    extra_script: str = "",
    array: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Submitted:
    """Submit the profile's server job, or reuse a healthy running one serving the same model (not with
    ``new`` or an ``extra_script``: such a job does its own work). ``extra`` adds fields to the record."""
    profile = cfg.profile(profile_name)
    changes = {k: v for k, v in (("time", time_limit), ("partition", partition)) if v}
    if changes:
        profile = profile.model_copy(update={"job": profile.job.model_copy(update=changes)})
    preset = choose_preset(cfg, profile)
    model = served_name(profile, preset)
    work_dir = profile.paths.work_dir
    if not new and not extra_script:
        for ep in discover_all(ex, profile, work_dir):
            if _ends_by_itself(ep.job_id):
                continue
            if ep.model == model and check_server(ex, ep, read_api_key(ex, ep)) is None:
                rec = find_record(ep.job_id)
                if rec is None:
                    rec = _record(ex, profile_name, preset, model, ep.job_id, None, work_dir)
                    save_record(rec)
                return Submitted(rec, reused=ep)
    name = JOB_NAME_PREFIX + preset.name
    try:
        script = jobscript.render(
            profile=profile,
            preset=preset,
            job_name=name,
            server_command=profile.server.command,
            array=array,
            extra_script=extra_script,
        )
    except ValueError as exc:
        raise ConfigError(f"profile {profile_name!r}: {exc}") from exc
    job_id, pid = ex.submit(script, work_dir)
    rec = replace(_record(ex, profile_name, preset, model, job_id, pid, work_dir), **(extra or {}))
    save_record(rec)
    return Submitted(rec)


def submit_replicas(
    ex: Executor,
    cfg: Config,
    profile_name: str,
    replicas: int,
    *,
    time_limit: str | None = None,
    partition: str | None = None,
) -> Submitted:
    """A Slurm array of ``replicas`` server jobs of the profile's model: `vidcap caption PROFILE:PATH`
    and `tunnel up` use every ready one, each request going to the least busy."""
    if ex.kind != "slurm":
        raise UsageError("--replicas needs Slurm (an array job); the local executor runs one server")
    return submit(
        ex,
        cfg,
        profile_name,
        new=True,
        time_limit=time_limit,
        partition=partition,
        array=f"0-{replicas - 1}",
        extra={"replicas": replicas, "tasks": list(range(replicas))},
    )


def wait_all_ready(
    ex: Executor,
    rec: JobRecord,
    work_dir: str,
    *,
    timeout: float,
    poll: float = 2.0,
    on_progress: Callable[[Progress], None] = lambda p: None,
) -> list[JobEndpoint]:
    """``wait_ready`` for every task of an array of replicas (one deadline for all); for a plain job,
    its one endpoint."""
    deadline = time.monotonic() + timeout
    found = []
    for task in tasks_of(rec):
        left = max(0.0, deadline - time.monotonic())
        found.append(wait_ready(ex, task, work_dir, timeout=left, poll=poll, on_progress=on_progress))
    return found


def _ends_by_itself(job_id: str) -> bool:
    """A captioning job (or task of one) ends when its captions are done: not a server to reuse."""
    rec = find_record(job_id.partition("_")[0])
    return bool(rec and rec.caption and not rec.caption.get("keep_server"))


def _record(
    ex: Executor,
    profile_name: str,
    preset: jobscript.Preset,
    model: str,
    job_id: str,
    pid: int | None,
    work: str,
) -> JobRecord:
    return JobRecord(
        id=job_id,
        profile=profile_name,
        executor=ex.kind,
        preset=preset.name,
        model=model,
        name=JOB_NAME_PREFIX + preset.name,
        job_dir=jobscript.job_dir(work, job_id),
        log=jobscript.log_path(work, job_id),
        submitted=now(),
        pid=pid,
    )


def discover_all(ex: Executor, profile: Profile, work_dir: str | None = None) -> list[JobEndpoint]:
    """The endpoints of the user's running vidcap jobs under this profile's work_dir, newest first."""
    work = work_dir or profile.paths.work_dir
    found = [ep for ep in (endpoint_of(ex, i, work) for i in ex.running_ids()) if ep is not None]
    return sorted(found, key=lambda ep: ep.started, reverse=True)


def discover(
    ex: Executor, profile: Profile, job_id: str | None = None, model: str | None = None
) -> JobEndpoint:
    """The endpoint of job ``job_id``, or of the profile's newest running job (serving ``model`` when
    one does). JobError saying what to do when there is none."""
    work = profile.paths.work_dir
    if job_id is not None:
        rec = find_record(job_id) or _bare_record(ex, job_id, work)
        status = status_of(ex, rec)
        ep = endpoint_of(ex, job_id, work) if status.state is JobState.RUNNING else None
        if ep is None:
            raise JobError(
                f"job {job_id} has no ready endpoint ({status.describe()}); "
                f"'vidcap job wait {job_id}' waits for it, 'vidcap job status {job_id}' says more"
            )
        return ep
    found = discover_all(ex, profile, work)
    if not found:
        raise JobError(
            "no running vidcap job for this profile: start one with 'vidcap job submit' and "
            "'vidcap job wait' (or name the servers under [profiles.NAME.endpoint])"
        )
    return next((ep for ep in found if ep.model == model), found[0])


def task_record(rec: JobRecord, task_id: str) -> JobRecord:
    """The record of one task of array job ``rec`` (its own id, directory and log)."""
    if task_id == rec.id:
        return rec
    jobs_dir = posixpath.dirname(rec.job_dir)
    return replace(
        rec,
        id=task_id,
        job_dir=posixpath.join(jobs_dir, task_id),
        log=posixpath.join(jobs_dir, f"{task_id}.log"),
    )


def discover_replicas(
    ex: Executor, profile: Profile, job_id: str | None = None, model: str | None = None
) -> list[JobEndpoint]:
    """The servers a laptop run uses: job ``job_id`` (every ready task when it names an array of
    replicas), else the profile's newest running server job, with its sibling tasks when it is one task
    of an array. Captioning jobs are left out: they end by themselves."""
    work = profile.paths.work_dir
    if job_id is not None and "_" not in job_id:
        tasks = [i for i in ex.running_ids() if i.partition("_")[0] == job_id and "_" in i]
        found = [ep for ep in (endpoint_of(ex, i, work) for i in tasks) if ep is not None]
        if found:
            return sorted(found, key=lambda ep: ep.job_id)
    if job_id is not None:
        return [discover(ex, profile, job_id, model)]
    running = [ep for ep in discover_all(ex, profile, work) if not _ends_by_itself(ep.job_id)]
    if not running:
        raise JobError(
            "no running vidcap server job for this profile (a captioning job, if any, ends by itself): "
            "start one with 'vidcap job submit' and 'vidcap job wait' (or name the servers under "
            "[profiles.NAME.endpoint])"
        )
    newest = next((ep for ep in running if ep.model == model), running[0])
    array, sep, _ = newest.job_id.partition("_")
    if not sep:
        return [newest]
    siblings = [ep for ep in running if ep.job_id.partition("_")[0] == array and ep.model == newest.model]
    return sorted(siblings, key=lambda ep: ep.job_id)


def tasks_of(rec: JobRecord) -> list[JobRecord]:
    """The records of the tasks ``rec`` submitted (an array's, or the job itself)."""
    indices = rec.tasks if rec.tasks is not None else range(rec.array_size)
    return [task_record(rec, rec.task_id(i)) for i in indices]


def _bare_record(ex: Executor, job_id: str, work_dir: str) -> JobRecord:
    """A record for a job vidcap has no state of (submitted from another machine)."""
    return JobRecord(
        id=job_id,
        profile="",
        executor=ex.kind,
        preset="",
        model="",
        name="",
        job_dir=jobscript.job_dir(work_dir, job_id),
        log=jobscript.log_path(work_dir, job_id),
        submitted="",
    )


def resolve_record(ex: Executor, cfg: Config, profile_name: str, job_id: str | None) -> JobRecord:
    """The job a verb acts on: ``job_id`` (known to us or not), else the profile's newest record."""
    if job_id is not None:
        return find_record(job_id) or _bare_record(ex, job_id, cfg.profile(profile_name).paths.work_dir)
    recs = [r for r in load_records(profile_name) if r.executor == ex.kind]
    if not recs:
        raise UsageError(f"vidcap has submitted no job for profile {profile_name!r}; name one (JOB)")
    return recs[-1]


def cancel(ex: Executor, rec: JobRecord) -> None:
    ex.cancel(rec)
    if find_record(rec.id) is not None:
        save_record(replace(rec, cancelled=True))


def follow_log(
    ex: Executor,
    rec: JobRecord,
    write: Callable[[bytes], None],
    *,
    lines: int,
    follow: bool,
    poll: float = 2.0,
) -> None:
    """Write the last ``lines`` lines of the job's log; with ``follow``, then what is appended, until the
    job has ended (or the caller interrupts)."""
    raw = ex.read(rec.log)
    if raw is None and not follow:
        raise JobError(f"no log at {rec.log} (the job has not started, or it ran elsewhere)")
    raw = raw or b""
    kept = raw.splitlines(keepends=True)[-lines:] if lines > 0 else []
    write(b"".join(kept))
    offset = len(raw)
    while follow:
        finished = status_of(ex, rec).state.finished
        more = ex.read_from(rec.log, offset)
        if more:
            write(more)
            offset += len(more)
        if finished:
            return
        time.sleep(poll)


def list_jobs(ex: Executor, profile_name: str | None) -> list[tuple[JobRecord, JobStatus]]:
    """The jobs vidcap submitted with their state; an array's is summed up from its tasks'."""
    recs = [r for r in load_records(profile_name) if r.executor == ex.kind]
    tasks = {r.id: tasks_of(r) for r in recs}
    statuses = ex.statuses([t for ts in tasks.values() for t in ts])
    return [(r, array_status(r.id, [statuses[t.id] for t in tasks[r.id]])) for r in recs]


def local_endpoint(cfg: Config, profile: Profile) -> tuple[str, str | None] | None:
    """(base URL, API key) of the profile's running local job (``job submit --local``), if any: a
    workstation user captions with no --server once the job is up."""
    from vidcap.executors import LocalExecutor

    ex = LocalExecutor()
    found = discover_all(ex, profile)
    if not found:
        return None
    model = served_name(profile, choose_preset(cfg, profile))
    ep = next((e for e in found if e.model == model), found[0])
    return f"http://127.0.0.1:{ep.vllm_port}/v1", read_api_key(ex, ep)
