"""On-cluster captioning: `vidcap job submit --caption PATH [--shards N]` runs `vidcap caption` inside the
job, next to its own server, and writes records under the profile's captions_dir/<model tag>/ (the place
`vidcap sync` brings home to ./captions/<model tag>/, where a laptop run writes too).

Shards: ``--shards N`` submits a Slurm array of N tasks; task i captions shard i/N (by path hash, so a
resubmitted shard finds its own finished records and redoes only what is missing). All tasks write the
same output dir (vidcap.store takes a shared lock plus one per shard). Each run names its summary after
its task (``runs/<time>-<task id>.json``, rewritten while it runs), which is what ``shard_states`` reads.

The laptop's caption settings travel with the job as a JSON config in the job dir, so records written on
the cluster carry the same config hash as a laptop run's and either resumes the other's work.
"""

from __future__ import annotations

import functools
import json
import posixpath
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from vidcap import jobs, jobscript
from vidcap.config import Config, Profile, model_tag
from vidcap.errors import JobError, UsageError
from vidcap.executors import Executor
from vidcap.jobstate import JobRecord, find_record, load_records
from vidcap.slurm_parse import JobState, JobStatus

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def cluster_out_dir(cfg: Config, profile: Profile) -> str:
    """The cluster output dir of the profile's model: ``<captions_dir>/<model tag>`` (absolute, or
    relative to the cluster home)."""
    base = jobscript.home_relative(profile.paths.captions_dir, "paths.captions_dir").rstrip("/") or "/"
    tag = model_tag(jobs.choose_preset(cfg, profile).model)
    return tag if base == "." else posixpath.join(base, tag)


def caption_path(cfg: Config, profile_name: str, text: str) -> str:
    """``PATH`` or ``PROFILE:PATH`` (as `vidcap caption` takes it) -> the cluster path."""
    head, sep, tail = text.partition(":")
    if sep and head in cfg.profiles:
        if head != profile_name:
            raise UsageError(f"--caption names profile {head!r} but the job is for profile {profile_name!r}")
        text = tail
    if not text.strip():
        raise UsageError("--caption needs a directory (PATH or PROFILE:PATH)")
    try:
        return jobscript.home_relative(text.rstrip("/") or "/", "--caption")
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def caption_config(cfg: Config, profile: Profile) -> dict[str, Any]:
    """The config the job's `vidcap caption` reads: the profile's caption settings, resolved here."""
    cap = profile.caption.model_dump(mode="json")
    cap["out"] = None  # the job passes --out
    cap["media"] = "file"  # the server reads the videos from the shared file system
    # A resubmitted shard can start while the task it replaces is still ending (Slurm's KillWait): wait
    # for its lock rather than fail the shard again.
    cap["lock_wait"] = max(cap["lock_wait"], 120.0)
    if cap["audio"] == "auto" and not jobs.choose_preset(cfg, profile).audio:
        cap["audio"] = "off"  # as options.resolve does on the laptop: the same config hash either way
    return {"default_profile": "job", "profiles": {"job": {"caption": cap}}}


def script(path: str, out: str, shards: int, keep_server: bool, config: dict[str, Any]) -> str:
    """The job script's extra part that captions ``path`` into ``out`` (cluster paths)."""
    if shards > 1:
        shard = f' --shard "${{SLURM_ARRAY_TASK_ID:?is not set: shards run as a Slurm array}}/{shards}"'
        note = f" (shard $SLURM_ARRAY_TASK_ID of {shards})"
    else:
        shard = note = ""
    ending = (
        'say "--keep-server: the servers stay up until the time limit or scancel"'
        if keep_server
        else 'exit "$rc"  # the job ends with its captioning; the servers are stopped on exit'
    )
    values = {
        "src": jobscript.shell_path(path, "--caption"),
        "out": jobscript.shell_path(out, "paths.captions_dir"),
        "config": shlex.quote(json.dumps(config, sort_keys=True, ensure_ascii=True)),
        "shard": shard,
        "shard_note": note,
        "ending": ending,
    }
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], _template())


@functools.lru_cache(maxsize=1)
def _template() -> str:
    return resources.files("vidcap").joinpath("slurm", "caption.sh").read_text(encoding="utf-8")


# -- submit and resubmit -------------------------------------------------------------------------------


