"""Reading Slurm's answers: sbatch --parsable, squeue and sacct in pipe-separated formats (pure)."""

from __future__ import annotations

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
