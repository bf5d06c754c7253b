"""Where a job runs: Slurm on the login node over SSH (sbatch, squeue then sacct, scancel), or the same
job script as a detached local process on a GPU workstation. Both read the job's files and reach its
servers the same way, so the lifecycle in vidcap.jobs does not care which."""

from __future__ import annotations

import contextlib
import os
import posixpath
import secrets
import signal
import subprocess
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from vidcap import jobscript
from vidcap.config import Profile
from vidcap.errors import ConfigError, JobError
from vidcap.jobstate import JobRecord, load_records
from vidcap.slurm_parse import (
    SACCT_FIELDS,
    SQUEUE_FORMAT,
    JobState,
    JobStatus,
    array_status,
    array_tasks,
    parse_sacct,
    parse_sbatch,
    parse_squeue,
)
from vidcap.tunnel import pid_alive

JOB_NAME_PREFIX = "vidcap-"
SLURM_TIMEOUT = 120.0
# The local executor's wrapper: runs the job script, forwards SIGTERM to it (a background child of a
# non-interactive shell ignores SIGINT, so cancel uses TERM) and records the exit status atomically.
_LOCAL_WRAPPER = r"""
bash "$1" </dev/null &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM HUP
while :; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break
done
printf '%s\n' "$rc" >"$2.tmp" && mv -f "$2.tmp" "$2"
"""


class Executor(Protocol):
    kind: str

    def submit(self, script: str, work_dir: str) -> tuple[str, int | None]: ...
    def statuses(self, recs: Sequence[JobRecord]) -> dict[str, JobStatus]: ...
    def running_ids(self) -> list[str]: ...
    def read(self, path: str) -> bytes | None: ...
    def read_from(self, path: str, offset: int) -> bytes: ...
    def cancel(self, rec: JobRecord) -> None: ...
    def read_glob(self, directory: str, patterns: Sequence[str]) -> bytes: ...
    def http(self, node: str, port: int) -> contextlib.AbstractContextManager[str]: ...
    def close(self) -> None: ...


def _jobs_dir(work_dir: str) -> str:
    return posixpath.dirname(jobscript.log_path(work_dir, "x"))


class SlurmExecutor:
    """sbatch/squeue/sacct/scancel on the login node, through a vidcap.transport connection."""

    kind = "slurm"

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def _run(self, argv: Sequence[str], **kw: Any) -> Any:
        # a hung slurmctld must not hang every job verb: Slurm's own client timeout is about this long
        return self.transport.run(list(argv), check=False, timeout=SLURM_TIMEOUT, **kw)

    def submit(self, script: str, work_dir: str) -> tuple[str, int | None]:
        # From $HOME: the script's relative #SBATCH paths are relative to the submit directory, and the
        # log's directory must exist before the job starts (Slurm does not create it).
        done = self._run(
            ["sh", "-c", 'cd && mkdir -p -- "$1" && exec sbatch --parsable', "sh", _jobs_dir(work_dir)],
            input=script.encode(),
        )
        text = done.stdout.decode(errors="replace")
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip() or text.strip()
            raise ConfigError(f"sbatch refused the job: {why}")
        try:
            return parse_sbatch(text), None
        except ValueError as exc:
            raise JobError(str(exc)) from exc

    def statuses(self, recs: Sequence[JobRecord]) -> dict[str, JobStatus]:
        ids = [r.id for r in recs]
        if not ids:
            return {}
        found: dict[str, JobStatus] = {}
        # -r: an array's pending tasks one per line (123_1), not folded into 123_[1-2]
        queue = self._run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(ids), "-o", SQUEUE_FORMAT])
        text = queue.stdout.decode(errors="replace")
        for job_id in ids:
            status = parse_squeue(text, job_id) or _whole_array(text, job_id, 6)
            if status is not None:
                found[job_id] = status
        rest = [i for i in ids if i not in found]
        if rest:  # left the queue: accounting knows how it ended
            acct = self._run(["sacct", "-X", "-n", "-P", "-o", SACCT_FIELDS, "-j", ",".join(rest)])
            text = acct.stdout.decode(errors="replace")
            for job_id in rest:
                found[job_id] = (
                    parse_sacct(text, job_id)
                    or _whole_array(text, job_id, 7)
                    or JobStatus(job_id, JobState.UNKNOWN, reason="neither squeue nor sacct knows this job")
                )
        return found

    def running_ids(self) -> list[str]:
        done = self._run(["squeue", "--me", "-h", "-t", "RUNNING", "-o", "%i|%j"])
        ids = []
        for line in done.stdout.decode(errors="replace").splitlines():
            job_id, _, name = line.strip().partition("|")
            if name.startswith(JOB_NAME_PREFIX):
                ids.append(job_id)
        return ids

    def read(self, path: str) -> bytes | None:
        done = self._run(["cat", "--", path])
        return done.stdout if done.returncode == 0 else None

    def read_from(self, path: str, offset: int) -> bytes:
        done = self._run(["tail", "-c", f"+{offset + 1}", "--", path])
        return done.stdout if done.returncode == 0 else b""

    def read_glob(self, directory: str, patterns: Sequence[str]) -> bytes:
        """The files of ``directory`` matching the shell ``patterns``, concatenated; one SSH command."""
        script = (
            'cd -- "$1" 2>/dev/null || exit 0; shift; '
            'for p; do for f in ./$p; do if [ -f "$f" ]; then cat -- "$f"; fi; done; done'
        )
        done = self._run(["sh", "-c", script, "sh", directory, *patterns])
        return done.stdout if done.returncode == 0 else b""

    def cancel(self, rec: JobRecord) -> None:
        done = self._run(["scancel", "--", rec.id])
        if done.returncode != 0:
            raise JobError(f"scancel {rec.id} failed: {done.stderr.decode(errors='replace').strip()}")

    @contextlib.contextmanager
    def http(self, node: str, port: int) -> Iterator[str]:
        fwd = self.transport.forward(0, node, port)
        try:
            yield f"http://127.0.0.1:{fwd.local_port}"
        finally:
            fwd.close()

    def close(self) -> None:
        self.transport.close()