def submit(
    ex: Executor,
    cfg: Config,
    profile_name: str,
    path: str,
    *,
    shards: int = 1,
    keep_server: bool = False,
    time_limit: str | None = None,
    partition: str | None = None,
) -> jobs.Submitted:
    """Submit a job (an array of ``shards`` tasks) that captions the cluster dir ``path``."""
    if shards < 1:
        raise UsageError("--shards must be at least 1")
    if shards > 1 and ex.kind != "slurm":
        raise UsageError("--shards needs Slurm (an array job); the local executor runs one job")
    profile = cfg.profile(profile_name)
    caption = {
        "path": caption_path(cfg, profile_name, path),
        "out": cluster_out_dir(cfg, profile),
        "keep_server": keep_server,
        "config": caption_config(cfg, profile),
    }
    return _submit(ex, cfg, profile_name, caption, shards, list(range(shards)), None, time_limit, partition)


def _submit(
    ex: Executor,
    cfg: Config,
    profile_name: str,
    caption: dict[str, Any],
    shards: int,
    tasks: list[int],
    root: str | None,
    time_limit: str | None,
    partition: str | None,
) -> jobs.Submitted:
    extra_script = script(caption["path"], caption["out"], shards, caption["keep_server"], caption["config"])
    if shards <= 1:
        array = None
    elif tasks == list(range(shards)):
        array = f"0-{shards - 1}"
    else:
        array = ",".join(map(str, tasks))
    return jobs.submit(
        ex,
        cfg,
        profile_name,
        new=True,
        time_limit=time_limit,
        partition=partition,
        extra_script=extra_script,
        array=array,
        extra={"shards": shards, "tasks": tasks, "root": root, "caption": caption},
    )


def root_of(rec: JobRecord) -> JobRecord:
    """The first submission of a caption job (a resubmit's ``root``)."""
    if rec.root:
        found = find_record(rec.root)
        if found is not None:
            return found
    return rec


def resubmit_failed(
    ex: Executor,
    cfg: Config,
    rec: JobRecord,
    *,
    time_limit: str | None = None,
    partition: str | None = None,
) -> tuple[jobs.Submitted | None, list[ShardState]]:
    """Resubmit the shards of caption job ``rec`` whose latest task ended other than COMPLETED; returns the
    new submission (None when nothing failed) and the failed shards' states. Running or pending shards
    are left alone."""
    root = root_of(rec)
    if not root.caption:
        raise UsageError(f"job {rec.id} is not a captioning job (job submit --caption): nothing to resubmit")
    failed = [s for s in shard_states(ex, root) if s.failed]
    if not failed:
        return None, []
    done = _submit(
        ex,
        cfg,
        root.profile,
        root.caption,
        root.shards or 1,
        [s.shard for s in failed],
        root.id,
        time_limit,
        partition,
    )
    return done, failed


def cancel_active(ex: Executor, rec: JobRecord) -> list[str]:
    """scancel the caption job and its resubmits that are still queued or running; their ids."""
    recs = chain(root_of(rec))
    statuses = ex.statuses(recs)  # an array id stands for all its tasks (summed up)
    active = [r for r in recs if not statuses[r.id].state.finished]
    for r in active:
        jobs.cancel(ex, r)
    return [r.id for r in active]


# -- per-shard state -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardState:
    shard: int
    shards: int
    task: str  # Slurm's id of the task that ran (or runs) it last
    status: JobStatus
    run: dict[str, Any] | None  # its newest run summary (rewritten while the run goes on)

    @property
    def run_complete(self) -> bool:
        """The shard's run went through all its videos (some may have failed: exit code 1)."""
        run = self.run or {}
        return bool(run.get("finished")) and run.get("exit_code") in (0, 1)

    @property
    def failed(self) -> bool:
        """Ended without finishing its videos (cancelled, preempted, timed out, crashed): resubmit it. A
        run that finished with some bad videos is complete: running it again would fail them again."""
        state = self.status.state
        return state.finished and state is not JobState.COMPLETED and not self.run_complete

    @property
    def finished(self) -> bool:
        return self.status.state.finished

    @property
    def failed_videos(self) -> int:
        return int(((self.run or {}).get("counts") or {}).get("failed", 0))

    def progress(self) -> str:
        """'12/40 done, 1 failed' from the run summary, or '-'."""
        if not self.run:
            return "-"
        counts = self.run.get("counts") or {}
        total = self.run.get("total")
        finished = sum(counts.get(k, 0) for k in ("done", "skipped", "failed"))
        text = f"{finished}/{total}" if total is not None else str(finished)
        text += f" ({counts.get('done', 0)} captioned, {counts.get('skipped', 0)} already done"
        if counts.get("failed"):
            text += f", {counts['failed']} failed"
        return text + ")"

    def to_dict(self) -> dict[str, Any]:
        run = self.run or {}
        return {
            "shard": self.shard,
            "shards": self.shards,
            "task": self.task,
            "state": self.status.state.value,
            "describe": self.status.describe(),
            "exit_code": self.status.exit_code,
            "failed": self.failed,
            "run_complete": self.run_complete,
            "counts": run.get("counts"),
            "total": run.get("total"),
            "run_finished": run.get("finished"),
            "run_exit_code": run.get("exit_code"),
        }


