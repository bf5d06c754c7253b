"""The SSH transport against a real OpenSSH sshd on 127.0.0.1, every behaviour for both backends.

The sshd runs on this machine as this user, so the "remote" filesystem is the local one: tests put
remote paths under tmp_path and check them directly.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import os
import shlex
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from vidcap.errors import ConfigError, HostKeyError, TransportError
from vidcap.known_hosts import KnownHost, read_known_hosts
from vidcap.transport import Transport, connect, parse_jump, remote_temp
from vidcap.transport_openssh import glob_escape, proxy_command, quote_value

if TYPE_CHECKING:
    from sshd import SSHServer

# The real-sshd fixtures (sshd_session, sshd_server) live in tests/sshd.py.

BACKENDS = ["sshtunnel", "openssh"]

HOSTILE = [
    "with space",
    "single ' quote",
    'double " quote',
    "$(touch {marker})",
    "`touch {marker}`",
    "a; touch {marker}",
    "a | touch {marker}",
    "a && touch {marker}",
    "line one\nline two",
    "*",
    "-n",
    "--",
    "",
    "ünïcødé ✓ 字幕",
    "back\\slash",
    "$HOME ${HOME}",
    "~",
    "{a,b}",
    "tab\there",
    "#not a comment",
    "!bang",
    "> {marker}",
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def transport(sshd_server: SSHServer, backend: str) -> Iterator[Transport]:
    with connect(sshd_server.ssh_config(backend)) as t:
        yield t


@pytest.fixture
def gpu_node() -> Iterator[tuple[int, bytes]]:
    """The "vLLM on the GPU node": a small HTTP server that the login node can reach."""
    body = os.urandom(1 << 20)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.server_address[1], body
    server.shutdown()
    server.server_close()


def _get(port: int) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert response.status == 200
        return response.read()
    finally:
        conn.close()


def _port_is_free(port: int) -> bool:
    """Nothing listens there and a new listener can bind it (with SO_REUSEADDR, as ssh and vidcap do:
    connections the forward closed may sit in TIME_WAIT on that port)."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def _accepted(server: SSHServer) -> int:
    return server.log_path.read_text(errors="replace").count("Accepted publickey")


# ---- run -----------------------------------------------------------------------------------------


def test_run_passes_hostile_argv_exactly(transport: Transport, tmp_path: Path) -> None:
    marker = f"pwned-{uuid.uuid4().hex}"
    hostile = [h.replace("{marker}", marker) for h in HOSTILE]
    script = "import sys, json; print(json.dumps(sys.argv[1:]))"
    done = transport.run(["python3", "-c", script, *hostile])
    assert json.loads(done.stdout) == hostile
    assert done.returncode == 0
    # The remote shell starts in the home directory; tmp_path is where the test runs from.
    assert not (Path.home() / marker).exists()
    assert not (Path.cwd() / marker).exists()
    assert not list(tmp_path.glob(f"*{marker}*"))


def test_run_argv_with_leading_dash_is_the_command(transport: Transport) -> None:
    done = transport.run(["printf", "%s|", "-n", "--", "-e"])
    assert done.stdout == b"-n|--|-e|"


def test_run_check_raises_with_exit_code_and_stderr(transport: Transport) -> None:
    with pytest.raises(TransportError, match=r"exited with code 3.*oops it broke"):
        transport.run(["sh", "-c", "echo 'oops it broke' >&2; exit 3"])
    done = transport.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
    assert (done.returncode, done.stdout, done.stderr) == (3, b"out\n", b"err\n")


def test_run_remote_exit_255_is_not_a_connection_error(transport: Transport) -> None:
    done = transport.run(["sh", "-c", "exit 255"], check=False)
    assert done.returncode == 255
    assert transport.alive()


def test_run_stdin_and_large_output(transport: Transport) -> None:
    data = os.urandom(2 << 20)
    script = (
        "import sys; d = sys.stdin.buffer.read(); sys.stdout.buffer.write(d[::-1]); "
        "sys.stderr.write('x' * 100000)"
    )
    done = transport.run(["python3", "-c", script], input=data)
    assert done.stdout == data[::-1]
    assert len(done.stderr) == 100000