def _whole_array(text: str, job_id: str, fields: int) -> JobStatus | None:
    """An array job named by its own id (123): Slurm lists only its tasks (123_0, ...); sum them up."""
    tasks = array_tasks(text, job_id, fields)
    return array_status(job_id, tasks) if tasks else None


def _local_path(path: str) -> Path:
    rel = jobscript.home_relative(path)
    return Path(rel) if rel.startswith("/") else Path.home() / rel


class LocalExecutor:
    """The same job script as a detached local process (a GPU workstation without Slurm)."""

    kind = "local"

    def submit(self, script: str, work_dir: str) -> tuple[str, int | None]:
        job_id = f"local-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        jobs = _local_path(_jobs_dir(work_dir))
        jobs.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = jobs / f"{job_id}.sh"
        path.write_text(script, encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["VIDCAP_LOCAL_JOB_ID"] = job_id
        log = _local_path(jobscript.log_path(work_dir, job_id))
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["sh", "-c", _LOCAL_WRAPPER, "vidcap-job", str(path), str(self._exit_file(work_dir, job_id))],
                cwd=Path.home(),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return job_id, proc.pid

    @staticmethod
    def _exit_file(work_dir: str, job_id: str) -> Path:
        return _local_path(_jobs_dir(work_dir)) / f"{job_id}.exit"

    def statuses(self, recs: Sequence[JobRecord]) -> dict[str, JobStatus]:
        found = {}
        for rec in recs:
            exit_file = _local_path(posixpath.dirname(rec.log)) / f"{rec.id}.exit"
            if exit_file.exists():
                code = exit_file.read_text().strip()
                if rec.cancelled or code == "143":
                    state = JobState.CANCELLED
                else:
                    state = JobState.COMPLETED if code == "0" else JobState.FAILED
                found[rec.id] = JobStatus(rec.id, state, node="localhost", exit_code=code)
            elif rec.pid and pid_alive(rec.pid):
                found[rec.id] = JobStatus(rec.id, JobState.RUNNING, node="localhost")
            else:
                found[rec.id] = JobStatus(rec.id, JobState.FAILED, reason="the process is gone")
        return found

    def running_ids(self) -> list[str]:
        recs = [r for r in load_records() if r.executor == "local"]
        return [i for i, s in self.statuses(recs).items() if s.state is JobState.RUNNING]

    def read(self, path: str) -> bytes | None:
        try:
            return _local_path(path).read_bytes()
        except OSError:
            return None

    def read_from(self, path: str, offset: int) -> bytes:
        try:
            with open(_local_path(path), "rb") as fh:
                fh.seek(offset)
                return fh.read()
        except OSError:
            return b""

    def read_glob(self, directory: str, patterns: Sequence[str]) -> bytes:
        root = _local_path(directory)
        chunks = []
        for pattern in patterns:
            for path in sorted(root.glob(pattern)):
                with contextlib.suppress(OSError):
                    chunks.append(path.read_bytes())
        return b"".join(chunks)

    def cancel(self, rec: JobRecord) -> None:
        if rec.pid and pid_alive(rec.pid):
            os.kill(rec.pid, signal.SIGTERM)

    @contextlib.contextmanager
    def http(self, node: str, port: int) -> Iterator[str]:
        yield f"http://127.0.0.1:{port}"

    def close(self) -> None:
        pass


def open_executor(profile: Profile, local: bool = False) -> Executor:
    """The local executor when asked or when the profile names no host; else Slurm over SSH."""
    if local or not profile.ssh.host:
        return LocalExecutor()
    from vidcap.transport import connect

    return SlurmExecutor(connect(profile.ssh))
