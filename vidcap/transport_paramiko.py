"""The "sshtunnel" backend: paramiko in this process (vidcap.transport says why not SSHTunnelForwarder).

A connection is a chain of paramiko Transports: jump hosts first (each next hop dialled through a
direct-tcpip channel of the previous one, like ProxyJump), the login node last. Every hop's host key is
checked with vidcap.known_hosts before any key is offered to it.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko

from vidcap.config import SSHConfig
from vidcap.errors import TransportError
from vidcap.forward import ChannelForward
from vidcap.known_hosts import check_host_key, prefer_known_key_types, read_known_hosts
from vidcap.transport import (
    Completed,
    Transport,
    command_line,
    expand,
    finish,
    host_key_name,
    local_temp,
    parse_jump,
    remote_path,
    remote_temp,
    show_command,
)

log = logging.getLogger("vidcap.transport")

_CONNECTION_ERRORS = (paramiko.SSHException, OSError, EOFError)
_DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")


# ---- where to connect ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Hop:
    """One SSH server on the way, resolved through the OpenSSH client config."""

    hostname: str
    port: int
    user: str
    identity_files: tuple[Path, ...]
    explicit_identity: bool
    identities_only: bool
    proxy_command: str | None
    proxy_jump: str | None
    host_key_alias: str | None

    @property
    def key_name(self) -> str:
        return self.host_key_alias or host_key_name(self.hostname, self.port)

    @property
    def label(self) -> str:
        return f"{self.user}@{host_key_name(self.hostname, self.port)}"


def load_ssh_config(ssh: SSHConfig) -> paramiko.SSHConfig | None:
    if not ssh.config_file:
        return None
    path = expand(ssh.config_file)
    if not path.is_file():
        return None
    try:
        return paramiko.SSHConfig.from_path(str(path))
    except (OSError, paramiko.ConfigParseError) as exc:
        raise TransportError(f"cannot read the ssh config {path}: {exc}; fix it or set config_file") from exc


def resolve(
    alias: str,
    cfg: paramiko.SSHConfig | None,
    *,
    user: str | None = None,
    port: int | None = None,
    identity_file: str | None = None,
    identity_is_fallback: bool = False,
) -> Hop:
    """Explicit values win over the ssh config, which wins over OpenSSH's defaults."""
    try:
        opts = cfg.lookup(alias) if cfg is not None else {}
    except Exception as exc:  # paramiko raises bare errors for Match exec without 'invoke' etc.
        raise TransportError(f"the ssh config cannot be applied to {alias!r}: {exc}") from exc
    files = [expand(f) for f in opts.get("identityfile", [])]
    explicit = bool(files)
    if identity_file:
        mine = expand(identity_file)
        files = [*files, mine] if identity_is_fallback else [mine]
        explicit = True
    if not files:
        files = [p for p in map(expand, _DEFAULT_KEYS) if p.is_file()]
    proxy_jump = opts.get("proxyjump")
    return Hop(
        hostname=opts.get("hostname", alias),
        port=port or int(opts.get("port", 22)),
        user=user or opts.get("user") or getpass.getuser(),
        identity_files=tuple(dict.fromkeys(files)),
        explicit_identity=explicit,
        identities_only=str(opts.get("identitiesonly", "no")).lower() == "yes" or bool(identity_file),
        proxy_command=opts.get("proxycommand"),
        proxy_jump=None if proxy_jump in (None, "none") else proxy_jump,
        host_key_alias=opts.get("hostkeyalias"),
    )


# ---- the transport -------------------------------------------------------------------------------


