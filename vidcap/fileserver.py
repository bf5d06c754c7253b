"""The file server that runs on the GPU node beside vLLM (DESIGN.md §1-§2): one directory tree, one token.

Every URL is ``/t/<TOKEN>/<route>/<path>``; ``<path>`` is percent-encoded once, relative to the root:

    GET  health                        {"ok": true, "root": <real path of the root>, "version": ...}
    GET  list/<subdir>?ext=.mp4,.mkv   chunked NDJSON, one line per discovery.walk item, relative to
                                       <subdir>; the last line {"end": true, "count": N} marks it complete
    GET  count/<subdir>?ext=&shard=i/N {"count": N}: what a listing would give as videos (entries, and
                                       problems with a video extension), in shard i/N when given; so the
                                       laptop's progress bar gets a total without a second listing
    GET  probe/<path>?audio=1          media.probe as JSON (cached); 422 {"error", "message"}
    GET  f/<path>                      the bytes (HEAD too), one Range: 206, or 416 when unsatisfiable
    GET  audio/<path>?start=&end=      16 kHz mono 16-bit WAV of the span; 404 {"error": "no_audio"}
    GET  frames/<path>?start=&end=&fps=&max_pixels=
                                       {"video_url", "num_frames", "width", "height"}; 422 for a MediaError

A wrong token, an unknown route, a path outside the root and a missing file all get the same 404 with an
empty body, so the server says nothing to whoever lacks the token. Bad parameters get 400 JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hmac
import json
import math
import mimetypes
import os
import re
import secrets
import signal
import socket
import socketserver
import stat
import sys
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from vidcap import __version__, media
from vidcap.discovery import Entry, Problem, parse_shard, shard_of, walk
from vidcap.errors import MediaError, UsageError
from vidcap.privatefile import write_private

VIDEO_EXTS = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts")
LIST_FLUSH_BYTES = 64 * 1024
LIST_FLUSH_SECONDS = 0.2  # a slow disk still shows the client progress
# encode_inline holds a span's decoded frames at once; far above what one context can take, and it
# keeps one typo (fps=3000) from decoding a film into memory.
MAX_DECODED_BYTES = 512 * 1024 * 1024
_TOKEN_OK = re.compile(r"[A-Za-z0-9._~-]{16,}")
_IN_PATH = re.compile(r"/t/[^/\s]*")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
# The system's mime.types may lack these, or call .ts a Qt translation file.
_VIDEO_TYPES = {".mkv": "video/x-matroska", ".webm": "video/webm", ".ts": "video/mp2t", ".m4v": "video/mp4"}


class _NotFound(Exception):
    pass


class _BadRequest(Exception):
    pass


class _Unsatisfiable(Exception):
    pass


class FileServer(ThreadingHTTPServer):
    """Bound on creation; serve_forever() serves until shutdown(). ``port`` is the bound port."""

    daemon_threads = True
    request_queue_size = 128  # the stock 5 drops connections when a caption run opens 64 at once

    def __init__(
        self,
        root: Path,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        verbose: bool = False,
        decoders: int | None = None,
        cache_size: int = 4096,
    ) -> None:
        real = os.path.realpath(root)
        if not os.path.isdir(real):
            raise UsageError(f"{root} is not a directory; give 'vidcap files serve' the dataset directory")
        if not token:
            raise UsageError("the file server needs a token")
        self.root = real
        self.root_prefix = real if real.endswith(os.sep) else real + os.sep
        self.token = token
        self.verbose = verbose
        # Keyed by (real path, size, mtime_ns, audio); failures are not kept, so a flaky disk pins nothing.
        self.cached_probe = functools.lru_cache(maxsize=cache_size)(self._probe)
        self.decode_slots = threading.BoundedSemaphore(decoders or os.cpu_count() or 1)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup of the host, which hangs on some cluster nodes.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.verbose:
            exc = sys.exc_info()[1]
            self.log(f"connection error: {type(exc).__name__}: {exc}")

    def log(self, text: str) -> None:
        if self.verbose:
            sys.stderr.write(self.redact(text) + "\n")

    def redact(self, text: str) -> str:
        return _IN_PATH.sub("/t/***", text).replace(self.token, "***")

    def inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root_prefix)

    def resolve(self, rel_raw: str) -> str:
        """The real path of a client path, or _NotFound if it is malformed or leads outside the root."""
        rel = unquote(rel_raw, errors="surrogateescape")
        if "\x00" in rel or rel.startswith(("/", "\\")):
            raise _NotFound
        # Backslash is an ordinary character here, but a name like ..\x could be one on a share.
        if any(part == ".." for part in re.split(r"[/\\]", rel)):
            raise _NotFound
        real = os.path.realpath(os.path.join(self.root, rel))
        if not self.inside(real):
            raise _NotFound
        return real

    def probe(self, real: str, st: os.stat_result, audio: bool) -> media.Probe:
        return self.cached_probe(real, st.st_size, st.st_mtime_ns, audio)

    def _probe(self, real: str, size: int, mtime_ns: int, audio: bool) -> media.Probe:
        with self.decode_slots:
            return media.probe(real, audio=audio)


def _regular(real: str) -> os.stat_result:
    try:
        st = os.stat(real)
    except OSError:
        raise _NotFound from None
    if not stat.S_ISREG(st.st_mode):  # a directory, or a FIFO that would block the thread forever
        raise _NotFound
    return st


def _num(query: dict[str, list[str]], name: str, default: float | None = None) -> float:
    values = query.get(name)
    if not values:
        if default is None:
            raise _BadRequest(f"missing query parameter {name}")
        return default
    try:
        value = float(values[-1])
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise _BadRequest(f"{name} must be a finite number >= 0 (got {values[-1][:40]!r})")
    return value


def _content_type(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return _VIDEO_TYPES.get(ext) or mimetypes.guess_type(path)[0] or "application/octet-stream"


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for one byte range; None = send it all (no header, or one we ignore as
    RFC 9110 allows: malformed or multi-range); _Unsatisfiable for a range past the end."""
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if not m or m.group(1) == m.group(2) == "":
        return None
    first, last = m.group(1), m.group(2)
    if first == "":
        n = int(last)
        if n == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - n), size - 1
    a = int(first)
    b = size - 1 if last == "" else min(int(last), size - 1)
    if a >= size or a > b:
        raise _Unsatisfiable
    return a, b


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "vidcap-files"
    sys_version = ""
    timeout = 300  # an idle keep-alive connection gives its thread back
    server: FileServer

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log(f"{self.address_string()} [{self.log_date_time_string()}] {format % args}")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The stock error page echoes the request line, which holds the token.
        self.log_error("error %d", code)
        self.close_connection = True
        self._empty(code)

    # -- plumbing ---------------------------------------------------------------------------------------

    def _dispatch(self, head: bool) -> None:
        self._head, self._started = head, False
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # no route reads a body, so the next request would start in it
        try:
            raw, _, query_text = self.path.partition("?")
            parts = raw.split("/", 4)
            if len(parts) < 4 or parts[0] or parts[1] != "t":
                raise _NotFound
            if not hmac.compare_digest(parts[2].encode("latin-1"), self.server.token.encode("latin-1")):
                raise _NotFound
            route = _ROUTES.get(parts[3])
            if route is None:
                raise _NotFound
            route(self, parts[4] if len(parts) == 5 else "", parse_qs(query_text, keep_blank_values=True))
        except _NotFound:
            self._empty(404)
        except _BadRequest as exc:
            self._json(400, {"error": "bad_request", "message": str(exc)})
        except MediaError as exc:
            self._json(422, {"error": exc.kind, "message": exc.message})
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away; nothing to tell anyone
        except Exception as exc:
            self.close_connection = True
            self.server.log(f"error on {self.command} {self.path}: {type(exc).__name__}: {exc}")
            if not self._started:
                line = (str(exc).splitlines() or [""])[0][:300]
                with contextlib.suppress(OSError):
                    self._json(500, {"error": "internal", "message": f"{type(exc).__name__}: {line}"})

    def _start(self, status: int, headers: dict[str, str]) -> None:
        self._started = True
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        base = {"Content-Type": ctype, "Content-Length": str(len(body)), "Cache-Control": "no-store"}
        self._start(status, {**base, **(headers or {})})
        if not self._head:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _empty(self, status: int) -> None:
        self._start(status, {"Content-Length": "0"})

    # -- routes -----------------------------------------------------------------------------------------

    def health(self, rel: str, query: dict[str, list[str]]) -> None:
        if rel:
            raise _NotFound
        self._json(200, {"ok": True, "root": self.server.root, "version": __version__})

    def _walk_query(self, rel: str, query: dict[str, list[str]]) -> tuple[str, tuple[str, ...]]:
        real = self.server.resolve(rel)
        if not os.path.isdir(real):
            raise _NotFound
        given = [e.strip().lower() for v in query.get("ext", []) for e in v.split(",") if e.strip()]
        return real, tuple(e if e.startswith(".") else "." + e for e in given) or VIDEO_EXTS

    def count(self, rel: str, query: dict[str, list[str]]) -> None:
        real, exts = self._walk_query(rel, query)
        try:
            shard = parse_shard(query.get("shard", [None])[0])
        except ValueError as exc:
            raise _BadRequest(str(exc)) from None
        n = 0
        for item in self._checked(walk(Path(real), exts)):  # as the listing: links out of the root
            video = isinstance(item, Entry) or item.video
            if video and (shard is None or shard_of(item.rel, shard[1]) == shard[0]):
                n += 1
        self._json(200, {"count": n})

    def listing(self, rel: str, query: dict[str, list[str]]) -> None:
        real, exts = self._walk_query(rel, query)
        self._start(200, {"Content-Type": "application/x-ndjson", "Transfer-Encoding": "chunked"})
        if self._head:
            return
        buf: list[bytes] = []
        size, count, last = 0, 0, time.monotonic()
        for item in self._checked(walk(Path(real), exts)):
            if isinstance(item, Entry):
                obj: dict[str, Any] = {"path": item.rel, "size": item.size, "mtime": item.mtime}
            else:
                obj = {"path": item.rel, "problem": item.kind, "message": item.message, "video": item.video}
            # ensure_ascii: every line is plain ASCII, so no name can smuggle in a line break.
            line = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
            buf.append(line)
            size, count = size + len(line), count + 1
            if size >= LIST_FLUSH_BYTES or time.monotonic() - last >= LIST_FLUSH_SECONDS:
                self._chunk(b"".join(buf))
                buf, size, last = [], 0, time.monotonic()
        buf.append(json.dumps({"end": True, "count": count}).encode() + b"\n")
        self._chunk(b"".join(buf))
        self.wfile.write(b"0\r\n\r\n")

    def _checked(self, items: Any) -> Any:
        """walk() follows symlinks; a link that leads out of the root is reported, not served."""
        last_dir, dir_ok = "", True
        for item in items:
            if isinstance(item, Entry):
                parent = os.path.dirname(item.path)
                if parent != last_dir:
                    last_dir, dir_ok = parent, self.server.inside(os.path.realpath(parent))
                ok = dir_ok and (
                    not os.path.islink(item.path) or self.server.inside(os.path.realpath(item.path))
                )
                if not ok:
                    item = Problem(item.rel, "outside_root", "symlink leads outside the served root", False)
            yield item

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def probe(self, rel: str, query: dict[str, list[str]]) -> None:
        real = self.server.resolve(rel)
        st = _regular(real)
        audio = query.get("audio", ["1"])[-1].lower() not in ("0", "false", "no", "")
        self._json(200, dataclasses.asdict(self.server.probe(real, st, audio)))

    def raw_file(self, rel: str, query: dict[str, list[str]]) -> None:
        real = self.server.resolve(rel)
        _regular(real)
        try:
            fh = open(real, "rb")  # noqa: SIM115 - closed below, after the transfer
        except OSError:
            raise _NotFound from None
        with fh:
            st = os.fstat(fh.fileno())
            size = st.st_size
            headers = {
                "Content-Type": _content_type(real),
                "Accept-Ranges": "bytes",
                "Last-Modified": formatdate(st.st_mtime, usegmt=True),
            }
            try:
                span = parse_range(self.headers.get("Range"), size)
            except _Unsatisfiable:
                self._start(416, {"Content-Range": f"bytes */{size}", "Content-Length": "0"})
                return
            first, last = span or (0, size - 1)
            headers["Content-Length"] = str(last - first + 1)
            if span is not None:
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            self._start(206 if span else 200, headers)
            if not self._head and last >= first:
                self.connection.sendfile(fh, first, last - first + 1)

    def audio(self, rel: str, query: dict[str, list[str]]) -> None:
        real = self.server.resolve(rel)
        _regular(real)
        start, end = _num(query, "start", 0.0), _num(query, "end", math.inf)  # no end: to the end
        if end <= start:
            raise _BadRequest(f"end ({end}) must be after start ({start})")
        with self.server.decode_slots:
            wav = media.audio_wav(real, start, None if math.isinf(end) else end)
        if wav is None:
            self._json(404, {"error": "no_audio", "message": "the file has no audio in this span"})
        else:
            self._send(200, wav, "audio/wav")

    def frames(self, rel: str, query: dict[str, list[str]]) -> None:
        real = self.server.resolve(rel)
        st = _regular(real)
        start, end, fps = _num(query, "start"), _num(query, "end"), _num(query, "fps")
        max_pixels = int(_num(query, "max_pixels"))
        if end <= start or fps <= 0 or max_pixels < media.PATCH * media.PATCH:
            raise _BadRequest("need end > start, fps > 0 and max_pixels >= 1024")
        probe = self.server.probe(real, st, audio=False)  # encode_inline needs only the frame size
        n = media.frame_count(end - start, fps)
        w, h = media.fit_size(probe.width, probe.height, max_pixels)
        if n * w * h * 3 > MAX_DECODED_BYTES:
            raise _BadRequest(f"{n} frames of {w}x{h} is too much for one request; lower fps or the span")
        with self.server.decode_slots:
            got = media.encode_inline(real, probe, start, end, fps, max_pixels, with_audio=False)
        self._json(200, {k: v for k, v in dataclasses.asdict(got).items() if not k.startswith("audio")})


