"""Reading Slurm's answers: sbatch --parsable, squeue and sacct in pipe-separated formats (pure)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class JobState(str, Enum):
    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    SUSPENDED = "SUSPENDED"
    REQUEUED = "REQUEUED"
    UNKNOWN = "UNKNOWN"

    @property
    def finished(self) -> bool:
        return self not in _ACTIVE

    @classmethod
    def parse(cls, text: str) -> JobState:
        # sacct writes "CANCELLED by 1000"; squeue may abbreviate nothing in %T
        word = text.strip().split(" ")[0].rstrip("+").upper()
        try:
            return cls(word)
        except ValueError:
            return cls.UNKNOWN


_ACTIVE = {
    JobState.PENDING,
    JobState.CONFIGURING,
    JobState.RUNNING,
    JobState.COMPLETING,
    JobState.SUSPENDED,
    JobState.REQUEUED,
    JobState.UNKNOWN,
}

# squeue -h -o: id | state | reason | nodes | estimated start | elapsed
SQUEUE_FORMAT = "%i|%T|%r|%N|%S|%M"
# sacct -X -n -P -o
SACCT_FIELDS = "JobID,State,Reason,NodeList,Start,Elapsed,ExitCode"


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: JobState
    reason: str | None = None
    node: str | None = None
    start: str | None = None
    elapsed: str | None = None
    exit_code: str | None = None

    def describe(self) -> str:
        text = self.state.value
        if self.reason and self.reason not in ("None", "(null)"):
            text += f" ({self.reason})"
        if self.state is JobState.PENDING and self.start and self.start not in ("N/A", "Unknown"):
            text += f", est. start {self.start}"
        if self.node and self.state is JobState.RUNNING:
            text += f" on {self.node}"
        return text


def parse_sbatch(out: str) -> str:
    """'123' or '123;cluster' -> '123'."""
    line = out.strip().splitlines()[-1] if out.strip() else ""
    job_id = line.split(";")[0].strip()
    if not job_id.replace("_", "").isdigit():
        raise ValueError(f"sbatch did not answer a job id: {out.strip()[:200]!r}")
    return job_id


def _clean(value: str) -> str | None:
    value = value.strip()
    return None if value in ("", "None", "(null)", "N/A", "Unknown") else value


def _find(text: str, job_id: str, fields: int) -> list[str] | None:
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) >= fields and parts[0].strip() == job_id:
            return parts
    return None


def _status(job_id: str, parts: list[str]) -> JobStatus:
    extra = {"exit_code": _clean(parts[6])} if len(parts) > 6 else {}
    return JobStatus(
        job_id,
        JobState.parse(parts[1]),
        reason=_clean(parts[2]),
        node=_clean(parts[3]),
        start=_clean(parts[4]),
        elapsed=_clean(parts[5]),
        **extra,
    )


def parse_squeue(text: str, job_id: str) -> JobStatus | None:
    """The status of ``job_id`` from ``squeue -h -o SQUEUE_FORMAT -j ID``; None when not listed."""
    parts = _find(text, job_id, 6)
    return _status(job_id, parts[:6]) if parts else None


def parse_sacct(text: str, job_id: str) -> JobStatus | None:
    """The status of ``job_id`` from ``sacct -X -n -P -o SACCT_FIELDS -j ID``; None when unknown."""
    parts = _find(text, job_id, 7)
    return _status(job_id, parts) if parts else None


def array_status(job_id: str, tasks: list[JobStatus]) -> JobStatus:
    """One state for several tasks: the job's own for one; else RUNNING while any runs, then PENDING
    while any waits, then COMPLETED when all completed, else the first other ending."""
    if len(tasks) == 1:
        return dataclasses.replace(tasks[0], job_id=job_id)
    states = [t.state for t in tasks]
    count = f"{sum(s is JobState.COMPLETED for s in states)}/{len(tasks)} tasks completed"
    for state in (JobState.RUNNING, JobState.PENDING):
        if state in states:
            return JobStatus(job_id, state, reason=count)
    if any(not s.finished for s in states):
        return JobStatus(job_id, next(s for s in states if not s.finished), reason=count)
    other = next((t for t in tasks if t.state is not JobState.COMPLETED), None)
    return JobStatus(job_id, other.state if other else JobState.COMPLETED, reason=count)


def array_tasks(text: str, job_id: str, fields: int) -> list[JobStatus]:
    """The tasks ``<job_id>_<n>`` of array job ``job_id`` in squeue/sacct output (one per line)."""
    prefix = job_id + "_"
    found = []
    for line in text.splitlines():
        parts = line.split("|")
        task = parts[0].strip()
        if len(parts) >= fields and task.startswith(prefix) and task[len(prefix) :].isdigit():
            found.append(_status(task, parts[:fields]))
    return found


# sinfo -h -o: partition | avail | gres | node count | state | node list
SINFO_FORMAT = "%P|%a|%G|%D|%t|%N"
# sinfo %t states (the word without its *~#!%$@^- flags) in which a node takes no new job.
_NO_NEW_JOBS = frozenset(
    {"down", "drain", "drng", "drained", "draining", "fail", "failg", "failing", "futr", "future"}
    | {"inval", "maint", "npc", "unk", "unknown"}
)


@dataclass(frozen=True)
class Gres:
    name: str
    type: str | None
    count: int

    def __str__(self) -> str:
        return ":".join([self.name, *([self.type] if self.type else []), str(self.count)])


@dataclass(frozen=True)
class NodeGroup:
    """One line of ``sinfo -h -o SINFO_FORMAT``: nodes of a partition with the same gres and state."""

    partition: str
    default: bool
    avail: str
    gres: tuple[Gres, ...]
    nodes: int
    state: str
    nodelist: str

    @property
    def usable(self) -> bool:
        """Takes new jobs now or soon: idle, mixed, allocated, completing, powered down (it boots)."""
        # a trailing * is "not responding", whatever the state
        return not self.state.endswith("*") and self.state.rstrip("*~#!%$@^-").lower() not in _NO_NEW_JOBS


def _count(text: str) -> int:
    scale = {"k": 1024, "m": 1024**2, "g": 1024**3}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit():
        raise ValueError(f"{text!r} is not a count")
    return int(digits) * scale


def parse_gres(text: str) -> tuple[Gres, ...]:
    """``gpu:h100:8(S:0-1),shard:4`` -> (gpu:h100:8, shard:4); ``(null)`` -> (). Each item is Slurm's
    ``name[:type][:count]`` (no count = 1); ValueError for one that is not."""
    found = []
    for item in re.sub(r"\([^)]*\)", "", text.strip()).split(","):  # "(S:0,1)": socket bindings
        if not item.strip():
            continue
        parts = item.strip().split(":")
        count = _count(parts.pop()) if len(parts) > 1 and parts[-1][:1].isdigit() else 1
        if len(parts) > 2 or not all(parts):
            raise ValueError(f"{item.strip()!r} is not name[:type][:count]")
        found.append(Gres(parts[0], parts[1] if len(parts) > 1 else None, count))
    return tuple(found)


def parse_sinfo(text: str) -> list[NodeGroup]:
    groups = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 6:
            continue  # a warning, not a line of ours
        partition, avail, gres, count, state, nodelist = parts
        try:
            offered = parse_gres(gres)
        except ValueError:
            offered = ()  # a gres this parser cannot read is not the one the profile asks for
        default = partition.endswith("*")
        nodes = int(count) if count.isdigit() else 0
        groups.append(NodeGroup(partition.rstrip("*"), default, avail, offered, nodes, state, nodelist))
    return groups


def offers(offered: Sequence[Gres], wanted: Sequence[Gres]) -> bool:
    """Whether one node with ``offered`` holds the whole request (every item, its type and count)."""

    def has(w: Gres) -> bool:
        return any(
            o.name == w.name
            and o.count >= w.count
            and (w.type is None or w.type.lower() == (o.type or "").lower())
            for o in offered
        )

    return all(has(w) for w in wanted)