def test_run_timeout(transport: Transport) -> None:
    started = time.monotonic()
    with pytest.raises(TransportError, match="did not finish within"):
        transport.run(["sleep", "10"], timeout=0.5)
    assert time.monotonic() - started < 5
    assert transport.run(["true"]).returncode == 0


def test_run_rejects_empty_argv(transport: Transport) -> None:
    with pytest.raises(ValueError):
        transport.run([])


# ---- upload / download ---------------------------------------------------------------------------


def test_upload_download_round_trip_with_hostile_names(transport: Transport, tmp_path: Path) -> None:
    remote_dir = tmp_path / "remote dir 'q' \"dq\" $(touch pwned) [x]* ü"
    remote_dir.mkdir()
    decoy = remote_dir / "video a1.bin"  # what "video a?.bin" would glob to
    decoy.write_bytes(b"decoy")
    data = os.urandom(300_000) + bytes(range(256))
    local = tmp_path / "src.bin"
    local.write_bytes(data)
    remote = remote_dir / "video a?.bin"

    transport.upload(local, str(remote))
    assert remote.read_bytes() == data
    assert sorted(p.name for p in remote_dir.iterdir()) == ["video a1.bin", "video a?.bin"]  # no temp left

    back = tmp_path / "back 'x' $(y).bin"
    back.write_bytes(b"old content")
    transport.download(str(remote), back)
    assert back.read_bytes() == data
    assert not list(tmp_path.glob("*.part"))
    assert not (Path.home() / "pwned").exists()


def test_upload_relative_and_tilde_paths_land_in_home(transport: Transport, tmp_path: Path) -> None:
    name = f"vidcap-test-{uuid.uuid4().hex}.txt"
    local = tmp_path / "a.txt"
    local.write_text("hello")
    try:
        transport.upload(local, f"~/{name}")
        assert (Path.home() / name).read_text() == "hello"
        transport.download(name, tmp_path / "b.txt")
        assert (tmp_path / "b.txt").read_text() == "hello"
    finally:
        (Path.home() / name).unlink(missing_ok=True)


def test_download_of_missing_file_leaves_nothing(transport: Transport, tmp_path: Path) -> None:
    local = tmp_path / "out.bin"
    with pytest.raises(TransportError, match=r"missing\.bin"):
        transport.download(str(tmp_path / "missing.bin"), local)
    assert not local.exists()
    existing = tmp_path / "keep.bin"
    existing.write_bytes(b"previous")
    with pytest.raises(TransportError):
        transport.download(str(tmp_path / "missing.bin"), existing)
    assert existing.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.bin"]


def test_upload_of_missing_local_file(transport: Transport, tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="no such file"):
        transport.upload(tmp_path / "nope.bin", str(tmp_path / "x.bin"))


def test_upload_into_missing_remote_dir_fails_clearly(transport: Transport, tmp_path: Path) -> None:
    local = tmp_path / "a.bin"
    local.write_bytes(b"x")
    with pytest.raises(TransportError, match="upload of"):
        transport.upload(local, str(tmp_path / "no such dir" / "a.bin"))


# ---- forward -------------------------------------------------------------------------------------


def test_forward_carries_http(transport: Transport, gpu_node: tuple[int, bytes]) -> None:
    node_port, body = gpu_node
    fwd = transport.forward(0, "127.0.0.1", node_port)
    assert fwd.local_port > 0 and fwd.local_port != node_port
    assert (fwd.remote_host, fwd.remote_port) == ("127.0.0.1", node_port)
    assert _get(fwd.local_port) == body
    with ThreadPoolExecutor(8) as pool:
        assert all(got == body for got in pool.map(lambda _: _get(fwd.local_port), range(8)))
    fwd.close()
    assert _port_is_free(fwd.local_port)
    fwd.close()  # idempotent


