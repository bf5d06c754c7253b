"""Local state of the jobs vidcap submitted: one 0600 JSON file per job under ``<state dir>/jobs/``.
Slurm stays the truth for a job's state; a record only says which jobs are ours, with which profile,
model and paths."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vidcap import config
from vidcap.store import atomic_write


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- endpoints ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRecord:
    id: str
    profile: str
    executor: str  # "slurm" | "local"
    preset: str
    model: str  # the name the server answers to
    name: str
    job_dir: str  # cluster path: absolute or relative to the cluster home
    log: str
    submitted: str
    pid: int | None = None  # local executor: the wrapper process
    cancelled: bool = False
    # On-cluster captioning (job submit --caption): the shard count (> 1: a Slurm array, task i = shard i),
    # the shards this submission runs (a resubmit runs the failed ones), the job a resubmit continues, and
    # what the job captions: {"path", "out", "keep_server", "config"} (config: the profile's caption
    # settings as submitted, so a resubmit writes records with the same config hash).
    shards: int | None = None
    tasks: list[int] | None = None
    root: str | None = None
    caption: dict[str, Any] | None = None
    replicas: int | None = None  # job submit --replicas N: an array of N servers of the same model

    @property
    def array_size(self) -> int:
        """Tasks in the Slurm array (1: a plain job)."""
        return self.shards or self.replicas or 1

    def task_id(self, index: int) -> str:
        """Slurm's name for task ``index``: ``<array id>_<index>``, or the job id itself for a plain job."""
        return f"{self.id}_{index}" if self.array_size > 1 else self.id

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def records_dir() -> Path:
    return config.state_dir() / "jobs"


def _record_path(job_id: str) -> Path:
    return records_dir() / f"{job_id}.json"


def save_record(rec: JobRecord) -> None:
    records_dir().mkdir(parents=True, exist_ok=True, mode=0o700)  # only a write creates the state dir
    path = _record_path(rec.id)
    atomic_write(path, json.dumps(rec.to_dict(), indent=2) + "\n")
    os.chmod(path, 0o600)


def load_records(profile: str | None = None) -> list[JobRecord]:
    """The jobs vidcap submitted (for ``profile``, or all), oldest first."""
    found = []
    for path in records_dir().glob("*.json") if records_dir().is_dir() else []:
        try:
            rec = JobRecord(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            continue  # a foreign or damaged file is not one of ours
        if profile is None or rec.profile == profile:
            found.append(rec)
    return sorted(found, key=lambda r: (r.submitted, r.id))


def find_record(job_id: str) -> JobRecord | None:
    return next((r for r in load_records() if r.id == job_id), None)
