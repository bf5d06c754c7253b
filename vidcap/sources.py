"""Where videos come from and how their media reach vLLM: a local directory, or a cluster directory
served by the file server next to vLLM. The pipeline (captioner.py) is the same for both.
"""

from __future__ import annotations

import asyncio
import itertools
import posixpath
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import quote

from vidcap import media
from vidcap.discovery import Entry, Problem, shard_of, walk
from vidcap.errors import ServerError, ServerUnreachableError
from vidcap.windows import Plan, Window

BATCH = 256
T = TypeVar("T")
Item = Entry | Problem


@dataclass(frozen=True)
class MediaParts:
    video_url: str
    num_frames: int
    audio_url: str | None
    kind: Literal["file", "http", "inline"]


class Source(Protocol):
    """What the pipeline needs from a place that holds videos."""

    label: str

    def batches(self, shard: tuple[int, int] | None) -> AsyncIterator[list[Item]]: ...

    async def count(self, shard: tuple[int, int] | None) -> int | None: ...

    async def probe(self, entry: Entry, audio: bool) -> media.Probe: ...

    async def media(self, entry: Entry, probe: media.Probe, plan: Plan, win: Window) -> MediaParts: ...

    async def watch(self) -> None:
        """Runs beside the pipeline; raising stops the run (the job behind the source has ended)."""
        ...

    async def close(self) -> None: ...


def in_shard(item: Item, shard: tuple[int, int] | None) -> bool:
    return shard is None or shard_of(item.rel, shard[1]) == shard[0]


class LocalSource:
    """A directory on this machine: walked here, decoded here in worker processes."""

    def __init__(
        self,
        root: Path,
        extensions: tuple[str, ...],
        mode: Literal["file", "http", "inline"] = "file",
        workers: int | None = None,
    ) -> None:
        self.root, self.extensions, self.mode = root, extensions, mode
        self.label = str(root)
        self._workers = workers
        self._pool: media.MediaPool | None = None

    @property
    def pool(self) -> media.MediaPool:
        # Started on first use: a dry run of an empty tree, or a run with nothing to do, starts no process.
        if self._pool is None:
            self._pool = media.MediaPool(self._workers)
        return self._pool

    async def batches(self, shard: tuple[int, int] | None) -> AsyncIterator[list[Item]]:
        it = (item for item in walk(self.root, self.extensions) if in_shard(item, shard))
        while batch := await asyncio.to_thread(lambda: list(itertools.islice(it, BATCH))):
            yield batch

    async def count(self, shard: tuple[int, int] | None) -> int | None:
        def walk_count() -> int:
            return sum(
                1
                for item in walk(self.root, self.extensions)
                if in_shard(item, shard) and (isinstance(item, Entry) or item.video)
            )

        return await asyncio.to_thread(walk_count)

    async def probe(self, entry: Entry, audio: bool) -> media.Probe:
        return await self.pool.run(_probe, entry.path, audio)

    async def media(self, entry: Entry, probe: media.Probe, plan: Plan, win: Window) -> MediaParts:
        if self.mode == "file" and not plan.windowed:
            audio_url = None
            if plan.audio:
                audio_url, _ = await self.pool.run(media.encode_audio, entry.path, win.start_s, win.end_s)
            return MediaParts(media.file_url(entry.path), win.num_frames, audio_url, "file")
        # A file URL cannot name a time span, so windows always go inline.
        inline = await self.pool.run(
            media.encode_inline,
            entry.path,
            probe,
            win.start_s,
            win.end_s,
            plan.fps,
            plan.max_pixels,
            plan.audio,
        )
        return MediaParts(inline.video_url, inline.num_frames, inline.audio_url, "inline")

    async def watch(self) -> None:
        return None  # a local directory has no job behind it

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _probe(path: str, audio: bool) -> media.Probe:
    return media.probe(path, audio=audio)