def chain(root: JobRecord) -> list[JobRecord]:
    """The caption job and its resubmits, oldest first."""
    later = [r for r in load_records(root.profile or None) if r.root == root.id and r.id != root.id]
    return [root, *later]


def shard_states(ex: Executor, rec: JobRecord) -> list[ShardState]:
    """Each shard's latest task: its Slurm state and its newest run summary (one squeue/sacct and one
    read of the summaries, however many shards)."""
    root = root_of(rec)
    shards = root.shards or 1
    latest: dict[int, JobRecord] = {}
    for r in chain(root):
        for shard in r.tasks if r.tasks is not None else range(shards):
            latest[shard] = r
    tasks = {shard: r.task_id(shard) for shard, r in latest.items()}
    pseudo = [jobs.task_record(latest[s], t) for s, t in tasks.items()]
    statuses = ex.statuses(pseudo)
    runs = _runs(ex, root, list(tasks.values()))
    return [
        ShardState(shard, shards, task, _known(statuses[task], runs.get(task)), runs.get(task))
        for shard, task in sorted(tasks.items())
    ]


def _known(status: JobStatus, run: dict[str, Any] | None) -> JobStatus:
    """A task Slurm no longer knows (left squeue, and no accounting: sacct off) ended the way its run
    summary says, when that summary is final."""
    if status.state is not JobState.UNKNOWN or not run or not run.get("finished"):
        return status
    ok = run.get("exit_code") in (0, 1)
    why = f"run exit code {run.get('exit_code')}; Slurm no longer knows the job"
    return JobStatus(status.job_id, JobState.COMPLETED if ok else JobState.FAILED, reason=why)


def _runs(ex: Executor, root: JobRecord, task_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The newest run summary per task id, from <out>/_vidcap/runs/<time>-<task id>.json."""
    if not root.caption or not task_ids:
        return {}
    runs_dir = posixpath.join(root.caption["out"], "_vidcap", "runs")
    raw = ex.read_glob(runs_dir, [f"*-{t}.json" for t in task_ids])
    found: dict[str, dict[str, Any]] = {}
    for summary in _json_documents(raw.decode("utf-8", errors="replace")):
        task = (summary.get("server") or {}).get("job_id")
        if task in task_ids and str(summary.get("run_id", "")) >= str(found.get(task, {}).get("run_id", "")):
            found[task] = summary
    return found


def _json_documents(text: str) -> list[dict[str, Any]]:
    """Concatenated JSON documents (files cat'ed together) -> the objects among them."""
    decoder = json.JSONDecoder()
    docs, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return docs
        try:
            doc, i = decoder.raw_decode(text, i)
        except ValueError:
            nxt = text.find("\n{", i)  # a damaged file: go on at the next document
            if nxt < 0:
                return docs
            i = nxt + 1
            continue
        if isinstance(doc, dict):
            docs.append(doc)


def wait_done(
    ex: Executor,
    rec: JobRecord,
    *,
    timeout: float,
    poll: float = 5.0,
    on_change: Callable[[list[ShardState]], None] = lambda s: None,
) -> list[ShardState]:
    """Block until every shard's latest task has ended; JobError when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    last: list[tuple[str, str]] = []
    while True:
        states = shard_states(ex, rec)
        seen = [(s.task, s.status.describe()) for s in states]
        if seen != last:
            on_change(states)
            last = seen
        if all(s.finished for s in states):
            return states
        if time.monotonic() >= deadline:
            running = ", ".join(f"shard {s.shard}: {s.status.describe()}" for s in states if not s.finished)
            raise JobError(f"job {rec.id} has not ended after {timeout:.0f} s ({running})")
        time.sleep(min(poll, max(0.05, deadline - time.monotonic())))
