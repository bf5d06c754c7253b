"""SSH to the login node: run a remote command given as argv, upload, download, forward a local port.

One small blocking interface (async callers wrap calls in ``asyncio.to_thread``), two backends chosen by
``SSHConfig.backend``:

- ``"sshtunnel"`` (default, vidcap.transport_paramiko): paramiko in this process. Key file or agent
  auth; the OpenSSH client config for HostName/User/Port/IdentityFile/ProxyCommand/ProxyJump (explicit
  profile values win); jump hosts as direct-tcpip channels; SFTP; keepalive; host keys checked against
  known_hosts by vidcap.known_hosts; forwards by vidcap.forward.
- ``"openssh"`` (vidcap.transport_openssh): the system ``ssh``/``scp`` through one ControlMaster, so MFA,
  GSSAPI and the user's ~/.ssh/config work as they do in a terminal and a second factor is asked once.

Both backends refuse an unknown host key unless ``accept_new_host_key`` (then the key is appended to
known_hosts, like ``StrictHostKeyChecking=accept-new``, and ``Transport.notes`` says so) and always
refuse a CHANGED key, with :class:`HostKeyError`; jump hosts are checked the same way. Remote commands
are argv: the remote login shell receives ``shlex.join(argv)`` and parses it back into exactly that argv
(a POSIX shell is assumed on the cluster). Nothing secret ever goes into argv or the log: commands are
logged at DEBUG, stdin never.

Why the "sshtunnel" backend does not use ``sshtunnel.SSHTunnelForwarder`` (sshtunnel 0.5.1, read):
it always opens its own ``paramiko.Transport`` in ``_connect_to_gateway`` (no way to hand it our
authenticated connection, so each forwarder would log in again and jump hosts would be rebuilt inside
it); its host key check is ``Transport.connect(hostkey=...)`` with one pinned key and *no check at all*
when none is given -- no known_hosts, no unknown-vs-changed distinction, no accept-new; a taken local
port is logged rather than raised unless ``mute_exceptions`` is off; and its handler drops the whole
connection at the first EOF from either side (no half-close). So the backend keeps the config
name "sshtunnel" but forwards with vidcap.forward: a local listener and one direct-tcpip channel per
accepted connection on our own verified paramiko Transport. The sshtunnel package itself is not needed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shlex
import socket
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

from vidcap.config import SSHConfig
from vidcap.errors import ConfigError, TransportError

log = logging.getLogger("vidcap.transport")

STDERR_TAIL_LINES = 8


@dataclass(frozen=True)
class Completed:
    """The result of a remote command (like ``subprocess.CompletedProcess``)."""

    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes


class Forward(Protocol):
    """A local listening port carried to remote_host:remote_port (as the login node sees it) through SSH."""

    local_port: int
    remote_host: str
    remote_port: int

    def close(self) -> None: ...


class Transport(ABC):
    """A connection to one login node. Blocking; thread-safe for concurrent run/upload/download."""

    #: Things the user should know that are not errors, e.g. a host key that was accepted and added.
    notes: list[str]

    @abstractmethod
    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> Completed:
        """Run exactly ``argv`` on the login node; ``check`` raises TransportError on a non-zero exit."""

    @abstractmethod
    def upload(self, local: Path, remote: str) -> None:
        """Copy a local file to ``remote`` (absolute, or relative to the login directory; ``~/`` works)."""

    @abstractmethod
    def download(self, remote: str, local: Path) -> None:
        """Copy a remote file here; ``local`` appears complete or not at all (temp file + rename)."""

    @abstractmethod
    def forward(
        self, local_port: int, remote_host: str, remote_port: int, *, local_host: str = "127.0.0.1"
    ) -> Forward:
        """Listen on local_host:local_port (0 = any free port) and carry connections to the remote side."""

    @abstractmethod
    def alive(self) -> bool:
        """A cheap check that the SSH connection still carries traffic."""

    @abstractmethod
    def close(self) -> None:
        """Close the forwards and the connection. Idempotent."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect(ssh: SSHConfig, *, control_dir: Path | None = None) -> Transport:
    """Open a Transport for a profile's ssh settings.

    ``control_dir`` is where the openssh backend keeps its ControlMaster socket (default:
    ``vidcap.config.state_dir()/ssh``); the sshtunnel backend ignores it.
    """
    if not ssh.host:
        raise ConfigError('this profile has no ssh.host; set it (e.g. host = "login.cluster.org")')
    if ssh.backend == "openssh":
        from vidcap.transport_openssh import OpenSSHTransport

        return OpenSSHTransport(ssh, control_dir=control_dir)
    from vidcap.transport_paramiko import ParamikoTransport

    return ParamikoTransport(ssh)


