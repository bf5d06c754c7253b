"""The event-loop side of the stand-in: connections, routes, the chat pipeline, slots and stats.

Everything here runs on one asyncio loop; only media decoding goes to a thread pool. ``Core`` is used
by ``StandIn`` (a loop in a daemon thread) and by the CLI (``asyncio.run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import random
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

from . import chat, media, tokens, wire
from .accounting import Slots, Stats
from .options import INJECTED_STATUSES, Options

log = logging.getLogger("standin")

VERSION = "0.0.0-standin"
BY_VIDEO_CAP = 100_000
_UNAUTHORIZED = b'{"error":"Unauthorized"}'
_NOT_FOUND = b'{"detail":"Not Found"}'
_NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'
_ROUTES = {
    "/health": "GET",
    "/version": "GET",
    "/v1/models": "GET",
    "/v1/chat/completions": "POST",
    "/stats": "GET",
    "/stats/reset": "POST",
}


class _Protocol(asyncio.StreamReaderProtocol):
    """A stream protocol that notices the peer leaving (FIN or reset) while a request is being served,
    so a queued or sleeping request is abandoned like vLLM aborts requests of disconnected clients."""

    def __init__(self, core: Core) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(
            asyncio.StreamReader(limit=wire.MAX_HEAD_BYTES, loop=loop), core.serve_connection, loop=loop
        )
        self.loop = loop
        self.task: asyncio.Task[None] | None = None
        self.busy = False
        self.in_chat = False
        self.client_gone = False
        self.last_active = loop.time()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        super().data_received(data)

    def eof_received(self) -> bool:
        self._gone()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()
        super().connection_lost(exc)

    def _gone(self) -> None:
        if self.in_chat and not self.client_gone and self.task is not None:
            self.client_gone = True
            self.task.cancel()


@dataclass(slots=True)
class _Outcome:
    """What one chat request came to, for stats and the log file."""

    status: int | None = None
    video: str | None = None
    audio: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


_DROP = object()


class Core:
    def __init__(self, options: Options) -> None:
        options.validate()
        self.options = options
        self.stats = Stats()
        self.slots = Slots(lambda: self.options.slots)
        self.rng = random.Random(options.seed)
        self._api_key = options.effective_api_key()
        self._source = media.Source(options.allowed_root(), options.decode == "full", options.fetch_timeout)
        self._pool: ThreadPoolExecutor | None = None
        self._log_file: IO[str] | None = None
        self._log_path: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Protocol] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._warned_fields: set[str] = set()
        self.port = options.port
        self._unix_inode: int | None = None  # the socket file we made (options.uds)

    # ---- lifecycle (all on the loop) ---------------------------------------------------------------

    async def start(self) -> int:
        """Listen (on ``options.port``, or the port picked the first time; or on the unix socket
        ``options.uds``); return the port (0 for a unix socket)."""
        loop = asyncio.get_running_loop()
        if self._pool is None:
            workers = self.options.decode_workers or min(32, (os.cpu_count() or 1) + 4)
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="standin-decode")
        if self.options.uds:
            sock = self._bind_unix(self.options.uds)
            try:
                self._server = await loop.create_server(lambda: _Protocol(self), sock=sock, backlog=2048)
            except BaseException:
                sock.close()
                raise
            self.port = 0
        else:
            server = await loop.create_server(
                lambda: _Protocol(self), self.options.host, self.port, reuse_address=True, backlog=2048
            )
            self._server = server
            self.port = server.sockets[0].getsockname()[1]
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep_idle())
        if self.options.port_file and not self.options.uds:
            _write_atomic(self.options.port_file, f"{self.port}\n")
        return self.port

    def _bind_unix(self, path: str) -> socket.socket:
        """Bind like vLLM's create_server_unix_socket (api_server.py): a plain bind, which fails with
        EADDRINUSE when the path exists; uvicorn then listens on it (create_server(sock=...)) and nothing
        removes the socket file afterwards. Only our own socket, left by pause(), is replaced."""
        if self._unix_inode is not None:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == self._unix_inode:
                    os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except BaseException:
            sock.close()
            raise
        self._unix_inode = os.stat(path).st_ino
        return sock

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def pause(self) -> None:
        """Stop listening and abort every connection, as if the server (or its tunnel) went away."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for proto in list(self._connections):
            if proto.in_chat:
                proto.client_gone = True  # their requests end as "cancelled", not as errors
            if proto.transport is not None:
                proto.transport.abort()
            if proto.task is not None:
                proto.task.cancel()
        await asyncio.sleep(0)

    async def close(self) -> None:
        await self.pause()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
            self._log_path = None

    def apply(self, name: str) -> None:
        """Make a changed option take effect (called on the loop after ``options`` was updated)."""
        o = self.options
        if name in ("api_key", "api_key_file"):
            self._api_key = o.effective_api_key()
        elif name in ("allowed_local_media_path", "decode", "fetch_timeout"):
            self._source = media.Source(o.allowed_root(), o.decode == "full", o.fetch_timeout)
        elif name == "seed":
            self.rng.seed(o.seed)
        elif name == "slots":
            self.slots.wake()

    def snapshot(self) -> dict[str, Any]:
        return self.stats.snapshot(len(self.slots.waiters))

    async def _sweep_idle(self) -> None:
        # uvicorn (so vLLM) closes connections idle for 5 s; clients must cope with that race.
        while True:
            timeout = self.options.keep_alive_timeout
            await asyncio.sleep(min(1.0, timeout / 2) if timeout > 0 else 1.0)
            if timeout <= 0:
                continue
            deadline = asyncio.get_running_loop().time() - timeout
            for proto in list(self._connections):
                if not proto.busy and proto.last_active < deadline and proto.transport is not None:
                    proto.transport.close()

    # ---- connections -------------------------------------------------------------------------------

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proto: _Protocol = writer.transport.get_protocol()  # type: ignore[assignment]
        proto.task = asyncio.current_task()
        self._connections.add(proto)
        try:
            while True:
                proto.busy = False
                try:
                    req = await wire.read_request(reader, writer)
                except wire.HTTPError as exc:
                    writer.write(
                        wire.render(exc.status, wire.error_body(exc.status, exc.message), keep_alive=False)
                    )
                    break
                if req is None:
                    break
                proto.busy = True
                reply = await self._route(req, proto)
                if reply is _DROP:
                    writer.transport.abort()
                    return
                status, body = reply
                writer.write(
                    wire.render(status, body, keep_alive=req.keep_alive, http10=req.version == "HTTP/1.0")
                )
                await writer.drain()
                proto.last_active = proto.loop.time()
                if not req.keep_alive:
                    break
        except asyncio.CancelledError:
            # The client left, or pause()/close() ended the connection. Python 3.11's stream protocol
            # reports a connection task that ends cancelled as an error, so it ends normally.
            pass
        except (ConnectionError, OSError):
            pass
        finally:
            self._connections.discard(proto)
            writer.close()

    async def _route(self, req: wire.Request, proto: _Protocol) -> Any:
        path, method = req.path, req.method
        expected = _ROUTES.get(path)
        if path.startswith("/v1") and self._api_key is not None and not self._authorized(req):
            if expected == method == "POST":
                self._count_chat_without_body(401)
            return 401, _UNAUTHORIZED
        if expected is None:
            return 404, _NOT_FOUND
        if method != expected:
            return 405, _NOT_ALLOWED
        if path == "/v1/chat/completions":
            proto.in_chat = True
            try:
                return await self._chat(req)
            finally:
                proto.in_chat = False
        if path == "/health":
            return (200, b"") if self.options.healthy else (503, b"")
        if path == "/version":
            return 200, wire.dumps({"version": VERSION})
        if path == "/v1/models":
            return 200, wire.dumps(self._models())
        if path == "/stats":
            return 200, wire.dumps(self.snapshot())
        self.stats.reset()
        return 200, wire.dumps(self.snapshot())

    def _authorized(self, req: wire.Request) -> bool:
        given = req.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self._api_key}".encode())

    def _models(self) -> dict[str, Any]:
        now = int(time.time())
        name = self.options.served_name
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": now,
                    "owned_by": "vllm",
                    "root": self.options.model,
                    "parent": None,
                    "max_model_len": self.options.max_model_len,
                    "permission": [
                        {
                            "id": f"modelperm-{uuid.uuid4().hex}",
                            "object": "model_permission",
                            "created": now,
                            "allow_create_engine": False,
                            "allow_sampling": True,
                            "allow_logprobs": True,
                            "allow_search_indices": False,
                            "allow_view": True,
                            "allow_fine_tuning": False,
                            "organization": "*",
                            "group": None,
                            "is_blocking": False,
                        }
                    ],
                }
            ],
        }

    # ---- chat --------------------------------------------------------------------------------------

    async def _chat(self, req: wire.Request) -> Any:
        st = self.stats
        st.requests += 1
        if st.first_request_ts is None:
            st.first_request_ts = time.time()
        started = time.perf_counter()
        out = _Outcome()
        try:
            reply = await self._answer(req, out)
        except chat.ApiError as exc:
            reply = exc.status, wire.error_body(exc.status, exc.message)
        except asyncio.CancelledError:
            st.cancelled += 1
            self._write_log(out, "cancelled", started)
            raise
        except Exception as exc:  # a stand-in bug must show up as a 500, not a hung client
            log.exception("stand-in failed on a chat request")
            reply = 500, wire.error_body(500, f"stand-in internal error: {exc!r}")
        if reply is _DROP:
            st.dropped += 1
            self._write_log(out, "dropped", started)
            return reply
        out.status = reply[0]
        st.last_response_ts = time.time()
        if out.status == 200:
            st.completed += 1
            st.prompt_tokens += out.prompt_tokens
            st.completion_tokens += out.completion_tokens
            if out.video is not None:
                if out.video in st.by_video or len(st.by_video) < BY_VIDEO_CAP:
                    st.by_video[out.video] += 1
                else:
                    st.by_video_overflow += 1
            self._write_log(out, "completed", started)
        else:
            st.errors[out.status] += 1
            self._write_log(out, "error", started)
        return reply

    def _count_chat_without_body(self, status: int) -> None:
        st = self.stats
        st.requests += 1
        if st.first_request_ts is None:
            st.first_request_ts = time.time()
        st.errors[status] += 1
        st.last_response_ts = time.time()
        self._write_log(_Outcome(status), "error", time.perf_counter())

    async def _answer(self, req: wire.Request, out: _Outcome) -> Any:
        o = self.options
        try:
            body = json.loads(req.body)
        except ValueError as exc:
            raise chat.bad(f"Invalid JSON body: {exc}") from exc
        parsed: chat.ChatRequest | None = None
        invalid: chat.ApiError | None = None
        try:
            parsed = chat.parse_chat(body, served_model_name=o.served_name, limits=o.limits())
        except chat.ApiError as exc:
            invalid = exc  # injected faults come first: they stand for trouble in front of vLLM

        if o.error_rate > 0 and self.rng.random() < o.error_rate:
            self._name_media(parsed, out)
            status = self.rng.choice(INJECTED_STATUSES)
            raise chat.ApiError(status, f"stand-in injected error {status} (error_rate={o.error_rate})")
        if o.drop_rate > 0 and self.rng.random() < o.drop_rate:
            self._name_media(parsed, out)
            return _DROP
        if invalid is not None:
            raise invalid
        assert parsed is not None
        for name in parsed.unknown_fields:
            if name not in self._warned_fields:
                self._warned_fields.add(name)
                log.info("ignoring unknown chat request field %r", name)

        if parsed.media and self._source.decode:
            prep = await asyncio.get_running_loop().run_in_executor(
                self._pool, _prepare, parsed, self._source, o.video_max_pixels, o.drop_audio
            )
        else:
            prep = _prepare(parsed, self._source, o.video_max_pixels, o.drop_audio)
        out.video, out.audio = prep.video_key, prep.audio_key
        prompt = tokens.prompt_tokens(parsed.texts, prep.media_tokens)
        out.prompt_tokens = prompt
        max_tokens, problem = tokens.check_context(prompt, parsed.max_tokens, o.max_model_len)
        if problem is not None:
            raise chat.bad(problem)
        text = chat.reply_text(parsed.prompt, prep.video, prep.audio, prep.picture)
        text, completion, finish = tokens.completion(text, max_tokens)

        await self._occupy_slot()
        out.completion_tokens, out.finish_reason = completion, finish
        return 200, wire.dumps(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": o.served_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "reasoning_content": None,
                            "tool_calls": [],
                        },
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                    "prompt_tokens_details": None,
                },
                "system_fingerprint": None,
                "prompt_logprobs": None,
            }
        )

    async def _occupy_slot(self) -> None:
        """Wait for a slot (FIFO), hold it for the configured latency, release it."""
        o = self.options
        delay = o.latency
        if o.latency_jitter > 0:
            delay = max(0.0, delay + self.rng.uniform(-o.latency_jitter, o.latency_jitter))
        await self.slots.acquire()
        st = self.stats
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        held_from = time.monotonic()
        try:
            if delay > 0:
                await asyncio.sleep(delay)
        finally:
            st.in_flight -= 1
            st.busy_slot_seconds += time.monotonic() - max(held_from, st.reset_at)
            self.slots.release()

    def _name_media(self, parsed: chat.ChatRequest | None, out: _Outcome) -> None:
        if parsed is not None:
            video, audio = parsed.first("video"), parsed.first("audio")
            out.video = media.media_key(video.url) if video else None
            out.audio = media.media_key(audio.url) if audio else None

    def _write_log(self, out: _Outcome, outcome: str, started: float) -> None:
        path = self.options.log_file
        if not path:
            return
        if path != self._log_path:
            if self._log_file is not None:
                self._log_file.close()
            self._log_file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open on purpose
            self._log_path = path
        assert self._log_file is not None
        self._log_file.write(
            json.dumps(
                {
                    "ts": time.time(),
                    "status": out.status,
                    "outcome": outcome,
                    "video": out.video,
                    "audio": out.audio,
                    "prompt_tokens": out.prompt_tokens,
                    "completion_tokens": out.completion_tokens,
                    "finish_reason": out.finish_reason,
                    "latency": round(time.perf_counter() - started, 6),
                }
            )
            + "\n"
        )
        self._log_file.flush()


