"""A real OpenSSH sshd on 127.0.0.1 for tests, with generated host and user keys.

``sshd_session`` starts one server per test session (about 0.1 s, but keys and config are made once);
``sshd_server`` hands it to one test after putting it back in its normal state (original host key,
running, no connections left from the previous test, the canonical known_hosts).

Client-side files live in a directory whose name has a space, a quote and a ``%`` so that every test
also checks how the backends pass paths to ssh.

PYTEST_DONT_REWRITE: no asserts here, and test modules may import this before it is registered as a
plugin, which would otherwise warn.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from vidcap.config import SSHConfig

SSHD = "/usr/sbin/sshd"
HOST = "127.0.0.1"


def _keygen(path: Path, comment: str) -> None:
    for old in (path, path.with_name(path.name + ".pub")):
        old.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """All descendants of pid (Linux /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):  # a process may end while we read
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class SSHServer:
    def __init__(self, root: Path, extra_config: Sequence[str] = ()) -> None:
        self.root = root
        self.extra_config = list(extra_config)  # sshd_config lines appended after ours
        self.host = HOST
        self.user = getpass.getuser()
        self.port = _free_port()
        client = root / "client keys 'q' %d $(x)"
        client.mkdir(parents=True)
        self.identity_file = client / "id_ed25519"
        self.known_hosts = client / "known_hosts"
        self.host_key = root / "ssh_host_ed25519_key"
        self.config_path = root / "sshd_config"
        self.log_path = root / "sshd.log"
        _keygen(self.host_key, "vidcap-test-host")
        self._original_host_key = self.host_key.read_bytes(), self.host_key.with_suffix(".pub").read_bytes()
        _keygen(self.identity_file, "vidcap-test-user")
        (root / "authorized_keys").write_bytes(self.identity_file.with_name("id_ed25519.pub").read_bytes())
        self._write_config()
        self.write_known_hosts()
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> None:
        lines = [
            f"ListenAddress {HOST}",
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            f"PidFile {self.root / 'sshd.pid'}",
            "UsePAM no",
            "StrictModes no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "AllowTcpForwarding yes",
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
            # Many quick connections from one address must not look like an attack.
            "MaxStartups 100",
            "PerSourcePenalties no",
        ]
        self.config_path.write_text("\n".join([*lines, *self.extra_config]) + "\n")
        if subprocess.run([SSHD, "-t", "-f", str(self.config_path)], capture_output=True).returncode != 0:
            # Older sshd (< 9.8) does not know PerSourcePenalties and has no penalties to turn off.
            self.config_path.write_text("\n".join([*lines[:-1], *self.extra_config]) + "\n")
        check = subprocess.run([SSHD, "-t", "-f", str(self.config_path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"sshd rejects the test config: {check.stderr}")

    def known_hosts_line(self) -> str:
        keytype, blob = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return f"[{HOST}]:{self.port} {keytype} {blob}\n"

    def write_known_hosts(self) -> None:
        self.known_hosts.write_text(self.known_hosts_line())

    def ssh_config(self, backend: str = "sshtunnel", **overrides: Any) -> SSHConfig:
        values: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "user": self.user,
            "identity_file": str(self.identity_file),
            "known_hosts": str(self.known_hosts),
            "config_file": None,
            "backend": backend,
            "keepalive": 5,
            "connect_timeout": 5.0,
        }
        values.update(overrides)
        return SSHConfig(**values)

    # lifecycle

    def start(self) -> None:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        log = open(self.log_path, "ab")  # noqa: SIM115 - the server writes to it until stop()
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config_path)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return
            time.sleep(0.02)
        raise RuntimeError(f"sshd did not listen on {self.port}: {self.log_tail()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop the listener and every connection it spawned."""
        if self.proc is None:
            return
        self.kill_connections()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Same port, same keys; connections die, as when the login node reboots."""
        self.stop()
        self.start()

    def kill_connections(self) -> None:
        """Kill the per-connection sshd processes (and what they run) but keep the listener."""
        if self.proc is None:
            return
        for pid in reversed(descendants(self.proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while descendants(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)

    def connection_count(self) -> int:
        return 0 if self.proc is None else len(descendants(self.proc.pid))

    def rotate_host_key(self) -> None:
        """A new host key (the reinstalled-server or man-in-the-middle case); known_hosts is left as is."""
        _keygen(self.host_key, "vidcap-test-host-rotated")
        self.restart()

    def reset(self) -> None:
        key, pub = self._original_host_key
        if self.host_key.read_bytes() != key:
            self.host_key.write_bytes(key)
            self.host_key.with_suffix(".pub").write_bytes(pub)
            self.stop()
        if not self.running():
            self.start()
        self.kill_connections()
        self.write_known_hosts()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def _require_sshd() -> None:
    if not Path(SSHD).exists() or shutil.which("ssh-keygen") is None:
        from conftest import require_integration

        require_integration("OpenSSH sshd (/usr/sbin/sshd) and ssh-keygen")


def set_env_line(env: dict[str, str]) -> str:
    """The one sshd_config ``SetEnv`` line (OpenSSH >= 8.7) for all of ``env``: sshd uses only the first
    SetEnv line it reads, so a second one would be ignored without a word."""
    words = []
    for name, value in env.items():
        if any(ch in name + value for ch in '"\\\n'):
            raise ValueError(f"SetEnv {name}={value!r} cannot be written on an sshd_config line")
        words.append(f'"{name}={value}"')
    return "SetEnv " + " ".join(words)


@pytest.fixture(scope="session")
def sshd_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    _require_sshd()
    server = SSHServer(tmp_path_factory.mktemp("sshd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sshd_server(sshd_session: SSHServer) -> Iterator[SSHServer]:
    sshd_session.reset()
    yield sshd_session
    sshd_session.kill_connections()


# The PATH sshd gives a root session on Debian, after the venv's bin (see slurm_sshd).
LOGIN_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def write_profile(path: Path, ssh: SSHConfig | dict[str, Any], **paths: str) -> None:
    """A config whose one profile, 'cluster', reaches a test sshd with ``ssh`` (never the user's
    ~/.ssh/config) and has the given ``paths`` (videos_dir, captions_dir, ...)."""
    values = ssh.model_dump() if isinstance(ssh, SSHConfig) else ssh
    lines = ['default_profile = "cluster"', "[profiles.cluster.ssh]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None]
    if values.get("config_file") is None:
        lines.append('config_file = ""')
    lines += ["[profiles.cluster.paths]", *(f"{k} = {json.dumps(v)}" for k, v in paths.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def venv_bin() -> str:
    return str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def slurm_sshd(slurm_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """An sshd of its own that plays the login node of the test Slurm (``slurm_cluster``).

    Every command run through it starts with that cluster's ``SLURM_CONF`` and with this venv's bin first
    on PATH (sshd_config ``SetEnv``), so ``sinfo``, ``squeue``, ``sbatch``, ``sacct``, ``scancel`` and
    ``vidcap`` resolve with no prefix in the command, as on a real login node; jobs submitted through it
    inherit both (sbatch exports the environment). The login shell's rc files still run and may
    put their own directories before that PATH (root's ~/.bashrc here adds pyenv's shims, so ``python3``
    is not necessarily the venv's), as they would on a cluster. Same keys and known_hosts layout as
    ``sshd_server``; ``ssh_config()`` gives the SSHConfig. Module-scoped: a test that changes it
    (rotate_host_key, stop) calls ``reset()`` when done.
    """
    _require_sshd()
    env = {"SLURM_CONF": str(slurm_cluster.conf_path), "PATH": os.pathsep.join([venv_bin(), *LOGIN_PATH])}
    server = SSHServer(tmp_path_factory.mktemp("slurm-sshd"), extra_config=[set_env_line(env)])
    server.start()
    try:
        yield server
    finally:
        server.stop()
