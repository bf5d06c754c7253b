"""The guard: the only way into the model server from the cluster network (DESIGN.md §3-§4).

vLLM checks its API key only for paths under /v1, /v2, /inference and /cohere (vLLM's
docs/usage/security.md), and never for OPTIONS (its AuthenticationMiddleware lets CORS preflights
through). Everything else answers whoever reaches the port: /invocations (the same inference as
/v1/chat/completions), /tokenize, /detokenize, /pause, /resume, /abort_requests, /update_weights,
/metrics, /docs, ... So in the job vLLM listens only on a unix socket in a private (0700) node-local
directory, which no other user can connect to, and this proxy, bound on the node's address, is what
endpoint.json names. It lets through only

    GET /health                                     readiness; says nothing, needs no key
    GET /version                                    {"version": ...}: vidcap.client.server_info records
                                                    it in every caption record; read-only
    GET HEAD POST PUT PATCH DELETE /v1/<anything>   vLLM checks the API key there

and answers everything else itself, with an empty body and ``Connection: close``, then closes:

    400  a malformed head: request line, header syntax, a bare CR or LF, a control character, a bad or
         repeated Content-Length, Content-Length together with Transfer-Encoding
    403  a method or path not on the list above, and any path that is not plain: not starting with "/",
         containing "//", "..", "\\", "#", or "%2e" "%2f" "%5c" in any case (so /v1/../invocations,
         //invocations, /v1%2f.., absolute-form http://x/invocations, /health/../pause); lowercase or
         unknown methods, OPTIONS, TRACE, CONNECT; a request asking for a protocol switch (Upgrade)
    411  a body sent with Transfer-Encoding (chunked): only Content-Length bodies are forwarded. vidcap and
         the openai SDK always send Content-Length, and a chunked parser is one more place where the
         guard and vLLM could disagree about where a request ends (request smuggling)
    431  a request head over 64 KiB
    505  an HTTP version other than 1.0 and 1.1
    502  the model server cannot be reached when a connection's first allowed request arrives

A refused request is logged in one line (client address, method, path without its query, reason), never
its headers: they hold the API key. The log is rate-limited, so a scanner cannot fill the job's disk.

How it stays fast and simple: each client connection gets its own upstream connection, opened with its
first allowed request. Upstream to client is a plain byte pipe; responses are never parsed. Client to
upstream is read request by request: the head (checked, then forwarded as it came), then exactly
Content-Length bytes of body, streamed through in reads of up to 256 KiB, never held whole. Then the next
head. That is sound because HTTP/1.1 clients (httpx, the openai SDK) do not pipeline: a new head arrives
only after the previous response has been read in full, so answering a refused request on the same
connection cannot interleave with a response from vLLM (the upstream connection is dropped first anyway).
When the model server closes the connection (its keep-alive timeout, an error) the client's is closed
too; when the client closes, the upstream connection is half-closed the same way and closed when the
server is done. If the model server goes away in the middle of a response, the client sees its connection
closed. A bad client (slow, garbage, gone mid-body) costs one coroutine and never holds up another.

Run in the job as ``vidcap-guard --listen-host 0.0.0.0 --port 0 --port-file F --upstream unix:SOCKET``
(or ``python -m vidcap.guard ...``); ``--upstream HOST:PORT`` reaches a model server over TCP instead.
Standard library only; ``Guard`` runs in any event loop (tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import re
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from vidcap.privatefile import write_private

MAX_HEAD = 64 * 1024
CHUNK = 256 * 1024
FIRST_HEAD_TIMEOUT = 60.0  # a new connection must send its first request head within this
BODY_READ_TIMEOUT = 300.0  # a request body may pause this long between reads
CONNECT_TIMEOUT = 10.0
LINGER_SECONDS = 2.0  # after a refusal, read (and drop) what the client still sends, so it gets the answer
LINGER_BYTES = 4 * 1024 * 1024
LOG_LINES_PER_MINUTE = 60

V1_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
_GET_ONLY = frozenset({"/health", "/version"})  # exactly these targets, no query
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELDS = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n)*")
_FRAMING = re.compile(rb"^(content-length|transfer-encoding|upgrade):[ \t]*([^\r]*?)[ \t]*\r$", re.I | re.M)
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_ENCODED = ("%2e", "%2f", "%5c")
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    411: "Length Required",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    505: "HTTP Version Not Supported",
}


@dataclass(frozen=True)
class Upstream:
    """Where the model server listens: ``host`` and ``port`` over TCP, or ``path``, a unix socket."""

    host: str = ""
    port: int = 0
    path: str = ""  # when set, host and port are not used

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def connect(self) -> Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        if self.path:
            return asyncio.open_unix_connection(self.path, limit=CHUNK)
        return asyncio.open_connection(self.host, self.port, limit=CHUNK)


@dataclass(frozen=True)
class Forward:
    """An allowed request: its head goes upstream as it came, then ``length`` bytes of body."""

    method: str
    path: str
    length: int


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str
    method: str = ""
    path: str = ""


def path_refusal(method: str, target: str) -> str | None:
    """Why ``method target`` may not pass the guard, or None when it may."""
    path = target.partition("?")[0]
    low = path.lower()
    if not path.startswith("/"):
        return "not a plain path"
    if "//" in path or ".." in path or "\\" in path or "#" in target or any(e in low for e in _ENCODED):
        return "not a plain path"
    if "/./" in path + "/":
        return "not a plain path"
    if target in _GET_ONLY:
        return None if method == "GET" else "method not allowed"
    if path.startswith("/v1/"):
        return None if method in V1_METHODS else "method not allowed"
    return "path not allowed"


def check_head(head: bytes) -> Forward | Refusal:
    """What to do with one request head (the bytes up to and including the blank line)."""
    if not head.endswith(b"\r\n\r\n"):
        return Refusal(400, "no end of head")
    end = head.index(b"\r\n")
    request_line, fields = head[:end], head[end + 2 : -2]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        return Refusal(400, "malformed request line", path=_printable(request_line.partition(b"?")[0]))
    method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    if parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        status = 505 if _VERSION.fullmatch(parts[2]) else 400
        return _refusal(status, "unsupported HTTP version", method, parts[1])
    why = path_refusal(method, target)
    if why is not None:
        return _refusal(403, why, method, parts[1])
    # Every header line is "token:value" ending in CRLF: no bare CR or LF (a lenient parser behind us could
    # read a second request there), no folding, no space before the colon, no control characters.
    if not _FIELDS.fullmatch(fields):
        return _refusal(400, "malformed header line", method, parts[1])
    lengths: list[bytes] = []
    chunked = upgrade = False
    for m in _FRAMING.finditer(fields):
        name = m.group(1).lower()
        if name == b"content-length":
            lengths.append(m.group(2))
        elif name == b"transfer-encoding":
            chunked = True
        else:
            upgrade = True
    if upgrade:
        return _refusal(403, "protocol upgrade", method, parts[1])
    if chunked:
        return _refusal(400 if lengths else 411, "Transfer-Encoding body", method, parts[1])
    if len(lengths) > 1:
        return _refusal(400, "more than one Content-Length", method, parts[1])
    length = 0
    if lengths:
        if not lengths[0].isdigit() or len(lengths[0]) > 18:
            return _refusal(400, "bad Content-Length", method, parts[1])
        length = int(lengths[0])
    return Forward(method, target.partition("?")[0], length)


def _refusal(status: int, reason: str, method: str, target: bytes) -> Refusal:
    return Refusal(status, reason, method, _printable(target.partition(b"?")[0]))


def _printable(raw: bytes, limit: int = 120) -> str:
    text = "".join(ch if 32 <= ord(ch) < 127 else f"\\x{ord(ch):02x}" for ch in raw[:limit].decode("latin-1"))
    return text + ("..." if len(raw) > limit else "")


def _response(status: int) -> bytes:
    return f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()


def _stderr(line: str) -> None:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    sys.stderr.write(f"vidcap-guard {now}: {line}\n")
    sys.stderr.flush()


class _Limited:
    """At most ``per_minute`` lines a minute; then one line saying how many were left out."""

    def __init__(self, log: Callable[[str], None], per_minute: int) -> None:
        self.log, self.per_minute = log, per_minute
        self.window, self.count, self.dropped = -1, 0, 0

    def __call__(self, line: str) -> None:
        window = int(asyncio.get_running_loop().time() // 60)
        if window != self.window:
            if self.dropped:
                self.log(f"({self.dropped} more refusals in the last minute were not logged)")
            self.window, self.count, self.dropped = window, 0, 0
        if self.count < self.per_minute:
            self.count += 1
            self.log(line)
        else:
            self.dropped += 1


class Guard:
    """The allowlist proxy: ``start()`` binds, ``close()`` stops it and ends every open connection.

    ``counts`` says what it did: connections, forwarded (requests), refused, upstream_errors.
    """

    def __init__(
        self,
        upstream: Upstream,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log: Callable[[str], None] = _stderr,
    ) -> None:
        self.upstream = upstream
        self.host, self._port = host, port
        self.log = log
        self.log_refusal = _Limited(log, LOG_LINES_PER_MINUTE)
        self.counts: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._upstream_ok: bool | None = None  # logged when it changes, not once a request

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the guard is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._serve, self.host, self._port, limit=MAX_HEAD, backlog=512
        )
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def upstream_state(self, ok: bool, detail: str = "") -> None:
        if ok != self._upstream_ok:
            state = "answers" if ok else f"cannot be reached: {detail}"
            self.log(f"model server at {self.upstream} {state}")
            self._upstream_ok = ok

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.counts["connections"] += 1
        conn = _Connection(self, reader, writer)
        try:
            await conn.run()
        except asyncio.CancelledError:
            pass  # close(): the connection ends here
        except (ConnectionError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass  # a client or the server went away: nothing to tell anyone
        except Exception as exc:  # never let one connection take the guard down
            self.log(f"connection from {conn.peer} ended by {type(exc).__name__}: {exc}")
        finally:
            conn.close()
            if task is not None:
                self._tasks.discard(task)


class _Connection:
    def __init__(self, guard: Guard, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.guard, self.reader, self.writer = guard, reader, writer
        peer = writer.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else "?"
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.pump: asyncio.Task[None] | None = None

    async def run(self) -> None:
        first = True
        while True:
            try:
                read = self.reader.readuntil(b"\r\n\r\n")
                # Later heads need no timer: the model server closes an idle connection (keep-alive
                # timeout), which closes this one, and a long response must not be cut short.
                head = await (asyncio.wait_for(read, FIRST_HEAD_TIMEOUT) if first else read)
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    await self._client_done()
                return
            except asyncio.LimitOverrunError:
                await self._refuse(Refusal(431, "request head over 64 KiB"))
                return
            first = False
            verdict = check_head(head)
            if isinstance(verdict, Refusal):
                await self._refuse(verdict)
                return
            if self.up_writer is None and not await self._connect():
                return
            assert self.up_writer is not None
            self.guard.counts["forwarded"] += 1
            self.up_writer.write(head)
            remaining = verdict.length
            while remaining:
                data = await asyncio.wait_for(self.reader.read(min(CHUNK, remaining)), BODY_READ_TIMEOUT)
                if not data:
                    return  # gone in the middle of a body: drop both sides
                remaining -= len(data)
                self.up_writer.write(data)
                await self.up_writer.drain()
            await self.up_writer.drain()

    async def _connect(self) -> bool:
        try:
            self.up_reader, self.up_writer = await asyncio.wait_for(
                self.guard.upstream.connect(), CONNECT_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError) as exc:
            self.guard.counts["upstream_errors"] += 1
            self.guard.upstream_state(False, f"{type(exc).__name__}: {exc}")
            await self._answer(502)
            return False
        self.guard.upstream_state(True)
        self.pump = asyncio.create_task(self._pump())
        return True

    async def _pump(self) -> None:
        """Model server -> client, byte for byte; when the server closes, the client's connection ends."""
        assert self.up_reader is not None
        with contextlib.suppress(ConnectionError, OSError):
            while data := await self.up_reader.read(CHUNK):
                self.writer.write(data)
                await self.writer.drain()
        # Not when cancelled (a refusal drops the upstream side and answers the client itself).
        self.writer.close()  # sends what is buffered, then FIN; the request loop then sees EOF

    async def _client_done(self) -> None:
        """The client closed its side between requests: pass that on, and let the server finish."""
        if self.up_writer is None or self.pump is None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            if self.up_writer.can_write_eof() and not self.up_writer.is_closing():
                self.up_writer.write_eof()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.pump), BODY_READ_TIMEOUT)

    async def _refuse(self, refusal: Refusal) -> None:
        self.guard.counts["refused"] += 1
        what = f"{refusal.method} {refusal.path}".strip() or "(no request line)"
        self.guard.log_refusal(f"refused {what} from {self.peer}: {refusal.status} {refusal.reason}")
        await self._answer(refusal.status)

    async def _answer(self, status: int) -> None:
        """Send a status of our own and close, reading what the client still sends for a moment: closing
        with unread data would reset the connection, and the client might never see the answer."""
        self._drop_upstream()
        self.writer.write(_response(status))
        if self.writer.can_write_eof():
            self.writer.write_eof()
        loop = asyncio.get_running_loop()
        deadline, dropped = loop.time() + LINGER_SECONDS, 0
        with contextlib.suppress(OSError, asyncio.TimeoutError, asyncio.LimitOverrunError):
            while dropped < LINGER_BYTES and loop.time() < deadline:
                data = await asyncio.wait_for(self.reader.read(CHUNK), deadline - loop.time())
                if not data:
                    break
                dropped += len(data)

    def _drop_upstream(self) -> None:
        if self.pump is not None:
            self.pump.cancel()
        if self.up_writer is not None:
            self.up_writer.transport.abort()

    def close(self) -> None:
        if self.pump is not None and not self.pump.done():
            self.pump.cancel()
        if self.up_writer is not None:
            self.up_writer.close()
        self.writer.close()