# ---- helpers shared by the backends -------------------------------------------------------------


def command_line(argv: Sequence[str]) -> tuple[list[str], str]:
    """The argv as a list of str and the one line a remote shell parses back into exactly that list."""
    args = [os.fspath(a) for a in argv]
    if not args:
        raise ValueError("argv must not be empty")
    if any("\0" in a for a in args):
        raise ValueError("argv items cannot contain NUL bytes")
    return args, shlex.join(args)


def show_command(argv: Sequence[str], limit: int = 160) -> str:
    line = shlex.join(argv)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def stderr_tail(stderr: bytes | str, lines: int = STDERR_TAIL_LINES) -> str:
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    kept = [line.rstrip() for line in text.replace("\r", "").splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def finish(args: list[str], returncode: int, stdout: bytes, stderr: bytes, check: bool) -> Completed:
    done = Completed(args, returncode, stdout, stderr)
    if check and returncode != 0:
        what = "was killed (no exit status)" if returncode < 0 else f"exited with code {returncode}"
        tail = stderr_tail(stderr)
        raise TransportError(
            f"remote command {show_command(args)} {what}" + (f"; stderr: {tail}" if tail else "")
        )
    return done


def parse_jump(spec: str) -> list[tuple[str | None, str, int | None]]:
    """``[user@]host[:port][,...]`` (ProxyJump syntax) -> [(user, host, port)], first hop first."""
    hops = []
    for part in spec.split(","):
        part = part.strip()
        part = part.removeprefix("ssh://")
        user, _, hostport = part.rpartition("@")
        if hostport.startswith("["):
            host, _, rest = hostport[1:].partition("]")
            port_text = rest.removeprefix(":")
        elif hostport.count(":") == 1:
            host, _, port_text = hostport.partition(":")
        else:
            host, port_text = hostport, ""
        if not host or (port_text and not port_text.isdigit()):
            raise ConfigError(f"ssh.jump {spec!r}: expected [user@]host[:port], comma-separated for a chain")
        hops.append((user or None, host, int(port_text) if port_text else None))
    return hops


def remote_path(remote: str) -> str:
    """SFTP paths are relative to the login directory already; a leading ``~/`` means the same."""
    if remote in ("", "~", "~/") or remote.endswith("/"):
        raise ValueError(f"remote path {remote!r} must name a file")
    return remote[2:] if remote.startswith("~/") else remote


def remote_temp(remote: str) -> str:
    """A sibling temp name, so the final rename is atomic on the remote filesystem."""
    head, _, name = remote.rpartition("/")
    tmp = f".{name}.vidcap-{os.urandom(4).hex()}.part"
    return f"{head}/{tmp}" if head or remote.startswith("/") else tmp


def local_temp(local: Path) -> tuple[int, Path]:
    import tempfile

    local.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".part")
    return fd, Path(name)


def bind_listener(local_host: str, local_port: int) -> socket.socket:
    """A listening socket, or TransportError naming the port when it is taken."""
    family = socket.AF_INET6 if ":" in local_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((local_host, local_port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise TransportError(
                f"local port {local_port} is in use on {local_host}; stop what listens there "
                f"(see 'ss -ltnp' or 'lsof -i :{local_port}') or choose another port"
            ) from exc
        raise TransportError(f"cannot listen on {local_host}:{local_port}: {exc.strerror or exc}") from exc
    return sock


def free_port(local_host: str) -> int:
    with contextlib.closing(bind_listener(local_host, 0)) as sock:
        return int(sock.getsockname()[1])


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def host_key_name(host: str, port: int) -> str:
    """How known_hosts names a host: bare on port 22, ``[host]:port`` otherwise (as OpenSSH writes it)."""
    return host if port == 22 else f"[{host}]:{port}"


def expand(path: str) -> Path:
    return Path(path).expanduser()