_ROUTES: dict[str, Callable[[_Handler, str, dict[str, list[str]]], None]] = {
    "health": _Handler.health,
    "list": _Handler.listing,
    "count": _Handler.count,
    "probe": _Handler.probe,
    "f": _Handler.raw_file,
    "audio": _Handler.audio,
    "frames": _Handler.frames,
}


def serve(
    root: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str,
    port_file: Path | None = None,
    ready: Callable[[int], None] | None = None,
    verbose: bool = False,
) -> None:
    """Serve ``root`` until SIGTERM/SIGINT (or shutdown()); the bound port goes to port_file and ready."""
    with FileServer(root, token, host, port, verbose=verbose) as server:
        if port_file is not None:
            write_private(Path(port_file), f"{server.port}\n")
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():

            def stop(signum: int, frame: Any) -> None:
                # shutdown() waits for serve_forever, which runs on this very thread: ask from another.
                threading.Thread(target=server.shutdown, daemon=True).start()

            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, stop)
        try:
            if ready is not None:
                ready(server.port)
            server.serve_forever(poll_interval=0.5)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def load_or_create_token(token_file: Path | None) -> str:
    """The token from the first line of ``token_file``; a new one written there (0600) if it is missing.
    With no file the token lives only in this process."""
    if token_file is None:
        return secrets.token_urlsafe(32)
    path = Path(token_file)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_or_create_token(path)  # another process won the race; use its token
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(token + "\n")
        return token
    try:
        token = path.read_text(encoding="utf-8").split("\n", 1)[0].strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the token file {path}: {exc}") from exc
    if not _TOKEN_OK.fullmatch(token):
        # The token goes into URL paths as is; say what is wrong without echoing it.
        raise UsageError(
            f"the token in {path} must be at least 16 characters of A-Z a-z 0-9 . _ ~ -; "
            "delete the file to have a new one generated"
        )
    return token