class ParamikoTransport(Transport):
    def __init__(self, ssh: SSHConfig) -> None:
        self._ssh = ssh
        self._known_hosts = expand(ssh.known_hosts)
        self._hops: list[paramiko.Transport] = []
        self._forwards: list[ChannelForward] = []
        self._lock = threading.Lock()
        self._closed = False
        self.notes = []
        cfg = load_ssh_config(ssh)
        explicit_port = ssh.port if "port" in ssh.model_fields_set else None
        target = resolve(
            ssh.host or "", cfg, user=ssh.user, port=explicit_port, identity_file=ssh.identity_file
        )
        jump = ssh.jump or target.proxy_jump
        chain = [
            resolve(
                host, cfg, user=user, port=port, identity_file=ssh.identity_file, identity_is_fallback=True
            )
            for user, host, port in (parse_jump(jump) if jump else [])
        ]
        self.label = target.label
        self._agent: paramiko.Agent | None = None
        try:
            for hop in [*chain, target]:
                self._hops.append(self._open(hop, self._dial(hop, first=not self._hops)))
        except BaseException:
            self.close()
            raise
        finally:
            # The agent is only needed to log in; do not keep its socket for the connection's life.
            if self._agent is not None:
                self._agent.close()

    # connection set-up

    def _dial(self, hop: Hop, *, first: bool) -> socket.socket | paramiko.Channel | paramiko.ProxyCommand:
        timeout = self._ssh.connect_timeout
        if not first:
            prev = self._hops[-1]
            try:
                return prev.open_channel(
                    "direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0), timeout=timeout
                )
            except _CONNECTION_ERRORS as exc:
                raise TransportError(
                    f"the jump host cannot reach {hop.hostname}:{hop.port}: {exc}; "
                    f"check ssh.host and ssh.jump"
                ) from exc
        if hop.proxy_command:
            try:
                return paramiko.ProxyCommand(hop.proxy_command)
            except (paramiko.ProxyCommandFailure, OSError) as exc:
                raise TransportError(f"ProxyCommand for {hop.hostname} failed to start: {exc}") from exc
        where = f"{hop.hostname}:{hop.port}"
        try:
            return socket.create_connection((hop.hostname, hop.port), timeout=timeout)
        except socket.gaierror as exc:
            raise TransportError(
                f"cannot resolve the host name {hop.hostname!r}; check ssh.host (or HostName in the ssh "
                f"config), the network and the VPN"
            ) from exc
        except ConnectionRefusedError as exc:
            raise TransportError(
                f"{where} refused the connection: is sshd listening there? check ssh.port"
            ) from exc
        except TimeoutError as exc:
            raise TransportError(
                f"no answer from {where} within {timeout:g} s; check the host name, VPN and firewall"
            ) from exc
        except OSError as exc:
            raise TransportError(f"cannot connect to {where}: {exc.strerror or exc}") from exc

    def _open(self, hop: Hop, sock: object) -> paramiko.Transport:
        timeout = self._ssh.connect_timeout
        t = paramiko.Transport(sock)
        t.banner_timeout = t.auth_timeout = t.handshake_timeout = timeout
        try:
            prefer_known_key_types(t, read_known_hosts(self._known_hosts), hop.key_name)
            try:
                t.start_client(timeout=timeout)
                key = t.get_remote_server_key()
            except _CONNECTION_ERRORS as exc:
                raise TransportError(
                    f"SSH handshake with {hop.label} failed: {exc or type(exc).__name__}; is that an SSH "
                    f"server, and is it reachable?"
                ) from exc
            note = check_host_key(self._known_hosts, hop.key_name, key, self._ssh.accept_new_host_key)
            if note:
                self.notes.append(note)
            self._authenticate(t, hop)
            if self._ssh.keepalive:
                t.set_keepalive(self._ssh.keepalive)
        except BaseException:
            t.close()
            raise
        log.debug("connected to %s", hop.label)
        return t

    def _authenticate(self, t: paramiko.Transport, hop: Hop) -> None:
        tried: list[str] = []
        locked: list[Path] = []
        for label, key in self._keys(hop, locked):
            tried.append(label)
            try:
                remaining = t.auth_publickey(hop.user, key)
            except paramiko.BadAuthenticationType as exc:
                raise TransportError(
                    f"{hop.label} does not accept keys (it allows: {', '.join(exc.allowed_types)}); use "
                    f'backend = "openssh", which can answer password and MFA prompts'
                ) from exc
            except paramiko.AuthenticationException:
                continue
            except _CONNECTION_ERRORS as exc:
                raise TransportError(f"the connection to {hop.label} dropped during login: {exc}") from exc
            if t.is_authenticated():
                return
            raise TransportError(
                f"{hop.label} asks for a second factor ({', '.join(remaining)}) after the key; use "
                f'backend = "openssh": it asks once and keeps a ControlMaster for the following commands'
            )
        hint = (
            f"; {', '.join(map(str, locked))} is passphrase-protected: load it into ssh-agent (ssh-add) "
            if locked
            else ""
        )
        raise TransportError(
            f"login as {hop.user} on {hop.label} failed (tried: {', '.join(tried) or 'no keys found'})"
            f"{hint}; add your public key to ~/.ssh/authorized_keys there, or set ssh.identity_file/ssh.user"
        )

    def _keys(self, hop: Hop, locked: list[Path]) -> Iterator[tuple[str, paramiko.PKey]]:
        """Identity files first (loaded one at a time, as they are offered), then the agent's keys."""
        for path in hop.identity_files:
            if not path.is_file():
                if hop.explicit_identity:
                    raise TransportError(f"identity file {path} does not exist; fix ssh.identity_file")
                continue
            try:
                key = paramiko.PKey.from_path(path)
            except (paramiko.PasswordRequiredException, TypeError):
                # cryptography says "password was not given" with a TypeError.
                locked.append(path)
                continue
            except (paramiko.SSHException, ValueError, OSError) as exc:
                if hop.explicit_identity:
                    raise TransportError(f"cannot read the identity file {path}: {exc}") from exc
                continue
            yield str(path), key
        if self._agent is None:
            try:
                self._agent = paramiko.Agent()
            except (paramiko.SSHException, OSError) as exc:
                log.warning("ssh-agent did not answer (%s); trying without it", exc)
                return
        agent_keys = list(self._agent.get_keys())
        if hop.identities_only:
            wanted = set()
            for path in hop.identity_files:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    wanted.add(base64.b64decode(Path(f"{path}.pub").read_text().split()[1]))
            agent_keys = [k for k in agent_keys if k.asbytes() in wanted]
        for key in agent_keys:
            yield f"agent key {key.fingerprint}", key

    # the interface

    def _target(self) -> paramiko.Transport:
        if self._closed or not self._hops:
            raise TransportError(f"the SSH connection to {self.label} is closed; connect again")
        t = self._hops[-1]
        if not t.is_active():
            raise TransportError(f"the SSH connection to {self.label} dropped; connect again")
        return t

    def _lost(self, what: str, exc: BaseException) -> TransportError:
        if self._hops and not self._hops[-1].is_active():
            return TransportError(f"{what}: the SSH connection to {self.label} dropped; connect again")
        reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
        return TransportError(f"{what} on {self.label}: {reason}")

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> Completed:
        args, line = command_line(argv)
        deadline = None if timeout is None else time.monotonic() + timeout
        log.debug("run on %s: %s", self.label, line)
        try:
            chan = self._target().open_session(timeout=self._ssh.connect_timeout)
            chan.exec_command(line)
        except _CONNECTION_ERRORS as exc:
            raise self._lost(f"cannot start {show_command(args)}", exc) from exc
        out, err = bytearray(), bytearray()
        with chan:
            workers = [
                threading.Thread(target=_drain, args=(chan.recv, out), daemon=True),
                threading.Thread(target=_drain, args=(chan.recv_stderr, err), daemon=True),
                threading.Thread(target=_feed, args=(chan, input), daemon=True),
            ]
            for w in workers:
                w.start()
            for w in workers:
                w.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            finished = chan.status_event.wait(
                None if deadline is None else max(0.0, deadline - time.monotonic())
            )
            if not finished or any(w.is_alive() for w in workers):
                raise TransportError(
                    f"remote command {show_command(args)} did not finish within {timeout:g} s (the SSH "
                    f"channel was closed; the remote process may still be running)"
                )
            code = chan.recv_exit_status()
        if code < 0 and not self._hops[-1].is_active():
            raise TransportError(
                f"the SSH connection to {self.label} dropped while running {show_command(args)}"
            )
        return finish(args, code, bytes(out), bytes(err), check)

    def upload(self, local: Path, remote: str) -> None:
        local = Path(local)
        if not local.is_file():
            raise TransportError(f"cannot upload {local}: no such file")
        target = remote_path(remote)
        tmp = remote_temp(target)
        try:
            with self._target().open_sftp_client() as sftp:
                try:
                    sftp.put(str(local), tmp, confirm=True)
                    sftp.posix_rename(tmp, target)
                except BaseException:
                    with contextlib.suppress(*_CONNECTION_ERRORS):
                        sftp.remove(tmp)
                    raise
        except _CONNECTION_ERRORS as exc:
            raise self._lost(f"upload of {local} to {remote!r} failed", exc) from exc

    def download(self, remote: str, local: Path) -> None:
        local = Path(local)
        source = remote_path(remote)
        fd, tmp = local_temp(local)
        try:
            with os.fdopen(fd, "wb") as f, self._target().open_sftp_client() as sftp:
                sftp.getfo(source, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, local)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, FileNotFoundError):
                raise TransportError(f"cannot download {remote!r} from {self.label}: no such file") from exc
            if isinstance(exc, _CONNECTION_ERRORS):
                raise self._lost(f"download of {remote!r} failed", exc) from exc
            raise

    def forward(
        self, local_port: int, remote_host: str, remote_port: int, *, local_host: str = "127.0.0.1"
    ) -> ChannelForward:
        self._target()
        fwd = ChannelForward(
            self._open_forward_channel, local_host, local_port, remote_host, remote_port, self._forget
        )
        with self._lock:
            self._forwards.append(fwd)
        return fwd

    def alive(self) -> bool:
        if self._closed or not self._hops or not self._hops[-1].is_active():
            return False
        # is_active() only knows what the reader thread saw; a channel open is a real round trip.
        try:
            chan = self._hops[-1].open_session(timeout=min(5.0, self._ssh.connect_timeout))
        except _CONNECTION_ERRORS:
            return False
        chan.close()
        return True

    def close(self) -> None:
        with self._lock:
            forwards, self._forwards = self._forwards, []
            self._closed = True
        for fwd in forwards:
            fwd.close()
        for t in reversed(self._hops):
            with contextlib.suppress(Exception):
                t.close()

    def _open_forward_channel(self, dest: tuple[str, int], src: tuple[str, int]) -> paramiko.Channel:
        return self._target().open_channel("direct-tcpip", dest, src, timeout=self._ssh.connect_timeout)

    def _forget(self, fwd: ChannelForward) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._forwards.remove(fwd)


def _drain(read: Callable[[int], bytes], buf: bytearray) -> None:
    while True:
        try:
            data = read(65536)
        except _CONNECTION_ERRORS:
            return
        if not data:
            return
        buf += data


def _feed(chan: paramiko.Channel, data: bytes | None) -> None:
    try:
        if data:
            chan.sendall(data)
        chan.shutdown_write()
    except _CONNECTION_ERRORS:
        pass
