"""The guard (vidcap/guard.py) over real sockets: in front of the vLLM stand-in, and in front of a small
recording server that tells exactly which requests (and bodies) reached it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from standin import StandIn  # tests/ is on sys.path (conftest)

from vidcap import guard as guard_mod
from vidcap.guard import Forward, Guard, Refusal, Upstream, check_head, parse_upstream, path_refusal

REPO = Path(__file__).resolve().parent.parent
KEY = "test-key-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {KEY}"}
MODEL = "Qwen/Qwen3-Omni-30B-A3B-Instruct"

# What vLLM leaves open without a key, and ways of spelling a path that a careless check would let pass.
REFUSED = [
    ("POST", "/invocations"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/pause"),
    ("POST", "/resume"),
    ("POST", "/abort_requests"),
    ("POST", "/update_weights"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/sleep"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/version?x=1"),
    ("POST", "/version"),
    ("GET", "/ping"),
    ("POST", "/v2/completions"),
    ("POST", "/inference/v1/generate"),
    ("GET", "/"),
    ("GET", "/v1"),
    ("POST", "/v1/../invocations"),
    ("POST", "/v1/./../invocations"),
    ("POST", "/v1/.."),
    ("GET", "/v1/./models"),
    ("POST", "//invocations"),
    ("POST", "/v1//../invocations"),
    ("POST", "/v1%2f..%2finvocations"),
    ("POST", "/v1%2F..%2Finvocations"),
    ("POST", "/v1/%2e%2e/invocations"),
    ("POST", "/v1/%2E%2E/invocations"),
    ("POST", "/v1/%5c..%5cinvocations"),
    ("POST", "/v1\\..\\invocations"),
    ("POST", "http://127.0.0.1/invocations"),
    ("POST", "http://127.0.0.1/v1/chat/completions"),
    ("CONNECT", "127.0.0.1:80"),
    ("GET", "*"),
    ("GET", "/health/../pause"),
    ("GET", "/health/"),
    ("GET", "/health?verbose=1"),
    ("POST", "/health"),
    ("HEAD", "/health"),
    ("get", "/health"),
    ("post", "/v1/chat/completions"),
    ("Post", "/v1/chat/completions"),
    ("OPTIONS", "/v1/models"),  # vLLM skips its key check for OPTIONS
    ("TRACE", "/v1/models"),
    ("PROPFIND", "/v1/models"),
    ("GET", "/v1/models#x"),
]


# ---- a recording upstream ------------------------------------------------------------------------------


class Recorder:
    """An HTTP/1.1 server that records each request (method, target, body length and sha256) and answers
    with that record as JSON. Special paths: /v1/close answers with Connection: close and closes;
    /v1/cut sends half a response and closes; /v1/bytes?n=N answers with N bytes. On 127.0.0.1:``port``,
    or on the unix socket ``unix`` (a path) when that is given."""

    def __init__(self, port: int = 0, unix: Path | None = None) -> None:
        self.requests: list[dict] = []
        self.connections = 0
        recorder = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                recorder.connections += 1
                sock: socket.socket = self.request
                buf = b""
                while True:
                    while b"\r\n\r\n" not in buf:
                        more = sock.recv(65536)
                        if not more:
                            return
                        buf += more
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    method, target, _ = lines[0].split(" ")
                    headers = {
                        k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
                    }
                    length = int(headers.get("content-length", "0"))
                    digest, got = hashlib.sha256(), 0
                    while got < length:
                        if not buf:
                            buf = sock.recv(1 << 20)
                            if not buf:
                                return
                        part, buf = buf[: length - got], buf[length - got :]
                        digest.update(part)
                        got += len(part)
                    record = {
                        "method": method,
                        "target": target,
                        "length": length,
                        "sha256": digest.hexdigest(),
                    }
                    recorder.requests.append(record)
                    if target == "/v1/cut":
                        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                        return
                    if target.startswith("/v1/bytes?n="):
                        n = int(target.partition("=")[2])
                        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                        chunk = b"x" * (1 << 20)
                        while n:
                            sock.sendall(chunk[:n])
                            n -= min(n, len(chunk))
                        continue
                    body = json.dumps(record).encode()
                    close = target == "/v1/close"
                    sock.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                        % (
                            len(body),
                            b"Connection: close\r\n" if close else b"",
                            b"" if method == "HEAD" else body,
                        )
                    )
                    if close:
                        return

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128

        class UnixServer(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True
            request_queue_size = 128

        self.server: socketserver.BaseServer
        if unix is not None:
            self.server = UnixServer(str(unix), Handler)
            self.port = 0
            self.upstream = Upstream(path=str(unix))
        else:
            self.server = Server(("127.0.0.1", port), Handler)
            self.port = int(self.server.server_address[1])
            self.upstream = Upstream("127.0.0.1", self.port)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.1,), daemon=True)
        self.thread.start()

    def targets(self) -> list[str]:
        return [r["target"] for r in self.requests]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class GuardThread:
    """A Guard on its own event loop in a daemon thread."""

    def __init__(self, upstream: int | Upstream) -> None:
        self.lines: list[str] = []
        self.loop = asyncio.new_event_loop()
        if isinstance(upstream, int):
            upstream = Upstream("127.0.0.1", upstream)
        self.guard = Guard(upstream, log=self.lines.append)
        self.port = self.loop.run_until_complete(self.guard.start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.guard.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.stop()


@pytest.fixture
def guarded(recorder: Recorder) -> Iterator[GuardThread]:
    g = GuardThread(recorder.port)
    yield g
    g.stop()


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with StandIn(api_key=KEY, decode="none") as s:
        yield s


@pytest.fixture
def guarded_standin(standin: StandIn) -> Iterator[GuardThread]:
    g = GuardThread(standin.port)
    yield g
    g.stop()


def client(timeout: float = 30) -> httpx.Client:
    return httpx.Client(timeout=timeout, trust_env=False, limits=httpx.Limits(max_connections=1))


def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are; everything the guard sends back until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while more := sock.recv(65536):
            chunks.append(more)
    return b"".join(chunks)


def request(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gpu-node", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# ---- pure checks -----------------------------------------------------------------------------------------


def test_the_allowlist() -> None:
    assert path_refusal("GET", "/health") is None
    assert path_refusal("GET", "/version") is None
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        assert path_refusal(method, "/v1/chat/completions") is None
    assert path_refusal("GET", "/v1/models?limit=5&after=%2Fx") is None  # the query is not the path
    for method, target in REFUSED:
        assert path_refusal(method, target) is not None, (method, target)


def test_check_head() -> None:
    assert check_head(request("GET", "/health")) == Forward("GET", "/health", 0)
    assert check_head(request("POST", "/v1/x?y", body=b"12345")[:-5]) == Forward("POST", "/v1/x", 5)
    assert check_head(b"GET /health HTTP/1.0\r\n\r\n") == Forward("GET", "/health", 0)
    cases = {
        b"GET /health HTTP/1.1\r\nHost: x\nX: y\r\n\r\n": 400,  # bare LF: a second head for a lenient parser
        b"GET /health HTTP/1.1\r\nHost: x\rX: y\r\n\r\n": 400,
        b"GET /health HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n": 400,
        b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n": 400,
        b"GET /health HTTP/1.1\r\nHost: a\x00b\r\n\r\n": 400,
        b"GET /health HTTP/1.1\r\nnocolon\r\n\r\n": 400,
        b"GET  /health HTTP/1.1\r\n\r\n": 400,
        b"GET /health\r\n\r\n": 400,
        b"\r\nGET /health HTTP/1.1\r\n\r\n": 400,
        b"GET /h\xc3\xa9 HTTP/1.1\r\n\r\n": 400,
        b"GET /health HTTP/2.0\r\n\r\n": 505,
        b"GET /health HTTP/1.1x\r\n\r\n": 400,
        b"POST /v1/x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n": 400,
        b"POST /v1/x HTTP/1.1\r\nContent-Length: +5\r\n\r\n": 400,
        b"POST /v1/x HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n": 400,
        b"POST /v1/x HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n": 400,
        b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n": 411,
        b"POST /v1/x HTTP/1.1\r\ntransfer-encoding: identity\r\n\r\n": 411,
        b"POST /v1/x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n": 400,
        b"GET /v1/realtime HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n": 403,
        b"GET /invocations HTTP/1.1\r\n\r\n": 403,
    }
    for head, status in cases.items():
        verdict = check_head(head)
        assert isinstance(verdict, Refusal) and verdict.status == status, (head, verdict)


def test_parse_upstream() -> None:
    assert parse_upstream("127.0.0.1:8000") == Upstream("127.0.0.1", 8000)
    assert parse_upstream("[::1]:8000") == Upstream("::1", 8000)
    assert str(parse_upstream("[::1]:8000")) == "[::1]:8000"
    sock = parse_upstream("unix:/tmp/vidcap-1.x/vllm sock:1")
    assert (
        sock == Upstream(path="/tmp/vidcap-1.x/vllm sock:1")
        and str(sock) == "unix:/tmp/vidcap-1.x/vllm sock:1"
    )
    for bad in ("127.0.0.1", ":80", "host:0", "host:99999", "host:http", "/tmp/vllm.sock"):
        with pytest.raises(ValueError, match="HOST:PORT or unix:PATH"):
            parse_upstream(bad)
    for bad in ("unix:", "unix:/a\0b"):
        with pytest.raises(ValueError, match="expected unix:PATH"):
            parse_upstream(bad)


# ---- allowed requests --------------------------------------------------------------------------------


def test_allowed_requests_pass_with_their_bodies_intact(recorder: Recorder, guarded: GuardThread) -> None:
    body = os.urandom(24 * 1024 * 1024 + 7)
    with client() as c:
        assert c.get(guarded.url + "/health").json()["target"] == "/health"
        got = c.post(guarded.url + "/v1/chat/completions", content=body).json()
        assert got == {
            "method": "POST",
            "target": "/v1/chat/completions",
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
        assert c.get(guarded.url + "/v1/models?x=%2F1").json()["target"] == "/v1/models?x=%2F1"
        assert c.delete(guarded.url + "/v1/thing").json()["method"] == "DELETE"
        head = c.head(guarded.url + "/v1/models")
        assert head.status_code == 200 and head.content == b""
        assert c.get(guarded.url + "/v1/bytes?n=5000000").content == b"x" * 5_000_000
        assert c.get(guarded.url + "/health").status_code == 200  # the connection survived all that
    assert recorder.connections == 1 and guarded.guard.counts["connections"] == 1
    assert guarded.guard.counts["forwarded"] == 7 and guarded.guard.counts["refused"] == 0


def test_the_standin_through_the_guard_keep_alive_and_a_big_inline_video(
    standin: StandIn, guarded_standin: GuardThread
) -> None:
    buf = io.BytesIO()
    Image.effect_noise((640, 360), 64).convert("RGB").save(buf, "JPEG", quality=95)
    frame = base64.b64encode(buf.getvalue()).decode()
    video = "data:video/jpeg;base64," + ",".join([frame] * 64)  # about 19 MB of request
    chat = {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": video}},
                    {"type": "text", "text": "hi"},
                ],
            }
        ],
        "max_tokens": 16,
    }
    url = guarded_standin.url
    with client() as c:
        assert c.get(url + "/health").status_code == 200
        assert c.get(url + "/version").json()["version"]
        assert c.get(url + "/v1/models").status_code == 401  # vLLM's own key check still applies
        for _ in range(200):
            assert c.get(url + "/v1/models", headers=BEARER).json()["data"][0]["id"] == MODEL
        reply = c.post(url + "/v1/chat/completions", json=chat, headers=BEARER)
        assert reply.status_code == 200, reply.text
        assert "64 frames at 640x360" in reply.json()["choices"][0]["message"]["content"]
    assert guarded_standin.guard.counts["connections"] == 1
    assert standin.stats()["completed"] == 1


# ---- refused requests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "target"), REFUSED)
def test_refused_requests_get_403_and_never_reach_the_server(
    recorder: Recorder, guarded: GuardThread, method: str, target: str
) -> None:
    answer = raw(guarded.port, request(method, target, f"Authorization: Bearer {KEY}", body=b'{"x": 1}'))
    assert answer == b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    assert recorder.requests == [] and recorder.connections == 0


def test_the_standins_open_paths_are_refused_with_or_without_a_key(
    standin: StandIn, guarded_standin: GuardThread
) -> None:
    for path in ("/invocations", "/tokenize", "/pause", "/stats", "/stats/reset", "/version"):
        for headers in ({}, BEARER):
            with client() as c:
                assert c.post(guarded_standin.url + path, headers=headers, json={}).status_code == 403
    assert standin.stats()["requests"] == 0


def test_a_refusal_after_allowed_requests_closes_the_connection(
    recorder: Recorder, guarded: GuardThread
) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        for _ in range(3):
            sock.sendall(request("GET", "/health"))
            data = b""
            while not data.endswith(b"}"):
                data += sock.recv(65536)
            assert status_of(data) == 200
        sock.sendall(request("POST", "/invocations", body=b"{}"))
        data = b""
        while more := sock.recv(65536):
            data += more
    assert status_of(data) == 403
    assert recorder.targets() == ["/health"] * 3


def test_a_body_is_a_body_and_what_follows_it_is_checked_as_a_request(
    recorder: Recorder, guarded: GuardThread
) -> None:
    smuggled = b"GET /invocations HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        sock.sendall(request("POST", "/v1/completions", body=smuggled))
        data = b""
        while not data.endswith(b"}"):
            data += sock.recv(65536)
        assert status_of(data) == 200
        sock.sendall(smuggled)
        data = b""
        while more := sock.recv(65536):
            data += more
    assert data == b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    assert recorder.requests == [
        {
            "method": "POST",
            "target": "/v1/completions",
            "length": len(smuggled),
            "sha256": hashlib.sha256(smuggled).hexdigest(),
        }
    ]


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /health HTTP/1.1\r\nHost: x\n\nGET /invocations HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
        (b"POST /v1/x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET /v1/realtime HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 403),
        (b"GET /health HTTP/2.0\r\n\r\n", 505),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS, or noise
    ],
)
def test_malformed_heads_are_refused(
    recorder: Recorder, guarded: GuardThread, head: bytes, status: int
) -> None:
    assert status_of(raw(guarded.port, head)) == status
    assert recorder.requests == []


def test_an_oversized_head_gets_431(recorder: Recorder, guarded: GuardThread) -> None:
    huge = request("GET", "/v1/models", "X-Padding: " + "a" * 70_000)
    assert status_of(raw(guarded.port, huge)) == 431
    no_end = b"GET /v1/models HTTP/1.1\r\nX: " + b"b" * 200_000
    assert status_of(raw(guarded.port, no_end)) == 431
    assert recorder.requests == []
    with client() as c:
        assert c.get(guarded.url + "/v1/models", headers={"X-Ok": "a" * 30_000}).status_code == 200


def test_refusals_are_logged_in_one_line_without_headers_or_query(guarded: GuardThread) -> None:
    raw(guarded.port, request("POST", "/invocations?token=secret-in-query", f"Authorization: Bearer {KEY}"))
    raw(guarded.port, request("GET", "/\x1b[31mred" + "x" * 500))
    refused = [line for line in guarded.lines if line.startswith("refused")]
    assert refused[0] == "refused POST /invocations from 127.0.0.1: 403 path not allowed"
    assert "\x1b" not in refused[1] and len(refused[1]) < 250
    assert not any(KEY in line or "secret-in-query" in line for line in guarded.lines)


def test_the_refusal_log_is_rate_limited(recorder: Recorder) -> None:
    lines: list[str] = []
    windows: set[int] = set()

    async def scan() -> None:
        guard = Guard(recorder.upstream, log=lines.append)
        port = await guard.start()
        windows.add(int(asyncio.get_running_loop().time() // 60))
        for _ in range(guard_mod.LOG_LINES_PER_MINUTE + 40):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request("GET", "/metrics"))
            await reader.read()
            writer.close()
        windows.add(int(asyncio.get_running_loop().time() // 60))
        assert guard.counts["refused"] == guard_mod.LOG_LINES_PER_MINUTE + 40
        await guard.close()

    asyncio.run(scan())
    # The limit is per minute of the loop's clock: a scan across a minute's end may log a second minute's.
    limit = guard_mod.LOG_LINES_PER_MINUTE * len(windows)
    assert sum(line.startswith("refused") for line in lines) <= limit


# ---- bad clients, bad servers ----------------------------------------------------------------------------


def test_slow_and_garbage_clients_do_not_hold_up_others(recorder: Recorder, guarded: GuardThread) -> None:
    stalled = []
    for data in (
        b"GET /v1/mod",
        b"POST /v1/x HTTP/1.1\r\nContent-Length: 1000000\r\n\r\nabc",
        b"\x00" * 1000,
    ):
        sock = socket.create_connection(("127.0.0.1", guarded.port))
        sock.sendall(data)
        stalled.append(sock)
    try:
        started = time.monotonic()
        with client() as c:
            for _ in range(50):
                assert c.get(guarded.url + "/health").status_code == 200
        assert time.monotonic() - started < 5
        # Garbage that ends a head is answered at once; a half-sent body or head just waits.
        stalled[2].sendall(b"\r\n\r\n")
        stalled[2].settimeout(5)
        assert status_of(stalled[2].recv(1000)) == 400
    finally:
        for sock in stalled:
            sock.close()


def test_a_client_gone_mid_body_costs_nothing(recorder: Recorder, guarded: GuardThread) -> None:
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
            sock.sendall(b"POST /v1/x HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n" + b"y" * 100_000)
    with client() as c:
        assert c.get(guarded.url + "/health").status_code == 200
    deadline = time.monotonic() + 5
    while (guarded.guard._tasks or guarded.guard.counts["connections"] < 21) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert guarded.guard.counts["connections"] == 21 and not guarded.guard._tasks, "connections left open"


def test_a_half_closed_client_still_gets_its_answer(recorder: Recorder, guarded: GuardThread) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        sock.sendall(request("GET", "/v1/models"))
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while more := sock.recv(65536):
            data += more
    assert status_of(data) == 200 and data.endswith(b'"}')


def test_the_server_closing_closes_the_client(recorder: Recorder, guarded: GuardThread) -> None:
    with client() as c:
        assert c.get(guarded.url + "/v1/close").status_code == 200
        assert c.get(guarded.url + "/v1/models").status_code == 200  # a new connection
        with pytest.raises(httpx.RemoteProtocolError):
            c.get(guarded.url + "/v1/cut")  # half a response, then the server goes away
        assert c.get(guarded.url + "/health").status_code == 200
    assert guarded.guard.counts["connections"] == 3


def test_a_server_that_is_down_gives_502_and_the_guard_stays_up() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    g = GuardThread(port)
    try:
        answer = raw(g.port, request("GET", "/health"))
        assert answer == b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        assert raw(g.port, request("GET", "/invocations")).startswith(b"HTTP/1.1 403")
        rec = Recorder(port)
        try:
            with client() as c:
                assert c.get(g.url + "/health").status_code == 200
        finally:
            rec.stop()
        assert status_of(raw(g.port, request("GET", "/health"))) == 502
    finally:
        g.stop()
    states = [line for line in g.lines if line.startswith("model server")]
    assert len(states) == 3 and "cannot be reached" in states[0] and states[1].endswith("answers")


# ---- a model server on a unix socket (how the job runs vLLM) ---------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A private directory with a short path, like the job's: a unix socket's path has at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="vidcap-guard-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_unix_socket_upstream(sock_dir: Path) -> None:
    rec = Recorder(unix=sock_dir / "vllm.sock")
    g = GuardThread(rec.upstream)
    try:
        body = os.urandom(5 * 1024 * 1024 + 3)
        with client() as c:
            assert c.get(g.url + "/health").json()["target"] == "/health"
            got = c.post(g.url + "/v1/chat/completions", content=body).json()
            assert got["length"] == len(body) and got["sha256"] == hashlib.sha256(body).hexdigest()
            assert c.get(g.url + "/v1/bytes?n=3000000").content == b"x" * 3_000_000
            assert c.get(g.url + "/version").json()["target"] == "/version"
        assert rec.connections == 1 and g.guard.counts["forwarded"] == 4
        assert raw(g.port, request("POST", "/invocations", body=b"{}")).startswith(b"HTTP/1.1 403")
        with socket.create_connection(("127.0.0.1", g.port), timeout=10) as sock:  # half-closed client
            sock.sendall(request("GET", "/v1/models"))
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while more := sock.recv(65536):
                data += more
        assert status_of(data) == 200 and data.endswith(b'"}')
        assert rec.targets() == [
            "/health",
            "/v1/chat/completions",
            "/v1/bytes?n=3000000",
            "/version",
            "/v1/models",
        ]
    finally:
        g.stop()
        rec.stop()
    assert f"model server at unix:{sock_dir / 'vllm.sock'} answers" in g.lines


def test_a_unix_socket_that_is_missing_or_dead_gives_502(sock_dir: Path) -> None:
    path = sock_dir / "vllm.sock"
    g = GuardThread(Upstream(path=str(path)))
    bad_gateway = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    try:
        assert raw(g.port, request("GET", "/health")) == bad_gateway  # no socket file yet
        with socket.socket(socket.AF_UNIX) as stale:  # bound, never listening: refused
            stale.bind(str(path))
            assert raw(g.port, request("GET", "/v1/models")) == bad_gateway
        path.unlink()
        rec = Recorder(unix=path)
        try:
            with client() as c:
                assert c.get(g.url + "/health").status_code == 200
        finally:
            rec.stop()
        assert status_of(raw(g.port, request("GET", "/health"))) == 502  # the socket file stays behind
        assert g.guard.counts["upstream_errors"] == 3
    finally:
        g.stop()
    states = [line for line in g.lines if line.startswith("model server")]
    assert len(states) == 3, states
    assert states[0].startswith(f"model server at unix:{path} cannot be reached: FileNotFoundError")
    assert states[1] == f"model server at unix:{path} answers"
    assert "cannot be reached: ConnectionRefusedError" in states[2]


def test_the_standin_on_a_unix_socket_behind_the_guard(sock_dir: Path) -> None:
    with StandIn(api_key=KEY, decode="none", uds=str(sock_dir / "vllm.sock")) as standin:
        g = GuardThread(Upstream(path=str(sock_dir / "vllm.sock")))
        try:
            with client() as c:
                assert c.get(g.url + "/health").status_code == 200
                assert c.get(g.url + "/v1/models").status_code == 401
                for _ in range(20):
                    assert c.get(g.url + "/v1/models", headers=BEARER).json()["data"][0]["id"] == MODEL
                for path in ("/invocations", "/tokenize", "/pause"):
                    assert c.post(g.url + path, headers=BEARER, json={}).status_code == 403
            assert g.guard.counts["connections"] == 3 and g.guard.counts["upstream_errors"] == 0
        finally:
            g.stop()
        assert standin.stats()["requests"] == 0  # /v1/models and /health are not chat requests


# ---- the command ---------------------------------------------------------------------------------------


def _start_guard_process(
    tmp_path: Path, upstream: int | str, argv0: list[str]
) -> tuple[subprocess.Popen, int]:
    port_file = tmp_path / "sub dir" / "guard.port"
    args = ["--listen-host", "0.0.0.0", "--port", "0", "--port-file", str(port_file)]
    proc = subprocess.Popen(
        [*argv0, *args, "--upstream", f"127.0.0.1:{upstream}" if isinstance(upstream, int) else upstream],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + 15
    while not port_file.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "no port file"
        time.sleep(0.05)
    assert stat.S_IMODE(port_file.stat().st_mode) == 0o600
    return proc, int(port_file.read_text())


@pytest.mark.parametrize("how", ["module", "console script"])
def test_the_command(recorder: Recorder, tmp_path: Path, how: str) -> None:
    argv0 = (
        [sys.executable, "-m", "vidcap.guard"]
        if how == "module"
        else [str(Path(sys.executable).parent / "vidcap-guard")]
    )
    proc, port = _start_guard_process(tmp_path, recorder.port, argv0)
    try:
        with client() as c:
            assert c.get(f"http://127.0.0.1:{port}/health").status_code == 200
            assert c.get(f"http://127.0.0.1:{port}/metrics").status_code == 403
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert f"listening on 0.0.0.0:{port}" in err and "refused GET /metrics from 127.0.0.1" in err


def test_the_command_with_a_unix_socket_upstream(tmp_path: Path, sock_dir: Path) -> None:
    rec = Recorder(unix=sock_dir / "vllm.sock")
    proc, port = _start_guard_process(
        tmp_path, f"unix:{sock_dir / 'vllm.sock'}", [sys.executable, "-m", "vidcap.guard"]
    )
    try:
        with client() as c:
            assert c.get(f"http://127.0.0.1:{port}/health").status_code == 200
            assert c.post(f"http://127.0.0.1:{port}/invocations", json={}).status_code == 403
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        rec.stop()
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert f"to unix:{sock_dir / 'vllm.sock'}, refusing the rest" in err
    assert rec.targets() == ["/health"]


def test_the_command_refuses_a_bad_upstream() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vidcap.guard", "--upstream", "nohost"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "expected HOST:PORT" in done.stderr


def test_a_big_body_streams_through_in_bounded_memory(recorder: Recorder, tmp_path: Path) -> None:
    proc, port = _start_guard_process(tmp_path, recorder.port, [sys.executable, "-m", "vidcap.guard"])
    try:
        size, block = 300 * 1024 * 1024, os.urandom(1 << 20)
        digest = hashlib.sha256()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(f"POST /v1/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
            for _ in range(size // len(block)):
                sock.sendall(block)
                digest.update(block)
            data = b""
            while not data.endswith(b"}"):
                data += sock.recv(65536)
        got = json.loads(data.partition(b"\r\n\r\n")[2])
        assert got["length"] == size and got["sha256"] == digest.hexdigest()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        peak_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
        assert peak_kb < 80 * 1024, f"the guard's peak RSS was {peak_kb} kB for a 300 MB body"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
