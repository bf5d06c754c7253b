"""A real single-node Slurm for tests: munged, MariaDB + slurmdbd (so that ``sacct`` works), slurmctld and
slurmd from Debian, all started as child processes with their state under one temp dir.

``SlurmCluster(root).start()`` brings it up (about 1-2 s); ``slurm_cluster`` is the session fixture. Client
commands find the cluster through ``SLURM_CONF`` (``cluster.env``); nothing under /etc is written or read
except the Debian binaries themselves. Commands run through sshd do not inherit the test's environment:
put ``SetEnv SLURM_CONF=<cluster.conf_path>`` in the sshd_config (OpenSSH >= 8.7), or prefix the remote
command with ``cluster.remote_prefix``.

Quirks this works around (Slurm 22.05 / munge 0.5 on Debian bookworm):

- munged refuses a socket dir that is not world-executable and a key that is not owned by its user; it
  runs as user ``munge`` from a private dir under /tmp (the pytest tmp dirs are 0700 root).
- The munge socket for slurmctld/slurmd/clients is ``AuthInfo=socket=...``, but the slurmctld -> slurmdbd
  connection and sacct ignore AuthInfo and use ``AccountingStoragePass`` as the munge socket instead.
- slurmd backs off (10 s, 20 s, ...) when it cannot register, so it starts only once slurmctld answers.
- slurmctld fails (fatal "no TRES from it") if slurmdbd is not up, so slurmdbd starts first.
- Without slurmdbd, sacct says "Slurm accounting storage is disabled" (use ``sacct -c`` with
  jobcomp/filetxt, or ``squeue -t all -j ID``); with it, ``sacct -j ID`` reports the final state.
- ``squeue -j ID`` lists a finished job only with ``-t all`` (until MinJobAge purges it).
- A GPU request no configured node could satisfy is refused by sbatch ("Requested node configuration is
  not available"; an unknown gres name: "Invalid generic resource (gres) specification"). So the
  partition also holds ``gpunode-never-up`` (DOWN, 8 x gpu:h100): ``--gres=gpu:h100:1`` or ``gpu:1`` is
  accepted and stays PENDING with reason "ReqNodeNotAvail, UnavailableNodes:gpunode-never-up".
- A batch step survives slurmd being stopped: stop() cancels all jobs first and then kills whatever
  still carries this cluster's SLURM_CONF in its environment.

PYTEST_DONT_REWRITE: no asserts here.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest

BINARIES = (
    "munged",
    "munge",
    "unmunge",
    "slurmctld",
    "slurmd",
    "slurmdbd",
    "sbatch",
    "squeue",
    "sacct",
    "scancel",
    "sinfo",
    "scontrol",
    "mariadbd",
    "mariadb-install-db",
    "mariadb",
)
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
PARTITION = "debug"
# A node that can never come up but owns the GPUs, so that a job asking for one is a valid request that
# stays PENDING; without it sbatch rejects the job ("Requested node configuration is not available").
GPU_NODE = "gpunode-never-up"
GPU_GRES = "gpu:h100:8"
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "REVOKED",
    }
)


def which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if which(name) is None]


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _mem_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _ancestors() -> set[int]:
    found, pid = set(), os.getpid()
    while pid > 1:
        found.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rpartition(")")[2].split()[1])
    return found


def pids_with_env(marker: bytes) -> list[int]:
    """Processes whose environment holds marker (e.g. b"SLURM_CONF=/path"), not counting us."""
    skip = _ancestors()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_local_job(job_id: str, grace: float = 10.0) -> None:
    """End every process of a local-executor job (the wrapper, the script, its servers in their own
    process groups): they all carry VIDCAP_LOCAL_JOB_ID in their environment. TERM, then KILL."""
    marker = f"VIDCAP_LOCAL_JOB_ID={job_id}".encode()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids_with_env(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and pids_with_env(marker):
            time.sleep(0.1)


def default_munge_works() -> bool:
    """A munged on the standard socket that encodes and decodes (``munge -n | unmunge``)."""
    munge, unmunge = which("munge"), which("unmunge")
    if munge is None or unmunge is None:
        return False
    try:
        cred = subprocess.run([munge, "-n"], capture_output=True, timeout=5)
        if cred.returncode != 0:
            return False
        return subprocess.run([unmunge], input=cred.stdout, capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """One node (this host, all its CPUs) in one partition, plus an unreachable GPU node for PENDING jobs.

    Jobs run as real processes of the submitting user (root). ``env`` holds SLURM_CONF for every client
    command; ``run()`` runs one with it.
    """

    def __init__(self, root: Path, *, cluster_name: str = "vidcaptest") -> None:
        self.root = root
        self.cluster_name = cluster_name
        self.hostname = socket.gethostname().split(".")[0]
        self.node = self.hostname
        self.partition = PARTITION
        self.gpu_node = GPU_NODE
        self.cpus = len(os.sched_getaffinity(0))
        self.real_memory = max(256, _mem_total_mb() - 1024)
        self.conf_path = root / "etc" / "slurm.conf"
        self.dbd_conf_path = root / "etc" / "slurmdbd.conf"
        self.log_dir = root / "log"
        self.jobs_dir = root / "jobs"
        self.ports = {name: free_port() for name in ("slurmctld", "slurmd", "slurmdbd", "mariadb", "gpunode")}
        self.env = {"SLURM_CONF": str(self.conf_path)}
        self.remote_prefix = f"SLURM_CONF={shlex.quote(str(self.conf_path))} "
        self.munge_socket: str | None = None  # None: the standard one
        self.run_dir: Path | None = None  # under /tmp: munged must reach it as user munge
        self.timings: dict[str, float] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._db_password = os.urandom(12).hex()

    # client commands

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        exe = which(cmd[0]) or cmd[0]
        result = subprocess.run(
            [exe, *cmd[1:]],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            cwd=self.jobs_dir if self.jobs_dir.is_dir() else None,
        )
        if check and result.returncode != 0:
            raise SlurmError(
                f"{shlex.join(cmd)} exited with {result.returncode}: {result.stderr.strip()}"
                f" {result.stdout.strip()}"
            )
        return result

    def submit(
        self, script_text: str, *args: str, script_args: Sequence[str] = (), name: str | None = None
    ) -> str:
        """``sbatch --parsable ARGS SCRIPT SCRIPT_ARGS`` with the script written to jobs/ (also the
        working directory); returns the job id. Raises SlurmError with sbatch's message if rejected."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=(name or "job") + "-", suffix=".sbatch", dir=self.jobs_dir)
        with os.fdopen(fd, "w") as f:
            f.write(script_text)
        result = self.run("sbatch", "--parsable", *args, path, *script_args)
        return result.stdout.strip().split(";")[0]

    def squeue(self, job_id: str, fmt: str = "%T") -> str | None:
        """One field of the job from squeue (finished jobs too, until MinJobAge); None if it has gone."""
        result = self.run("squeue", "-h", "-t", "all", "-j", job_id, "-o", fmt, check=False)
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines:
            return None
        return lines[0].strip()

    def sacct(self, job_id: str, fields: str = "State,ExitCode,Reason") -> dict[str, str] | None:
        """The job's allocation line from sacct (``sacct -X -P -n -j ID``); None if sacct has no record."""
        names = fields.split(",")
        result = self.run("sacct", "-X", "-P", "-n", "-j", job_id, "-o", fields, check=False)
        for line in result.stdout.splitlines():
            values = line.split("|")
            if len(values) == len(names):
                return dict(zip(names, values, strict=True))
        return None

    def state(self, job_id: str) -> str:
        """PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ... (squeue, else sacct; UNKNOWN if neither)."""
        state = self.squeue(job_id)
        if state is None:
            record = self.sacct(job_id)
            state = record["State"] if record else None
        # sacct says "CANCELLED by 0"; squeue says "CANCELLED"
        return state.split()[0] if state else "UNKNOWN"

    def reason(self, job_id: str) -> str:
        return self.squeue(job_id, "%r") or ""

    def wait_state(self, job_id: str, states: str | Iterable[str], timeout: float = 30) -> str:
        """Wait until the job is in one of states (a name or names); returns it. Fails on timeout, or
        when the job reaches a final state that was not asked for."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in wanted:
                return state
            if state in FINAL_STATES:
                break
            time.sleep(0.1)
        raise SlurmError(
            f"job {job_id} is {state} ({self.reason(job_id)}), not {sorted(wanted)}\n{self.log_tail()}"
        )

    def cancel(self, job_id: str, *args: str) -> None:
        self.run("scancel", *args, job_id)

    def node_state(self, node: str | None = None) -> str:
        return self.run("sinfo", "-h", "-N", "-n", node or self.node, "-o", "%T").stdout.strip()

    # configuration

    def slurm_conf(self) -> str:
        auth = [f"AuthInfo=socket={self.munge_socket}"] if self.munge_socket else []
        # the slurmdbd connection (slurmctld and sacct) takes its munge socket from here, not AuthInfo
        dbd_auth = [f"AccountingStoragePass={self.munge_socket}"] if self.munge_socket else []
        lines = [
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={self.ports['slurmctld']}",
            f"SlurmdPort={self.ports['slurmd']}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            *auth,
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            # without a default every job takes all the node's memory and jobs run one at a time
            "DefMemPerCPU=256",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            # finished jobs stay in squeue -t all / scontrol for an hour (sacct has them anyway)
            "MinJobAge=3600",
            # seconds between SIGTERM and SIGKILL at scancel/timeout (default 30)
            "KillWait=2",
            "InactiveLimit=0",
            "SlurmdTimeout=300",
            "SlurmctldTimeout=60",
            "MessageTimeout=10",
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=127.0.0.1",
            f"AccountingStoragePort={self.ports['slurmdbd']}",
            *dbd_auth,
            "JobCompType=jobcomp/none",
            "GresTypes=gpu",
            f"NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.hostname} CPUs={self.cpus}"
            f" RealMemory={self.real_memory} State=UNKNOWN",
            # big enough for any real GPU job's --cpus-per-task/--mem, so those pend rather than fail
            f"NodeName={self.gpu_node} NodeAddr=127.0.0.1 Port={self.ports['gpunode']} CPUs=64"
            f" RealMemory=1024000 Gres={GPU_GRES} State=DOWN Reason=never_up",
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        return "# written by vidcap tests/slurm.py\n" + "\n".join(lines) + "\n"

    def gres_conf(self) -> str:
        # Count only, no device files: the never-up node never has to prove it has them.
        return f"NodeName={self.gpu_node} Name=gpu Type=h100 Count=8\n"

    def slurmdbd_conf(self) -> str:
        auth = [f"AuthInfo=socket={self.munge_socket}"] if self.munge_socket else []
        lines = [
            "AuthType=auth/munge",
            *auth,
            "DbdHost=localhost",
            "DbdAddr=127.0.0.1",
            f"DbdPort={self.ports['slurmdbd']}",
            "SlurmUser=root",
            f"PidFile={self.root / 'slurmdbd.pid'}",
            f"LogFile={self.log_dir / 'slurmdbd.log'}",
            "DebugLevel=info",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            f"StoragePort={self.ports['mariadb']}",
            "StorageUser=slurm",
            f"StoragePass={self._db_password}",
            "StorageLoc=slurm_acct_db",
        ]
        return "\n".join(lines) + "\n"

    # lifecycle

    def start(self) -> None:
        if os.geteuid() != 0:
            raise SlurmError("slurmd and munged need root")
        t0 = time.monotonic()
        try:
            for sub in ("etc", "state", "spool", "log", "jobs", "mariadb"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self._start_munge()
            self._start_mariadb()
            self.conf_path.write_text(self.slurm_conf())
            (self.conf_path.parent / "gres.conf").write_text(self.gres_conf())
            self.dbd_conf_path.write_text(self.slurmdbd_conf())
            self.dbd_conf_path.chmod(0o600)  # slurmdbd refuses a readable one
            self._start_slurmdbd()
            self._start_slurmctld()
            self._start_slurmd()
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - t0

    def _spawn(self, name: str, cmd: list[str], *, user: str | None = None) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.out", "ab")  # noqa: SIM115 - the daemon writes to it until stop()
        kwargs = {}
        if user is not None:
            entry = pwd.getpwnam(user)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            start_new_session=True,  # a Ctrl-C in the terminal goes to pytest, which stops us in order
            **kwargs,  # type: ignore[arg-type]
        )
        log.close()
        self._procs[name] = proc
        return proc

    def _wait(self, name: str, ready: object, timeout: float = 30) -> None:
        t0 = time.monotonic()
        proc = self._procs[name]
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            if ready():  # type: ignore[operator]
                self.timings[name] = time.monotonic() - t0
                return
            time.sleep(0.05)
        raise SlurmError(f"{name} was not ready after {timeout} s:\n{self.log_tail(name)}")

    def _start_munge(self) -> None:
        if default_munge_works():
            self.munge_socket = None
            return
        # munged checks: socket dir executable by all, key owned by munge and 0400/0600, no group/world
        # writable dirs above them (sticky /tmp is fine). pytest's tmp dirs are 0700 root, hence /tmp.
        entry = pwd.getpwnam("munge")
        self.run_dir = Path(tempfile.mkdtemp(prefix="vidcap-munge-", dir="/tmp"))
        self.run_dir.chmod(0o711)
        os.chown(self.run_dir, entry.pw_uid, entry.pw_gid)
        key = self.run_dir / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        os.chown(key, entry.pw_uid, entry.pw_gid)
        self.munge_socket = str(self.run_dir / "munge.socket")
        self._spawn(
            "munged",
            [
                which("munged") or "munged",
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.run_dir / 'munged.pid'}",
                f"--log-file={self.run_dir / 'munged.log'}",
                f"--seed-file={self.run_dir / 'munged.seed'}",
                "--num-threads=10",  # slurmctld's advice when it is busy
            ],
            user="munge",
        )
        munge = which("munge") or "munge"
        self._wait(
            "munged",
            lambda: (
                subprocess.run([munge, "-n", "-S", self.munge_socket], capture_output=True).returncode == 0
            ),
        )

    def _mariadb_socket(self) -> Path:
        # a unix socket path must stay under 108 bytes; the pytest tmp path can be long
        base = self.run_dir or Path(tempfile.mkdtemp(prefix="vidcap-slurm-", dir="/tmp"))
        if self.run_dir is None:
            self.run_dir = base
        return base / "mariadb.sock"

    def _start_mariadb(self) -> None:
        datadir = self.root / "mariadb"
        sock = self._mariadb_socket()
        install = subprocess.run(
            [
                which("mariadb-install-db") or "mariadb-install-db",
                "--no-defaults",
                f"--datadir={datadir / 'data'}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            capture_output=True,
            text=True,
        )
        if install.returncode != 0:
            raise SlurmError(f"mariadb-install-db failed: {install.stdout}{install.stderr}")
        self._spawn(
            "mariadb",
            [
                which("mariadbd") or "mariadbd",
                "--no-defaults",
                f"--datadir={datadir / 'data'}",
                "--user=root",
                f"--socket={sock}",
                "--bind-address=127.0.0.1",
                f"--port={self.ports['mariadb']}",
                f"--pid-file={datadir / 'mariadbd.pid'}",
                f"--log-error={self.log_dir / 'mariadb.log'}",
                "--skip-name-resolve",
                # slurmdbd still logs "Database settings not recommended values" for the pool size: harmless
                "--innodb-buffer-pool-size=128M",
                "--innodb-lock-wait-timeout=900",
                "--innodb-flush-log-at-trx-commit=0",
            ],
        )
        client = which("mariadb") or "mariadb"

        def sql(statement: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [client, "--no-defaults", "-S", str(sock), "-uroot", "-e", statement],
                capture_output=True,
                text=True,
            )

        self._wait("mariadb", lambda: sock.exists() and sql("SELECT 1").returncode == 0)
        grant = sql(
            f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{self._db_password}';"
            " GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
        )
        if grant.returncode != 0:
            raise SlurmError(f"mariadb: {grant.stderr}")

    def _start_slurmdbd(self) -> None:
        self._spawn("slurmdbd", [which("slurmdbd") or "slurmdbd", "-D"])
        self._wait("slurmdbd", lambda: _port_open(self.ports["slurmdbd"]))

    def _start_slurmctld(self) -> None:
        self._spawn("slurmctld", [which("slurmctld") or "slurmctld", "-D", "-i"])
        self._wait("slurmctld", lambda: self.run("scontrol", "ping", check=False).returncode == 0)

    def _start_slurmd(self) -> None:
        self._spawn("slurmd", [which("slurmd") or "slurmd", "-D", "-N", self.node])
        self._wait("slurmd", lambda: self.node_state() == "idle")

    def running(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs.values())

    def stop(self) -> None:
        """Cancel every job, stop the daemons (newest first), kill whatever job processes are left."""
        t0 = time.monotonic()
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            with contextlib.suppress(SlurmError, subprocess.TimeoutExpired, OSError):
                self.run("scancel", "--full", f"--partition={self.partition}", check=False, timeout=10)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    if not self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.strip():
                        break
                    time.sleep(0.1)
        self.timings["stop_jobs"] = time.monotonic() - t0
        # slurmctld before slurmd: the other way round it waits ~5 s for a hung agent to the gone slurmd
        order = ["slurmctld", "slurmd", "slurmdbd", "mariadb", "munged"]
        for name in sorted(self._procs, key=lambda n: order.index(n) if n in order else -1):
            t1 = time.monotonic()
            proc = self._procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:  # slurmd ignores SIGTERM while it retries to register
                    proc.kill()
                    proc.wait()
            self.timings[f"stop_{name}"] = time.monotonic() - t1
        # slurmstepd and job processes inherit SLURM_CONF from slurmd / the submitting environment
        marker = f"SLURM_CONF={self.conf_path}".encode()
        for _ in range(50):
            pids = pids_with_env(marker)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def log_tail(self, name: str | None = None, lines: int = 20) -> str:
        """The last lines of one daemon's log (slurmctld, slurmd, slurmdbd, munged, mariadb), or of all."""
        names = [name] if name else ["slurmctld", "slurmd", "slurmdbd"]
        out = []
        for n in names:
            candidates = [self.log_dir / f"{n}.log", self.log_dir / f"{n}.out"]
            if n == "munged" and self.run_dir is not None:
                candidates.insert(0, self.run_dir / "munged.log")
            for path in candidates:
                with contextlib.suppress(OSError):
                    text = path.read_text(errors="replace").splitlines()
                    if text:
                        out.append(f"--- {path.name}\n" + "\n".join(text[-lines:]))
                        break
        return "\n".join(out)


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running single-node Slurm for the whole session; ``.env`` has SLURM_CONF for client commands."""
    from conftest import require_integration

    missing = missing_binaries()
    if missing:
        require_integration(f"Slurm ({', '.join(missing)}; run scripts/setup.sh as root)")
    if os.geteuid() != 0:
        require_integration("Slurm (slurmd and munged must be started as root)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmError as e:
        pytest.fail(f"Slurm did not start: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