@dataclass(slots=True)
class _Prepared:
    video_key: str | None
    audio_key: str | None
    video: media.Video | None
    audio: media.Audio | None
    picture: media.Picture | None
    media_tokens: list[int]


def _prepare(req: chat.ChatRequest, src: media.Source, max_pixels: int, drop_audio: bool) -> _Prepared:
    """Load every media item and count its tokens (blocking: a pool thread when decoding)."""
    first: dict[str, Any] = {}
    keys: dict[str, str] = {}
    counts: list[int] = []
    for ref in req.media:
        try:
            if ref.kind == "video":
                item: Any = media.load_video(ref.url, src, req.num_frames, req.fps)
                counts.append(tokens.video_tokens(item.n_frames, item.height, item.width, max_pixels))
            elif ref.kind == "audio":
                item = media.load_audio(ref.url, src)
                if not drop_audio:
                    counts.append(tokens.audio_tokens(item.duration_s))
            else:
                item = media.load_image(ref.url, src)
                counts.append(tokens.image_tokens(item.height, item.width))
        except (media.MediaError, ValueError) as exc:
            raise chat.bad(str(exc)) from exc
        first.setdefault(ref.kind, item)
        keys.setdefault(ref.kind, media.media_key(ref.url))
    audio = None if drop_audio else first.get("audio")
    return _Prepared(
        keys.get("video"), keys.get("audio"), first.get("video"), audio, first.get("image"), counts
    )


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def configure_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="standin: %(message)s")
