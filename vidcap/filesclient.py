"""The laptop's side of the file server (fileserver.py), reached through the tunnel; and the URLs vLLM
uses to fetch media from the file server on its own node.

Errors are translated here: cannot connect -> ServerUnreachableError; the server answered but not as a
vidcap file server should -> ServerError; one video cannot be used -> MediaError. No message or repr
carries the token.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import quote, urlencode

import httpx

from vidcap import media
from vidcap.discovery import Entry, Problem
from vidcap.errors import MediaError, ServerError, ServerUnreachableError

_PROBE_FIELDS = tuple(f.name for f in dataclasses.fields(media.Probe))


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _build(base: str, token: str, route: str, rel: str, query: dict[str, Any]) -> str:
    # One quoting of the whole relative path: "/" stays a separator, everything else (%, #, ?, spaces,
    # newlines, unicode) is escaped, and the server unquotes exactly once.
    url = f"{base}/t/{token}/{route}/{quote(rel, safe='/')}"
    if query:
        url += "?" + urlencode({k: _query_value(v) for k, v in query.items()})
    return url


def node_url(files_port: int, token: str, route: str, rel: str, **query: float) -> str:
    """The URL of a file-server resource as seen from the GPU node (vLLM fetches it there)."""
    return _build(f"http://127.0.0.1:{files_port}", token, route, rel, query)


class FilesClient:
    """Async client of one file server. ``base_url`` is the laptop end of the tunnel, e.g.
    http://127.0.0.1:8080."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._root: str | None = None
        # A listing may pause for minutes in one huge directory on a network disk before its next line.
        self._list_timeout = httpx.Timeout(timeout, read=max(timeout, 600.0))
        # trust_env=False: an http_proxy in the environment must not swallow requests to the tunnel.
        self._http = httpx.AsyncClient(timeout=timeout, trust_env=False)

    def __repr__(self) -> str:
        return f"FilesClient({self.base_url!r})"

    async def __aenter__(self) -> FilesClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def url(self, route: str, rel: str, **query: Any) -> str:
        return _build(self.base_url, self._token, route, rel, query)

    def _safe(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def _unreachable(self, route: str, exc: Exception) -> ServerUnreachableError:
        what = "did not answer in time" if isinstance(exc, httpx.TimeoutException) else "cannot be reached"
        detail = self._safe(str(exc) or type(exc).__name__)
        return ServerUnreachableError(
            f"the vidcap file server at {self.base_url} {what} ({route}: {detail}); "
            "is the tunnel up? ('vidcap tunnel status')"
        )

    async def _get(self, route: str, rel: str = "", **query: Any) -> httpx.Response:
        try:
            return await self._http.get(self.url(route, rel, **query))
        except httpx.TransportError as exc:
            raise self._unreachable(route, exc) from exc

    def _fail(self, resp: httpx.Response, route: str, rel: str) -> Exception:
        """The error for a non-2xx answer about one file: MediaError when only that file is at fault."""
        body = _json_or_none(resp)
        if resp.status_code == 422 and body:
            return MediaError(str(body.get("error", "media")), str(body.get("message", "")))
        if resp.status_code == 404:
            return MediaError("not_found", f"{rel}: no such file under the file server's root")
        message = self._safe(str(body.get("message", "")) if body else resp.text[:200])
        return ServerError(
            f"the file server at {self.base_url} answered {resp.status_code} to {route} {rel!r}: {message}"
        )

    async def health(self) -> dict[str, Any]:
        resp = await self._get("health")
        if resp.status_code == 404:
            raise ServerError(
                f"{self.base_url} answered 404 to the health check: wrong token, or not a vidcap file server"
            )
        body = _json_or_none(resp)
        if resp.status_code != 200 or not body or body.get("ok") is not True:
            raise ServerError(
                f"{self.base_url} is not a vidcap file server (health: HTTP {resp.status_code})"
            )
        self._root = str(body["root"])
        return body

    async def count(self, subdir: str, exts: Iterable[str], shard: tuple[int, int] | None) -> int | None:
        """How many videos a listing of ``subdir`` would give (in ``shard``); None when the server cannot
        say (an older file server has no count route)."""
        query: dict[str, Any] = {"ext": ",".join(exts)}
        if shard is not None:
            query["shard"] = f"{shard[0]}/{shard[1]}"
        try:
            resp = await self._http.get(
                self.url("count", subdir.strip("/"), **query), timeout=self._list_timeout
            )
        except httpx.TransportError as exc:
            raise self._unreachable("count", exc) from exc
        body = _json_or_none(resp)
        if resp.status_code != 200 or not body or not isinstance(body.get("count"), int):
            return None
        return int(body["count"])

    async def list(self, subdir: str, exts: Iterable[str]) -> AsyncIterator[Entry | Problem]:
        """The videos under ``subdir`` in walk order. Entry.rel is relative to subdir; Entry.path is the
        absolute path on the server's host. ServerError when the listing ends before its end line."""
        if self._root is None:
            await self.health()
        assert self._root is not None
        sub = subdir.strip("/")
        url = self.url("list", sub, ext=",".join(exts))
        try:
            async with self._http.stream("GET", url, timeout=self._list_timeout) as resp:
                if resp.status_code == 404:
                    raise ServerError(
                        f"{sub or '.'}: no such directory under {self._root} on the file server"
                    )
                if resp.status_code != 200:
                    await resp.aread()
                    raise self._fail(resp, "list", sub)
                count = 0
                async for line in _lines(resp):
                    obj = json.loads(line)
                    if obj.get("end") is True:
                        if obj.get("count") != count:
                            raise ServerError(
                                f"listing of {sub or '.'}: {count} lines but the end line says {obj}"
                            )
                        return
                    count += 1
                    if "problem" in obj:
                        yield Problem(obj["path"], obj["problem"], obj["message"], bool(obj["video"]))
                    else:
                        path = posixpath.join(self._root, sub, obj["path"])
                        yield Entry(path, obj["path"], int(obj["size"]), float(obj["mtime"]))
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                raise self._unreachable("list", exc) from exc
            raise ServerError(
                f"the listing of {sub or '.'} was cut off ({self._safe(str(exc))}); run again to resume"
            ) from exc
        except (
            ValueError,
            KeyError,
            TypeError,
        ) as exc:  # a line that is not JSON: a proxy or a different server answered
            raise ServerError(f"the listing of {sub or '.'} is garbled: {exc}") from exc
        raise ServerError(f"the listing of {sub or '.'} was cut off (no end line); run again to resume")

    async def probe(self, rel: str, audio: bool) -> media.Probe:
        resp = await self._get("probe", rel, audio=audio)
        if resp.status_code != 200:
            raise self._fail(resp, "probe", rel)
        body = resp.json()
        return media.Probe(**{name: body[name] for name in _PROBE_FIELDS})

    async def frames(
        self, rel: str, start: float, end: float, fps: float, max_pixels: int
    ) -> media.InlineMedia:
        resp = await self._get("frames", rel, start=start, end=end, fps=fps, max_pixels=max_pixels)
        if resp.status_code != 200:
            raise self._fail(resp, "frames", rel)
        body = resp.json()
        return media.InlineMedia(
            body["video_url"], int(body["num_frames"]), int(body["width"]), int(body["height"]), None, 0.0
        )

    async def audio_data_url(self, rel: str, start: float, end: float) -> str | None:
        resp = await self._get("audio", rel, start=start, end=end)
        if resp.status_code == 404 and (_json_or_none(resp) or {}).get("error") == "no_audio":
            return None
        if resp.status_code != 200:
            raise self._fail(resp, "audio", rel)
        return media.wav_url(resp.content)

    async def close(self) -> None:
        await self._http.aclose()


async def _lines(resp: httpx.Response) -> AsyncIterator[str]:
    # Split on b"\n" only (httpx's line decoder also breaks on \r and unicode separators).
    pending = b""
    async for data in resp.aiter_bytes():
        pending += data
        *done, pending = pending.split(b"\n")
        for line in done:
            if line:
                yield line.decode("utf-8", "surrogateescape")
    # An unterminated last line is a cut one; the caller notices the missing end line.


def _json_or_none(resp: httpx.Response) -> dict[str, Any] | None:
    if not resp.content:
        return None
    try:
        body = resp.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None