# -- the command --------------------------------------------------------------------------------------------


def parse_upstream(text: str) -> Upstream:
    """'unix:/path/vllm.sock' (a unix socket), '127.0.0.1:8000' or '[::1]:8000'; ValueError otherwise."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path or "\0" in path:
            raise ValueError(f"--upstream {text!r}: expected unix:PATH, e.g. unix:/tmp/d/vllm.sock")
        return Upstream(path=path)
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--upstream {text!r}: expected HOST:PORT or unix:PATH, e.g. 127.0.0.1:8000")
    return Upstream(host, int(port))


async def serve(
    upstream: Upstream,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    port_file: Path | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Guard ``upstream`` until SIGTERM/SIGINT; the bound port goes to port_file (0600) and ready."""
    guard = Guard(upstream, host=host, port=port)
    bound = await guard.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if port_file is not None:
            write_private(Path(port_file), f"{bound}\n")
        guard.log(
            f"listening on {host}:{bound}; passing GET /health, GET /version and /v1/ to {upstream}, "
            "refusing the rest"
        )
        if ready is not None:
            ready(bound)
        await stop.wait()
    finally:
        await guard.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vidcap-guard",
        description="Pass only GET /health, GET /version and /v1/ requests to the model server (see "
        "vidcap/guard.py).",
    )
    parser.add_argument(
        "--upstream", required=True, help="the model server: unix:PATH (its unix socket) or HOST:PORT"
    )
    parser.add_argument("--listen-host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default 0: the kernel picks)")
    parser.add_argument("--port-file", type=Path, help="write the bound port here (0600)")
    args = parser.parse_args(argv)
    try:
        upstream = parse_upstream(args.upstream)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(serve(upstream, host=args.listen_host, port=args.port, port_file=args.port_file))
    except OSError as exc:
        _stderr(f"cannot listen on {args.listen_host}:{args.port}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
