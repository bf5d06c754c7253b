"""The output directory: its locks, atomic record writes, resume checks, the failure ledgers and the run
summaries. Layout: OUT/<rel>.json and OUT/_vidcap/ holding

* ``lock``: every run locks it: LOCK_EX for an unsharded run, LOCK_SH for each shard of a sharded one;
* ``lock.shard-<i>-of-<N>``: LOCK_EX by the run of shard i/N (its pid inside), so N shards of one N run
  side by side (N Slurm array tasks writing one OUT), while the same shard twice is refused;
* ``failures.jsonl`` (unsharded runs) and ``failures.shard-<i>-of-<N>.jsonl``: one ledger per writer;
* ``runs/<run_id>.json``: one summary per run, written at its start, rewritten while it runs, and at
  its end (``finished`` stays null in a run that is still going, or was killed)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
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


_SHARD_LOCK = re.compile(r"lock\.shard-(\d+)-of-(\d+)")
# A flock probe or a lock attempt can fail for a moment only because another run starting at the same
# instant is probing the same file (probes release at once): try a few times before calling it held.
_LOCK_TRIES = 5
_LOCK_PAUSE = 0.05


def shard_tag(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]}-of-{shard[1]}"


def ledger_name(shard: tuple[int, int] | None) -> str:
    """The failure ledger of a run of ``shard`` (None: an unsharded run)."""
    return "failures.jsonl" if shard is None else f"failures.{shard_tag(shard)}.jsonl"


def _try_flock(fd: int, op: int) -> bool:
    for attempt in range(_LOCK_TRIES):
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < _LOCK_TRIES:
                time.sleep(_LOCK_PAUSE)
    return False


def _read_pid(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)


class OutputDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.meta = root / META
        self.shard: tuple[int, int] | None = None  # set by locked(): which ledger this run appends to
        self._lock_fds: list[int] = []

    @property
    def failures_path(self) -> Path:
        """This run's failure ledger. Every writer has its own: O_APPEND is not atomic on NFS (the client
        picks the offset from its cached size), so lines of shards on several nodes would overwrite each
        other in one shared file."""
        return self.meta / ledger_name(self.shard)

    def failure_ledgers(self) -> list[Path]:
        """Every failure ledger in the directory (of unsharded and sharded runs, old and current)."""
        return sorted(self.meta.glob("failures*.jsonl")) if self.meta.is_dir() else []

    @property
    def runs_dir(self) -> Path:
        return self.meta / "runs"

    def record_path(self, rel: str) -> Path:
        return self.root / (rel + ".json")

    @contextlib.contextmanager
    def locked(self, shard: tuple[int, int] | None = None, wait: float = 0.0) -> Iterator[None]:
        """Hold the output dir for one run: the whole of it (``shard`` None), or shard i/N of it beside
        the other shards of the same N. Raises OutputLockedError, naming the run in the way, otherwise,
        after trying for ``wait`` seconds (a resubmitted shard may start while the run it replaces is
        still writing its summary on the way out)."""
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create output directory {self.root}: {exc.strerror}") from exc
        deadline = time.monotonic() + wait
        while True:
            try:
                fds = self._take(shard)
                break
            except OutputLockedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        self._lock_fds, self.shard = fds, shard
        try:
            yield
        finally:
            self._lock_fds, self.shard = [], None
            # Closing releases the flocks; the files stay (removing one would race a run about to lock it).
            for fd in reversed(fds):
                os.close(fd)

    def _take(self, shard: tuple[int, int] | None) -> list[int]:
        fds: list[int] = []
        try:
            if shard is None:
                self._lock_whole(fds)
            else:
                self._lock_shard(shard, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def _open(self, name: str, fds: list[int]) -> int:
        fd = os.open(self.meta / name, os.O_RDWR | os.O_CREAT, 0o600)
        fds.append(fd)
        return fd

    def _lock_whole(self, fds: list[int]) -> None:
        fd = self._open("lock", fds)
        if not _try_flock(fd, fcntl.LOCK_EX):
            shards = self._active_shards()
            if shards:
                who = ", ".join(f"{i}/{n} (pid {pid})" for (i, n), pid in shards)
                raise OutputLockedError(
                    f"a sharded vidcap run is writing {self.root} (shards {who}); "
                    "wait for it or use another --out"
                )
            # The pid in "lock" is the last exclusive holder's (shard runs never write it).
            raise OutputLockedError(
                f"another vidcap run (pid {_read_pid(fd)}) is writing {self.root}; "
                "wait for it or use another --out"
            )
        _write_pid(fd)

    def _lock_shard(self, shard: tuple[int, int], fds: list[int]) -> None:
        i, n = shard
        main = self._open("lock", fds)
        if not _try_flock(main, fcntl.LOCK_SH):
            raise OutputLockedError(
                f"an unsharded vidcap run (pid {_read_pid(main)}) is writing {self.root}, so shard {i}/{n} "
                "cannot start; wait for it or use another --out"
            )
        own = self._open(f"lock.{shard_tag(shard)}", fds)
        if not _try_flock(own, fcntl.LOCK_EX):
            raise OutputLockedError(
                f"shard {i}/{n} of {self.root} is already being captioned by another vidcap run "
                f"(pid {_read_pid(own)}); wait for it or use another --out"
            )
        _write_pid(own)
        # Shards of another N split the videos differently, so together they would caption some videos
        # twice and (with resume) race on the same records: refuse. The shared "lock" cannot tell
        # shards of different N apart, so look at the shard lock files of every other N that exist
        # (old ones stay behind) and ask whether a run still holds one. Our own lock is taken first:
        # of two runs of different N starting together, at least one then sees the other.
        other = self._active_shards(exclude_n=n)
        if other:
            (j, m), pid = other[0]
            raise OutputLockedError(
                f"a vidcap run of shard {j}/{m} (pid {pid}) is writing {self.root}; shards of one output "
                f"dir must all use the same N (this run is {i}/{n}); wait for it or use another --out"
            )

    def _active_shards(self, exclude_n: int | None = None) -> list[tuple[tuple[int, int], str]]:
        """Shard locks that some run holds now, with the pid written in each. Never called on a file this
        run holds: on NFS flock is emulated with POSIX locks, and closing any descriptor of a file drops
        all of the process's locks on it."""
        found = []
        for path in sorted(self.meta.glob("lock.shard-*-of-*")):
            match = _SHARD_LOCK.fullmatch(path.name)
            if match is None:
                continue
            key = (int(match[1]), int(match[2]))
            if key[1] == exclude_n:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                # A shared probe conflicts with the holder's LOCK_EX but not with another run probing
                # the same file at the same moment; it is released at once by the close below.
                if not _try_flock(fd, fcntl.LOCK_SH):
                    found.append((key, _read_pid(fd)))
            finally:
                os.close(fd)
        return found

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
        # One writer per ledger (see failures_path), so a plain append of one line is safe.
        with open(self.failures_path, "a", encoding="utf-8") as fh:
            fh.write(failure.to_line())
            fh.flush()

    def write_summary(self, summary: RunSummary) -> Path:
        path = self.runs_dir / f"{summary.run_id}.json"
        atomic_write(path, summary.to_json())
        return path