class RemoteSource:
    """A directory on the cluster, listed and probed by the file server on the GPU node.

    Media the server can read on its own node stay there: ``file`` sends the cluster path (vLLM reads it
    under --allowed-local-media-path), ``http`` the file server's URL on that node; only the frames of
    windows (and everything with ``inline``) cross the link, as JPEG.
    """

    def __init__(
        self,
        client: Any,
        *,
        label: str,
        root: str,
        subdir: str,
        node_files_port: int,
        token: str,
        extensions: tuple[str, ...],
        mode: Literal["file", "http", "inline"] = "file",
        wait: float = 900.0,
        watcher: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.client, self.label, self.root, self.subdir = client, label, root, subdir.strip("/")
        self.node_files_port, self.extensions, self.mode = node_files_port, extensions, mode
        self.wait = wait
        self._watcher = watcher
        self._token = token

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """A file-server call that waits out a tunnel reconnecting, like the vLLM gate does."""
        deadline, delay = time.monotonic() + self.wait, 0.5
        while True:
            try:
                return await fn(*args)
            except ServerUnreachableError:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _path(self, rel: str) -> str:
        return f"{self.subdir}/{rel}" if self.subdir else rel

    def _node(self, route: str, rel: str, **query: float) -> str:
        from vidcap.filesclient import node_url

        return node_url(self.node_files_port, self._token, route, self._path(rel), **query)

    async def _listing(self) -> AsyncIterator[Item]:
        """The listing, resumed after the last item delivered when the link drops in the middle
        (the server lists in a stable sorted order)."""
        last: str | None = None
        deadline, delay = time.monotonic() + self.wait, 0.5
        while True:
            skipping = last is not None
            try:
                async for item in self.client.list(self.subdir, self.extensions):
                    if skipping:
                        skipping = item.rel != last
                        continue
                    last = item.rel
                    yield item
                return
            except (ServerUnreachableError, ServerError):
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def batches(self, shard: tuple[int, int] | None) -> AsyncIterator[list[Item]]:
        batch: list[Item] = []
        async for item in self._listing():
            if in_shard(item, shard):
                batch.append(item)
            if len(batch) >= BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    async def count(self, shard: tuple[int, int] | None) -> int | None:
        """Counted by the file server next to the files (one number over the link): a total for the
        progress bar early on. None when it cannot say; the run does not depend on it."""
        try:
            return await self.client.count(self.subdir, self.extensions, shard)
        except (ServerUnreachableError, ServerError):
            return None

    async def probe(self, entry: Entry, audio: bool) -> media.Probe:
        return await self._call(self.client.probe, self._path(entry.rel), audio)

    async def media(self, entry: Entry, probe: media.Probe, plan: Plan, win: Window) -> MediaParts:
        rel = self._path(entry.rel)
        span = {"start": win.start_s, "end": win.end_s}
        if self.mode == "inline":
            inline = await self._call(
                self.client.frames, rel, win.start_s, win.end_s, plan.fps, plan.max_pixels
            )
            audio = None
            if plan.audio:
                audio = await self._call(self.client.audio_data_url, rel, win.start_s, win.end_s)
            return MediaParts(inline.video_url, inline.num_frames, audio, "inline")
        audio_url = self._node("audio", entry.rel, **span) if plan.audio else None
        if plan.windowed:
            inline = await self._call(
                self.client.frames, rel, win.start_s, win.end_s, plan.fps, plan.max_pixels
            )
            return MediaParts(inline.video_url, inline.num_frames, audio_url, "inline")
        if self.mode == "file":
            # a cluster path: quoted as POSIX, never passed through this machine's path functions
            url = "file://" + quote(posixpath.join(self.root, rel), safe="/")
            return MediaParts(url, win.num_frames, audio_url, "file")
        return MediaParts(self._node("f", entry.rel), win.num_frames, audio_url, "http")

    async def watch(self) -> None:
        if self._watcher is not None:
            await self._watcher()

    async def close(self) -> None:
        await self.client.close()