def test_forward_to_a_taken_local_port_is_a_clear_error(
    transport: Transport, gpu_node: tuple[int, bytes]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TransportError, match=f"local port {port} is in use"):
            transport.forward(port, "127.0.0.1", gpu_node[0])
    fwd = transport.forward(port, "127.0.0.1", gpu_node[0])
    assert fwd.local_port == port
    assert _get(port) == gpu_node[1]
    transport.close()  # closes its forwards too
    assert _port_is_free(port)


# ---- host keys -----------------------------------------------------------------------------------


def test_changed_host_key_is_refused(sshd_server: SSHServer, backend: str) -> None:
    known_before = sshd_server.known_hosts.read_text()
    sshd_server.rotate_host_key()
    before = _accepted(sshd_server)
    cfg = sshd_server.ssh_config(backend, accept_new_host_key=True)  # accept-new never covers a change
    with pytest.raises(HostKeyError, match="CHANGED") as caught:
        connect(cfg)
    message = str(caught.value)
    assert caught.value.reason == "changed"
    assert str(sshd_server.known_hosts) in message and "line 1" in message
    assert "SHA256:" in message
    assert _accepted(sshd_server) == before  # refused before logging in
    assert sshd_server.known_hosts.read_text() == known_before


def test_unknown_host_is_refused(sshd_server: SSHServer, backend: str, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    before = _accepted(sshd_server)
    with pytest.raises(HostKeyError, match="not in known_hosts") as caught:
        connect(sshd_server.ssh_config(backend, known_hosts=str(known)))
    assert "SHA256:" in str(caught.value) and "accept_new_host_key" in str(caught.value)
    assert caught.value.reason == "unknown"
    assert _accepted(sshd_server) == before
    assert known.read_text() == ""


def test_accept_new_adds_exactly_one_line(sshd_server: SSHServer, backend: str, tmp_path: Path) -> None:
    known = tmp_path / "new dir" / "known_hosts"
    with connect(sshd_server.ssh_config(backend, known_hosts=str(known), accept_new_host_key=True)) as t:
        assert t.run(["true"]).returncode == 0
        assert t.notes and "[127.0.0.1]" in t.notes[0]
    lines = known.read_text().splitlines()
    assert len(lines) == 1
    assert lines[0].split()[:3] == sshd_server.known_hosts_line().split()[:3]
    with connect(sshd_server.ssh_config(backend, known_hosts=str(known))) as t:
        assert t.notes == []
    assert len(known.read_text().splitlines()) == 1


# ---- liveness and reconnect ----------------------------------------------------------------------


def test_alive_goes_false_when_the_connection_dies(sshd_server: SSHServer, backend: str) -> None:
    cfg = sshd_server.ssh_config(backend)
    t = connect(cfg)
    assert t.alive()
    sshd_server.kill_connections()
    deadline = time.monotonic() + 10
    while t.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not t.alive()
    with pytest.raises(TransportError):
        t.run(["true"])
    t.close()
    with connect(cfg) as again:
        assert again.alive()
        assert again.run(["echo", "back"]).stdout == b"back\n"


def test_restart_of_sshd_then_reconnect(sshd_server: SSHServer, backend: str) -> None:
    cfg = sshd_server.ssh_config(backend)
    with connect(cfg) as t:
        sshd_server.restart()
        deadline = time.monotonic() + 10
        while t.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not t.alive()
    with connect(cfg) as t:
        assert t.run(["true"]).returncode == 0


# ---- jump hosts and the ssh config ---------------------------------------------------------------


def test_jump_host(sshd_server: SSHServer, backend: str, gpu_node: tuple[int, bytes]) -> None:
    """Jump through the same sshd to itself: two logins, and everything works through both."""
    before = _accepted(sshd_server)
    jump = f"{sshd_server.user}@127.0.0.1:{sshd_server.port}"
    with connect(sshd_server.ssh_config(backend, jump=jump)) as t:
        assert t.run(["echo", "via jump"]).stdout == b"via jump\n"
        fwd = t.forward(0, "127.0.0.1", gpu_node[0])
        assert _get(fwd.local_port) == gpu_node[1]
    assert _accepted(sshd_server) - before == 2


def test_jump_chain(sshd_server: SSHServer, backend: str) -> None:
    before = _accepted(sshd_server)
    hop = f"127.0.0.1:{sshd_server.port}"
    with connect(sshd_server.ssh_config(backend, jump=f"{hop},{sshd_server.user}@{hop}")) as t:
        assert t.run(["echo", "two hops"]).stdout == b"two hops\n"
    assert _accepted(sshd_server) - before == 3


def test_jump_host_key_is_checked_too(sshd_server: SSHServer, backend: str, tmp_path: Path) -> None:
    sshd_server.rotate_host_key()
    with pytest.raises(HostKeyError, match="CHANGED"):
        connect(sshd_server.ssh_config(backend, jump=f"127.0.0.1:{sshd_server.port}"))


def test_ssh_config_alias(sshd_server: SSHServer, backend: str, tmp_path: Path) -> None:
    """HostName, Port, User and IdentityFile come from the OpenSSH client config if the profile is silent."""
    key = tmp_path / "id_alias"
    key.write_bytes(sshd_server.identity_file.read_bytes())
    key.chmod(0o600)
    cfg_file = tmp_path / "ssh_config"
    cfg_file.write_text(
        f"Host vidcap-alias\n  HostName 127.0.0.1\n  Port {sshd_server.port}\n  User {sshd_server.user}\n"
        f"  IdentityFile {key}\n  IdentitiesOnly yes\n"
    )
    from vidcap.config import SSHConfig

    cfg = SSHConfig(
        host="vidcap-alias",
        backend=backend,  # type: ignore[arg-type]
        config_file=str(cfg_file),
        known_hosts=str(sshd_server.known_hosts),
        connect_timeout=5,
    )
    with connect(cfg) as t:
        assert t.run(["echo", "aliased"]).stdout == b"aliased\n"


def test_ssh_config_proxy_command(sshd_server: SSHServer, backend: str, tmp_path: Path) -> None:
    key = tmp_path / "id_proxy"
    key.write_bytes(sshd_server.identity_file.read_bytes())
    key.chmod(0o600)
    known = tmp_path / "known_hosts"
    known.write_text(sshd_server.known_hosts_line())
    hop = f"ssh -F none -o BatchMode=yes -o UserKnownHostsFile={known} -i {key} -p {sshd_server.port}"
    cfg_file = tmp_path / "ssh_config"
    cfg_file.write_text(
        f"Host vidcap-proxied\n  HostName 127.0.0.1\n  Port {sshd_server.port}\n"
        f"  ProxyCommand {hop} -W %h:%p {sshd_server.user}@127.0.0.1\n"
    )
    from vidcap.config import SSHConfig

    cfg = SSHConfig(
        host="vidcap-proxied",
        user=sshd_server.user,
        identity_file=str(key),
        backend=backend,  # type: ignore[arg-type]
        config_file=str(cfg_file),
        known_hosts=str(known),
        connect_timeout=5,
    )
    before = _accepted(sshd_server)
    with connect(cfg) as t:
        assert t.run(["echo", "proxied"]).stdout == b"proxied\n"
    assert _accepted(sshd_server) - before == 2


def test_bad_key_gives_a_login_error(sshd_server: SSHServer, backend: str, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with pytest.raises(TransportError) as caught:
        connect(sshd_server.ssh_config(backend, identity_file=str(other)))
    assert not isinstance(caught.value, HostKeyError)
    assert "Permission denied" in str(caught.value) or "login as" in str(caught.value)


def test_passphrase_protected_key_says_so(sshd_server: SSHServer, tmp_path: Path) -> None:
    locked = tmp_path / "locked_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "a passphrase", "-f", str(locked)], check=True)
    with pytest.raises(TransportError, match="passphrase-protected: load it into ssh-agent"):
        connect(sshd_server.ssh_config("sshtunnel", identity_file=str(locked)))


def test_openssh_master_is_shared_and_closed_by_its_starter(sshd_server: SSHServer) -> None:
    cfg = sshd_server.ssh_config("openssh")
    before = _accepted(sshd_server)
    first = connect(cfg)
    second = connect(cfg)
    assert _accepted(sshd_server) - before == 1  # the second reused the first's master
    second.close()
    assert first.alive(), "closing a transport that reused the master must not end it"
    first.close()  # it started the master, so it ends it
    with connect(cfg) as third:
        assert third.run(["true"]).returncode == 0
    assert _accepted(sshd_server) - before == 2


def test_connection_refused(sshd_server: SSHServer, backend: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransportError, match="refused"):
        connect(sshd_server.ssh_config(backend, port=port))


def test_no_host_is_a_config_error() -> None:
    from vidcap.config import SSHConfig

    with pytest.raises(ConfigError, match=r"ssh\.host"):
        connect(SSHConfig())


# ---- pure parts ----------------------------------------------------------------------------------


def test_parse_jump() -> None:
    assert parse_jump("bastion") == [(None, "bastion", None)]
    assert parse_jump("me@bastion:2222,other@[::1]:22") == [("me", "bastion", 2222), ("other", "::1", 22)]
    with pytest.raises(ConfigError):
        parse_jump("me@bastion:port")


def test_known_hosts_matching(tmp_path: Path) -> None:
    salt = os.urandom(20)
    digest = hmac.new(salt, b"[login.example.org]:2222", hashlib.sha1).digest()
    hashed = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
    blob = base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519" + b"k" * 36).decode()
    path = tmp_path / "known_hosts"
    path.write_text(
        f"# comment\n{hashed} ssh-ed25519 {blob}\n*.cluster.org,!evil.cluster.org ssh-ed25519 {blob}\n"
        f"@cert-authority *.ca.org ssh-ed25519 {blob}\nbroken line\n[127.0.0.1]:22 ssh-ed25519 not-base64!\n"
    )
    entries = read_known_hosts(path)
    assert [e.lineno for e in entries] == [2, 3, 4]
    assert entries[0].matches("[login.example.org]:2222") and not entries[0].matches("login.example.org")
    assert entries[1].matches("LOGIN.cluster.org") and not entries[1].matches("evil.cluster.org")
    assert entries[2].marker == "@cert-authority"
    literal = KnownHost(1, None, ("[10.0.0.1]:2222",), "ssh-ed25519", b"")
    assert literal.matches("[10.0.0.1]:2222") and not literal.matches("1")


def test_openssh_quoting_helpers() -> None:
    assert quote_value("/a b/%d/k") == '"/a b/%%d/k"'
    with pytest.raises(TransportError):
        quote_value('/a"b')
    assert glob_escape("/d/[x]*?{a}\\.bin") == "/d/\\[x\\]\\*\\?\\{a\\}\\\\.bin"
    command = proxy_command("/usr/bin/ssh", "me@jump:2222", ["-o", 'UserKnownHostsFile="/k %%d/kh"'])
    # One level of %-expansion by the ssh that runs it, then the shell parses it back.
    expanded = command.replace("%h", "target").replace("%p", "22").replace("%%", "%")
    assert shlex.split(expanded) == [
        "/usr/bin/ssh", "-o", 'UserKnownHostsFile="/k %%d/kh"', "-l", "me", "-p", "2222",
        "-W", "[target]:22", "--", "jump",
    ]  # fmt: skip


def test_remote_temp_is_a_sibling() -> None:
    assert remote_temp("/a/b c.bin").startswith("/a/.b c.bin.vidcap-")
    assert remote_temp("rel.bin").startswith(".rel.bin.vidcap-")
    assert remote_temp("/top.bin").startswith("/.top.bin.vidcap-")


def test_fixture_kill_connections_keeps_the_listener(sshd_server: SSHServer) -> None:
    with connect(sshd_server.ssh_config()) as t:
        assert sshd_server.connection_count() > 0
        sshd_server.kill_connections()
        assert sshd_server.connection_count() == 0
        assert sshd_server.running()
        with contextlib.suppress(TransportError):
            t.run(["true"])
