"""The HTTP/1.1 the stand-in speaks: just enough of RFC 9112 for API clients, kept cheap per request.

Request heads are parsed from one ``readuntil``; bodies come by Content-Length or chunked coding;
connections stay open unless the client says ``Connection: close`` (or speaks HTTP/1.0 without
keep-alive). Anything malformed is an ``HTTPError`` after which the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 512 * 1024 * 1024


class HTTPError(Exception):
    """A request the server cannot parse; answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Request:
    method: str
    path: str
    version: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request | None:
    """Read one request; None when the peer closed cleanly between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise HTTPError(400, "connection closed in the middle of a request head") from exc
        return None
    except asyncio.LimitOverrunError as exc:
        raise HTTPError(431, "request head too large") from exc
    lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha():
        raise HTTPError(400, f"malformed request line {lines[0][:100]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HTTPError(505, f"unsupported HTTP version {version[:20]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HTTPError(400, f"malformed header line {line[:100]!r}")
        name = name.lower()
        value = value.strip()
        if name in headers:
            if name == "content-length":
                if headers[name] != value:
                    raise HTTPError(400, "conflicting Content-Length headers")
            else:
                value = f"{headers[name]}, {value}"
        headers[name] = value

    if target.startswith(("http://", "https://")):
        path = urlsplit(target).path or "/"
    else:
        path = target.partition("?")[0]

    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens

    body = await _read_body(reader, writer, headers)
    return Request(method.upper(), path, version, headers, body, keep_alive)


async def _read_body(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]
) -> bytes:
    coding = headers.get("transfer-encoding")
    length_text = headers.get("content-length")
    if coding is not None:
        if length_text is not None:
            raise HTTPError(400, "both Transfer-Encoding and Content-Length")
        if coding.lower().rsplit(",", 1)[-1].strip() != "chunked":
            raise HTTPError(411, f"unsupported Transfer-Encoding {coding!r}; send Content-Length")
        await _continue(writer, headers)
        return await _read_chunked(reader)
    if length_text is None:
        return b""
    if not length_text.isdigit():
        raise HTTPError(400, f"bad Content-Length {length_text[:40]!r}")
    length = int(length_text)
    if length > MAX_BODY_BYTES:
        raise HTTPError(413, f"body of {length} bytes is over the stand-in's limit of {MAX_BODY_BYTES}")
    if length == 0:
        return b""
    await _continue(writer, headers)
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise HTTPError(400, "connection closed in the middle of a request body") from exc


async def _continue(writer: asyncio.StreamWriter, headers: dict[str, str]) -> None:
    # curl waits up to a second for this before sending a large body.
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise HTTPError(400, "malformed chunk size") from exc
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers are not needed
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise HTTPError(413, f"body is over the stand-in's limit of {MAX_BODY_BYTES} bytes")
            chunks.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                raise HTTPError(400, "chunk not followed by CRLF")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise HTTPError(400, "broken chunked body") from exc


_REASONS = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES: dict[int, bytes] = {}


def render(
    status: int,
    body: bytes,
    *,
    keep_alive: bool,
    http10: bool = False,
    content_type: str = "application/json",
) -> bytes:
    """One complete response as bytes, ready for a single write."""
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n".encode()
    if not keep_alive:
        conn = b"connection: close\r\n"
    elif http10:
        conn = b"connection: keep-alive\r\n"
    else:
        conn = b""
    ctype = b"content-type: " + content_type.encode() + b"\r\n" if body else b""
    return b"".join(
        (
            line,
            ctype,
            b"content-length: ",
            str(len(body)).encode(),
            b"\r\n",
            conn,
            b"server: vidcap-standin\r\n\r\n",
            body,
        )
    )


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def error_type(status: int) -> str:
    """vLLM's ``type`` field: the status phrase in CamelCase ending in ``Error``."""
    if status == 400:
        return "BadRequestError"
    name = "".join(word.capitalize() for word in _REASONS.get(status, "Unknown").replace("-", " ").split())
    return name if name.endswith("Error") else name + "Error"


def error_body(status: int, message: str) -> bytes:
    """vLLM's error JSON: ``{"object": "error", "message", "type", "param", "code"}``."""
    return dumps(
        {"object": "error", "message": message, "type": error_type(status), "param": None, "code": status}
    )
