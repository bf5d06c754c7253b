"""Long-lived tunnels: a background process per profile that keeps the forwards to the GPU node alive.

`tunnel up` starts ``python -m vidcap.tunnel`` detached (its own session, so it outlives the command and
the terminal); the process connects, opens the forwards, writes its state file (0600) and then checks the
connection every few seconds, reconnecting with backoff when it died. `tunnel down` sends SIGTERM: the
process closes its forwards and removes its state. A state file whose pid is gone is stale and removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vidcap import config
from vidcap.errors import TunnelError, VidcapError
from vidcap.store import atomic_write


@dataclass(frozen=True)
class Target:
    """One forward: localhost:local_port here -> remote_host:remote_port as the login node sees it."""

    name: str
    local_port: int
    remote_host: str
    remote_port: int

    def spec(self) -> str:
        return f"{self.name}={self.local_port}:{self.remote_host}:{self.remote_port}"

    @classmethod
    def parse(cls, spec: str) -> Target:
        name, _, rest = spec.partition("=")
        local, host, remote = rest.split(":")
        return cls(name, int(local), host, int(remote))


def tunnels_dir() -> Path:
    path = config.state_dir() / "tunnels"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def state_path(profile: str) -> Path:
    return tunnels_dir() / f"{profile}.json"


def log_path(profile: str) -> Path:
    return tunnels_dir() / f"{profile}.log"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a finished child of ours is reaped, not counted)."""
    # When this process started the tunnel (caption does), a finished one is our zombie until reaped.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(profile: str) -> dict[str, Any] | None:
    """The live tunnel's state, or None; a state left by a dead process is removed."""
    path = state_path(profile)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not pid_alive(int(state.get("pid", 0))):
        path.unlink(missing_ok=True)
        return None
    return state


def _write_state(profile: str, state: dict[str, Any]) -> None:
    path = state_path(profile)
    atomic_write(path, json.dumps(state, indent=2) + "\n")
    os.chmod(path, 0o600)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def up(
    profile: str,
    targets: Sequence[Target],
    config_path: Path | None,
    *,
    timeout: float = 60.0,
    replace: bool = False,
) -> dict[str, Any]:
    """Start the tunnel process of ``profile`` (or return the running one if it has the same targets).
    A tunnel up with other targets (a job that has since moved) is replaced when ``replace``; the
    returned state then says ``"replaced": true``."""
    state = read_state(profile)
    replaced = False
    if state is not None:
        if sorted(state["targets"]) == sorted(t.spec() for t in targets):
            return state
        if not replace:
            raise TunnelError(
                f"a tunnel for {profile!r} is up with other targets; 'vidcap tunnel down -p {profile}' first"
            )
        down(profile)
        replaced = True
    for t in targets:
        if not port_free(t.local_port):
            raise TunnelError(
                f"local port {t.local_port} ({t.name}) is in use; pick another (server.local_{t.name}_port) "
                "or stop what holds it ('vidcap tunnel status' lists vidcap's tunnels)"
            )
    argv = [sys.executable, "-m", "vidcap.tunnel", "--profile", profile]
    if config_path is not None:
        argv += ["--config", str(Path(config_path).resolve())]
    argv += [t.spec() for t in targets]
    log = log_path(profile)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, start_new_session=True, close_fds=True
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(profile)
        if state is not None and state.get("pid") == proc.pid and state.get("status") == "up":
            return {**state, "replaced": True} if replaced else state
        if proc.poll() is not None:
            raise TunnelError(f"the tunnel process for {profile!r} exited ({proc.returncode}):\n{_tail(log)}")
        time.sleep(0.1)
    proc.terminate()
    raise TunnelError(
        f"the tunnel for {profile!r} did not come up in {timeout:.0f} s; log {log}:\n{_tail(log)}"
    )


def down(profile: str, timeout: float = 10.0) -> bool:
    """Stop the tunnel of ``profile``; False when none was up."""
    state = read_state(profile)
    if state is None:
        return False
    pid = int(state["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    state_path(profile).unlink(missing_ok=True)
    return True


def status(profiles: Sequence[str]) -> list[dict[str, Any]]:
    """One row per profile: up/down, since, reconnects, and whether each forward answers."""
    import httpx

    rows = []
    for profile in profiles:
        state = read_state(profile)
        if state is None:
            rows.append({"profile": profile, "status": "down"})
            continue
        checks = {}
        for spec in state["targets"]:
            t = Target.parse(spec)
            path = "/health" if t.name.startswith("vllm") else "/"
            try:
                # trust_env=False: a proxy from the environment must not answer for our localhost forward
                url = f"http://127.0.0.1:{t.local_port}{path}"
                code = httpx.get(url, timeout=5.0, trust_env=False).status_code
                # the file server answers 404 without its token: that still proves the path works
                checks[t.name] = "ok" if code in (200, 404) else f"http {code}"
            except httpx.HTTPError as exc:
                checks[t.name] = type(exc).__name__
        rows.append({**state, "profile": profile, "checks": checks})
    return rows


# -- the tunnel process -------------------------------------------------------------------------------


class _Daemon:
    def __init__(self, profile: str, ssh: config.SSHConfig, targets: list[Target]) -> None:
        self.profile, self.ssh, self.targets = profile, ssh, targets
        self.stop = threading.Event()
        self.state: dict[str, Any] = {
            "pid": os.getpid(),
            "profile": profile,
            "since": _now(),
            "status": "starting",
            "reconnects": 0,
            "last_error": None,
            "targets": [t.spec() for t in targets],
            "forwards": [asdict(t) for t in targets],
        }

    def _log(self, message: str) -> None:
        print(f"{_now()} {message}", flush=True)

    def _open(self) -> Any:
        from vidcap.transport import connect

        transport = connect(self.ssh)
        try:
            for t in self.targets:
                transport.forward(t.local_port, t.remote_host, t.remote_port)
        except BaseException:
            transport.close()
            raise
        return transport

    def _set(self, **changes: Any) -> None:
        self.state.update(changes, updated=_now())
        _write_state(self.profile, self.state)

    def run(self) -> int:
        delay, transport = 1.0, None
        first = True
        while not self.stop.is_set():
            if transport is None:
                try:
                    transport = self._open()
                except VidcapError as exc:
                    if first:  # a bad host key or login fails at once, not in a retry loop
                        self._log(f"cannot open the tunnel: {exc}")
                        return 3
                    self._set(status="reconnecting", last_error=str(exc))
                    self._log(f"reconnect failed ({exc}); next try in {delay:.0f} s")
                    self.stop.wait(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                if not first:
                    self.state["reconnects"] += 1
                    self._log("reconnected")
                first, delay = False, 1.0
                self._set(status="up", last_error=None)
            self.stop.wait(max(1.0, min(5.0, self.ssh.keepalive or 5)))
            if not self.stop.is_set() and not transport.alive():
                self._log("SSH connection lost; reconnecting")
                self._set(status="reconnecting", last_error="connection lost")
                with contextlib.suppress(Exception):
                    transport.close()
                transport = None
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()
        state_path(self.profile).unlink(missing_ok=True)
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidcap.tunnel", description="vidcap's tunnel process")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--config", type=Path)
    parser.add_argument("targets", nargs="+", help="NAME=LOCAL_PORT:REMOTE_HOST:REMOTE_PORT")
    args = parser.parse_args(argv)
    cfg, _ = config.load(args.config)
    daemon = _Daemon(args.profile, cfg.profile(args.profile).ssh, [Target.parse(t) for t in args.targets])
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: daemon.stop.set())
    return daemon.run()


if __name__ == "__main__":
    sys.exit(main())
