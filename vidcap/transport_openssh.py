"""The "openssh" backend: the system ssh/scp with one ControlMaster per set of ssh settings.

The first use starts ``ssh -M -N -f -o ControlPersist=600`` (a second factor is asked once, on the
terminal; BatchMode when stdin is not a TTY); every later command, scp and ``-O forward|cancel|check``
goes through its socket. The user's ~/.ssh/config applies as it does in a terminal. ``close()`` cancels
this Transport's forwards and ends the master (``-O exit``) only if this Transport started it: a master
that another process started (``vidcap tunnel up``) is left to it and to ControlPersist.

Jump hosts are a ProxyCommand that runs ``ssh -W`` with our options, not ``-J``: OpenSSH turns ``-J``
into a child ssh that receives only -l/-p/-F/-J, so the jump host's key would be checked against
~/.ssh/known_hosts with the default policy instead of ``ssh.known_hosts`` and ours.

Option values that are paths are double-quoted with ``%`` doubled, because ssh splits them on spaces
and expands ``%`` tokens; ``-i`` is not used for the same reason. scp runs in SFTP mode (``-s``), so a
remote path never meets a remote shell; its glob characters are escaped on download, and an upload goes
to a sibling temp name and is renamed with ``mv`` so readers on the cluster never see half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from vidcap import config
from vidcap.config import SSHConfig
from vidcap.errors import HostKeyError, TransportError
from vidcap.transport import (
    Completed,
    Transport,
    bind_listener,
    bracket,
    command_line,
    expand,
    finish,
    free_port,
    local_temp,
    parse_jump,
    remote_path,
    remote_temp,
    show_command,
    stderr_tail,
)

log = logging.getLogger("vidcap.transport")

CONTROL_PERSIST = 600
_SUN_PATH_MAX = 100  # 104 on macOS, 108 on Linux; ssh adds ".XXXXXXXXXXXXXXXX" while binding
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_./+-]+")
_TARGET = "VIDCAP_JUMP_TARGET"
_NO_MASTER = "vidcap: the ssh ControlMaster is gone"
# ssh's own complaints (exit 255), as opposed to a remote command that exits 255.
_SSH_FAILURES = (
    "ssh: ",
    "Host key verification failed",
    "Permission denied (",
    "Connection closed by",
    "Connection reset by",
    "Connection timed out",
    "Connection refused",
    "kex_exchange_identification",
    "Could not resolve hostname",
    "mux_client",
    "Control socket",
    "ControlPath",
    "Bad configuration option",
    "Too many authentication failures",
    _NO_MASTER,
)


def quote_value(path: Path | str) -> str:
    """A path as an ssh_config value: quoted against splitting, ``%`` doubled against token expansion."""
    text = str(path)
    if '"' in text or "\n" in text:
        raise TransportError(
            f"{text!r}: OpenSSH cannot take a path with a double quote or newline; rename it"
        )
    return '"' + text.replace("%", "%%") + '"'


def config_file_options(ssh: SSHConfig) -> list[str]:
    """``-F`` only for a non-default file: with -F, ssh would skip /etc/ssh/ssh_config too."""
    if not ssh.config_file:
        return ["-F", "none"]
    path = expand(ssh.config_file)
    if not path.is_file():
        return ["-F", "none"]
    if path == Path("~/.ssh/config").expanduser():
        return []
    return ["-F", str(path)]


def shared_options(ssh: SSHConfig, *, batch: bool) -> list[str]:
    """What every hop needs: host key policy, identity, timeouts."""
    opts = config_file_options(ssh)
    opts += [
        "-o", f"UserKnownHostsFile={quote_value(expand(ssh.known_hosts))}",
        "-o", f"StrictHostKeyChecking={'accept-new' if ssh.accept_new_host_key else 'yes'}",
        "-o", f"ConnectTimeout={max(1, math.ceil(ssh.connect_timeout))}",
    ]  # fmt: skip
    if ssh.identity_file:
        opts += ["-o", f"IdentityFile={quote_value(expand(ssh.identity_file))}", "-o", "IdentitiesOnly=yes"]
    if ssh.keepalive:
        opts += ["-o", f"ServerAliveInterval={ssh.keepalive}", "-o", "ServerAliveCountMax=3"]
    if batch:
        opts += ["-o", "BatchMode=yes"]
    return opts


def proxy_command(ssh_bin: str, jump: str, opts: Sequence[str], log_file: Path | None = None) -> str:
    """A ProxyCommand reaching the target through each jump host in turn, each hop with our options.

    Every nesting level is %-expanded once by the ssh that runs it, hence the doubling per level.
    ``log_file`` gets the hops' messages: a ControlPersist master sends its ProxyCommand's stderr to
    /dev/null, which would hide why a jump host was refused.
    """
    command = None
    for user, host, port in parse_jump(jump):
        argv = [ssh_bin, *opts]
        if log_file is not None:
            argv += ["-E", str(log_file), "-o", "LogLevel=DEBUG1"]
        if command:
            argv += ["-o", f"ProxyCommand={command}"]
        if user:
            argv += ["-l", user]
        if port:
            argv += ["-p", str(port)]
        argv += ["-W", _TARGET, "--", host]
        command = shlex.join(argv).replace("%", "%%").replace(_TARGET, "'[%h]:%p'")
    assert command is not None
    return command


def control_path(control_dir: Path, ssh: SSHConfig) -> Path:
    """One master per distinct set of ssh settings, in a private directory, short enough for a socket."""
    name = hashlib.sha256(ssh.model_dump_json().encode()).hexdigest()[:20]
    fallback = Path(tempfile.gettempdir()) / f"vidcap-ssh-{os.getuid()}"
    for directory in (control_dir, fallback):
        path = directory / name
        if len(os.fsencode(path)) + 17 <= _SUN_PATH_MAX and _PLAIN_PATH.fullmatch(str(path)):
            _private_dir(directory)
            return path
    raise TransportError(
        f"no usable directory for the ssh ControlMaster socket (tried {control_dir}, {fallback})"
    )


def ssh_command(ssh: SSHConfig, *, batch: bool, control_dir: Path | None = None) -> list[str]:
    """ssh and its options, up to the host, for programs that run ssh themselves (``rsync -e``).

    The same host key policy, identity, port, user, timeouts and jump hops as this backend; with backend
    "openssh" also its ControlMaster socket (``ControlMaster=no``: the master is used when one is up,
    e.g. from ``vidcap tunnel up``, and ssh logs in by itself when none is).
    """
    ssh_bin = _which("ssh")
    opts = shared_options(ssh, batch=batch)
    if ssh.user:
        opts += ["-o", f"User={ssh.user}"]
    if "port" in ssh.model_fields_set or ssh.port != 22:
        opts += ["-o", f"Port={ssh.port}"]
    if ssh.jump:
        opts += ["-o", f"ProxyCommand={proxy_command(ssh_bin, ssh.jump, shared_options(ssh, batch=batch))}"]
    if ssh.backend == "openssh":
        path = control_path(control_dir or config.state_dir() / "ssh", ssh)
        opts += ["-o", f"ControlPath={path}", "-o", "ControlMaster=no"]
    return [ssh_bin, *opts]


def _private_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = directory.stat()
    if st.st_uid != os.getuid():
        raise TransportError(f"{directory} belongs to another user; it cannot hold our ssh control socket")
    if st.st_mode & 0o077:
        directory.chmod(0o700)


def glob_escape(path: str) -> str:
    """scp (SFTP mode) globs a remote source; backslashes make these characters literal."""
    return re.sub(r"([\\*?\[\]{}])", r"\\\1", path)


def _which(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise TransportError(
            f"the openssh backend needs the {name} client (install openssh-client), "
            f'or use backend = "sshtunnel"'
        )
    return found


class OpenSSHTransport(Transport):
    def __init__(self, ssh: SSHConfig, *, control_dir: Path | None = None) -> None:
        self._ssh = ssh
        self._ssh_bin = _which("ssh")
        self._host = ssh.host or ""
        self.label = f"{ssh.user}@{ssh.host}" if ssh.user else self._host
        self._control = control_path(control_dir or config.state_dir() / "ssh", ssh)
        self._interactive = sys.stdin.isatty()
        self._known_hosts = expand(ssh.known_hosts)
        opts = shared_options(ssh, batch=not self._interactive)
        if ssh.user:
            opts += ["-o", f"User={ssh.user}"]
        if "port" in ssh.model_fields_set or ssh.port != 22:
            opts += ["-o", f"Port={ssh.port}"]
        self._jump_log = self._control.with_name(self._control.name + ".jump.log")
        jump_opts = []
        if ssh.jump:
            hops = proxy_command(
                self._ssh_bin, ssh.jump, shared_options(ssh, batch=not self._interactive), self._jump_log
            )
            jump_opts = ["-o", f"ProxyCommand={hops}"]
        if ssh.accept_new_host_key:
            self._known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        control = ["-o", f"ControlPath={self._control}"]
        self._opts = [*opts, *jump_opts, *control]
        # Later commands go through the master and must never prompt. When the master is gone, ssh would
        # silently log in anew; this ProxyCommand (used only then) makes that a clear error instead, as
        # on the sshtunnel backend, and callers reconnect explicitly.
        self._client_opts = [
            *opts, *control, "-o", "ControlMaster=no", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", f"ProxyCommand=sh -c 'echo {_NO_MASTER} >&2; exit 1'",
        ]  # fmt: skip
        self._forwards: list[MuxForward] = []
        self._lock = threading.Lock()
        self._started_master = False
        self._closed = False
        self.notes = []
        self._ensure_master()

    # the master

    def _mux(self, op: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
        argv = [self._ssh_bin, *self._opts, "-O", op, *extra, "--", self._host]
        try:
            return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        except subprocess.TimeoutExpired as exc:
            raise TransportError(f"ssh -O {op} on {self._control} did not answer within 30 s") from exc

    def _ensure_master(self) -> None:
        if self._mux("check").returncode == 0:
            log.debug("reusing the ssh master at %s", self._control)
            return
        # A master that died uncleanly leaves its socket behind and ssh would then refuse to bind it.
        self._control.unlink(missing_ok=True)
        argv = [
            self._ssh_bin, *self._opts,
            "-o", "ControlMaster=yes", "-o", f"ControlPersist={CONTROL_PERSIST}",
            # DEBUG1 only to read "Server host key: <fingerprint>" for an error message; it goes to a
            # private temp file, and the daemonized master's stderr is /dev/null.
            "-o", "LogLevel=DEBUG1",
            "-N", "-f", "--", self._host,
        ]  # fmt: skip
        timeout = None if self._interactive else 4 * self._ssh.connect_timeout + 30
        if self._ssh.jump:
            fd = os.open(self._jump_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.run(
                    argv,
                    stdin=None if self._interactive else subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    timeout=timeout,
                )
            except subprocess.TimeoutExpired as exc:
                raise TransportError(f"ssh to {self.label} did not log in within {timeout:g} s") from exc
            err.seek(0)
            text = err.read().decode("utf-8", "replace")
        if self._ssh.jump:
            with contextlib.suppress(OSError):
                text = self._jump_log.read_text(errors="replace") + text
        if proc.returncode != 0:
            raise self._connect_error(text)
        self._started_master = True
        for line in text.splitlines():
            if "Permanently added" in line:
                note = line.strip().removeprefix("Warning: ") + f" ({self._known_hosts})"
                self.notes.append(note)
                log.warning("%s", note)
        log.debug("started the ssh master at %s", self._control)

    def _connect_error(self, text: str) -> TransportError:
        if _NO_MASTER in text:
            return TransportError(
                f"the SSH connection (ControlMaster) to {self.label} is gone; connect again"
            )
        said = stderr_tail(
            "\n".join(
                line for line in text.splitlines() if not line.startswith("debug") and line.strip("@ \r")
            )
        )
        found = re.search(r"Server host key: (\S+ SHA256:\S+)", text)
        fingerprint = found[1] if found else "(see ssh's message)"
        changed = re.search(r"Host key for (\S+) has changed", text)
        if changed or "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
            name = changed[1] if changed else self._host
            offending = re.search(r"Offending \S+ key in (.+):(\d+)", text)
            where = f"{offending[1]} line {offending[2]}" if offending else str(self._known_hosts)
            return HostKeyError(
                f"the host key of {name} has CHANGED: it now offers {fingerprint}, but {where} has a "
                f"different key. This can be an attack (man in the middle) or a reinstalled server: confirm "
                f"the new fingerprint with the cluster admins, then remove the old line (ssh-keygen -R "
                f"{shlex.quote(name)} -f {shlex.quote(str(self._known_hosts))}) and connect again",
                "changed",
            )
        unknown = re.search(r"host key is known for (\S+)", text)
        if unknown or "Host key verification failed" in text:
            name = unknown[1] if unknown else self._host
            return HostKeyError(
                f"{name} is not in known_hosts ({self._known_hosts}); verify its fingerprint {fingerprint} "
                f"(ask the cluster admins or see their docs) and add it, e.g. by logging in once with ssh, "
                f"or set accept_new_host_key = true to add it on first use. ssh said: {said}"
            )
        if "Permission denied (" in text:
            return TransportError(
                f"login to {self.label} failed ({said}); add your public key to ~/.ssh/authorized_keys "
                f"there, or set ssh.identity_file / ssh.user (a passphrase or MFA prompt needs a terminal)"
            )
        return TransportError(f"ssh to {self.label} failed: {said or 'no message'}")

    def _ssh_failed(self, proc: subprocess.CompletedProcess[bytes]) -> bool:
        text = proc.stderr.decode("utf-8", "replace")
        return proc.returncode == 255 and any(mark in text for mark in _SSH_FAILURES)

    # the interface

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> Completed:
        args, line = command_line(argv)
        self._check_open()
        ssh_argv = [self._ssh_bin, *self._client_opts, "-T", "--", self._host, line]
        log.debug("run on %s: %s", self.label, line)
        try:
            # input=b"" rather than no stdin: ssh must never read the caller's terminal.
            proc = subprocess.run(ssh_argv, input=input or b"", capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise TransportError(
                f"remote command {show_command(args)} did not finish within {timeout:g} s (ssh was stopped; "
                f"the remote process may still be running)"
            ) from exc
        if self._ssh_failed(proc):
            raise self._connect_error(proc.stderr.decode("utf-8", "replace"))
        return finish(args, proc.returncode, proc.stdout, proc.stderr, check)

    def _scp(self, what: str, *args: str) -> None:
        self._check_open()
        argv = [_which("scp"), "-q", "-s", *self._client_opts, "--", *args]
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=None)
        except OSError as exc:
            raise TransportError(f"{what}: cannot run scp: {exc}") from exc
        if proc.returncode == 0:
            return
        text = proc.stderr.decode("utf-8", "replace")
        if "unknown option" in text or "illegal option" in text:
            raise TransportError(
                f"{what}: this scp has no SFTP mode (-s, OpenSSH >= 8.7); upgrade OpenSSH "
                f'or use backend = "sshtunnel"'
            )
        if self._ssh_failed(proc):
            raise self._connect_error(text)
        raise TransportError(
            f"{what} on {self.label} failed: {stderr_tail(text) or f'scp exit {proc.returncode}'}"
        )

    def upload(self, local: Path, remote: str) -> None:
        local = Path(local)
        if not local.is_file():
            raise TransportError(f"cannot upload {local}: no such file")
        target = remote_path(remote)
        tmp = remote_temp(target)
        what = f"upload of {local} to {remote!r}"
        # An absolute local path: scp would read "a:b" as host "a".
        self._scp(what, str(local.resolve()), f"{bracket(self._host)}:{tmp}")
        done = self.run(["mv", "-f", "--", tmp, target], check=False)
        if done.returncode != 0:
            self.run(["rm", "-f", "--", tmp], check=False)
            raise TransportError(f"{what} failed: {stderr_tail(done.stderr)}")

    def download(self, remote: str, local: Path) -> None:
        local = Path(local)
        source = remote_path(remote)
        fd, tmp = local_temp(local)
        os.close(fd)
        try:
            self._scp(
                f"download of {remote!r}", f"{bracket(self._host)}:{glob_escape(source)}", str(tmp.resolve())
            )
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, local)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def forward(
        self, local_port: int, remote_host: str, remote_port: int, *, local_host: str = "127.0.0.1"
    ) -> MuxForward:
        self._check_open()
        if local_port:
            # Our own bind gives the clear "in use" error; ssh's is "Port forwarding failed".
            bind_listener(local_host, local_port).close()
        port = local_port or free_port(local_host)
        spec = f"{bracket(local_host)}:{port}:{bracket(remote_host)}:{remote_port}"
        proc = self._mux("forward", "-L", spec)
        if proc.returncode != 0:
            said = stderr_tail(proc.stderr)
            if "forwarding failed" in said:
                raise TransportError(
                    f"local port {port} is in use on {local_host} (ssh: {said}); choose another"
                )
            raise TransportError(f"ssh could not forward {spec} through {self.label}: {said}")
        fwd = MuxForward(self, spec, port, remote_host, remote_port)
        with self._lock:
            self._forwards.append(fwd)
        log.debug("forward %s through %s", spec, self._control)
        return fwd

    def alive(self) -> bool:
        return not self._closed and self._mux("check").returncode == 0

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            forwards, self._forwards = self._forwards, []
        for fwd in forwards:
            fwd.close()
        # A master another process started (e.g. `vidcap tunnel up`) is left to it and ControlPersist.
        if self._started_master:
            with contextlib.suppress(TransportError):
                self._mux("exit")

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"the SSH connection to {self.label} is closed; connect again")

    def _cancel(self, fwd: MuxForward) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._forwards.remove(fwd)
        with contextlib.suppress(TransportError):
            self._mux("cancel", "-L", fwd.spec)


class MuxForward:
    """A ``-L`` forward held by the ControlMaster; close() cancels it."""

    def __init__(
        self, owner: OpenSSHTransport, spec: str, local_port: int, remote_host: str, remote_port: int
    ):
        self._owner = owner
        self.spec = spec
        self.local_port = local_port
        self.remote_host = remote_host
        self.remote_port = remote_port
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner._cancel(self)
