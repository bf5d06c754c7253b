"""The output directory: one writer (a lock), atomic record writes, resume checks, the failures ledger
and the run summaries. Layout: OUT/<rel>.json, OUT/_vidcap/{lock, failures.jsonl, runs/<ts>.json}."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from vidcap.errors import OutputLockedError, UsageError
from vidcap.records import CaptionRecord, Failure, RunSummary

META = "_vidcap"
TMP_SUFFIX = ".vidcap-tmp"


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The temp name is fixed per target, so a file left by a killed run is replaced by the next write.
    """
    tmp = path.with_name("." + path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class OutputDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.meta = root / META
        self._lock_fd: int | None = None

    @property
    def failures_path(self) -> Path:
        return self.meta / "failures.jsonl"

    @property
    def runs_dir(self) -> Path:
        return self.meta / "runs"

    def record_path(self, rel: str) -> Path:
        return self.root / (rel + ".json")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create output directory {self.root}: {exc.strerror}") from exc
        fd = os.open(self.meta / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputLockedError(
                f"another vidcap run (pid {holder}) is writing {self.root}; wait for it or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        try:
            yield
        finally:
            self._lock_fd = None
            os.close(fd)  # closing releases the flock; the file stays (removing it would race a waiter)

    def is_done(self, rel: str, size: int, mtime: float, config_hash: str) -> bool:
        """Resume key: a record with the same config hash and the same video size and mtime."""
        try:
            with open(self.record_path(rel), "rb") as fh:
                data = json.loads(fh.read())
            video = data["video"]
            return bool(
                data["config_hash"] == config_hash
                and video["size"] == size
                and abs(video["mtime"] - mtime) < 1e-3
            )
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def write_record(self, rel: str, record: CaptionRecord) -> Path:
        path = self.record_path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, record.to_json())
        return path

    def append_failure(self, failure: Failure) -> None:
        # O_APPEND writes of one line are atomic enough for a single writer holding the lock.
        with open(self.failures_path, "a", encoding="utf-8") as fh:
            fh.write(failure.to_line())
            fh.flush()

    def write_summary(self, summary: RunSummary) -> Path:
        path = self.runs_dir / f"{summary.run_id}.json"
        atomic_write(path, summary.to_json())
        return path
