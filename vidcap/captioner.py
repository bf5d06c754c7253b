"""The captioning pipeline: stream the videos, skip what is done, probe, plan, send, write atomically.

Shape: one thread walks the source and checks resume (blocking file I/O), feeding a bounded queue;
``concurrency + prefetch`` workers take videos from it; decoding runs in worker processes; at most
``concurrency`` chat requests are in flight. Memory is bounded by the queue and the workers, never by
the number of videos. Progress leaves as ``Event`` values for the caller (the CLI) to render.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from vidcap import __version__, chat, media, windows
from vidcap.client import Endpoint, Gate, Reply, Requester, RequestFailed, server_info
from vidcap.config import SamplingConfig, config_hash
from vidcap.discovery import Entry, Problem, shard_of, walk
from vidcap.errors import MediaError, ServerError, ServerUnreachableError, UsageError
from vidcap.records import (
    CaptionRecord,
    Counts,
    Failure,
    Params,
    PromptInfo,
    RunSummary,
    Segment,
    ServerInfo,
    Timing,
    Usage,
    VideoInfo,
)
from vidcap.store import OutputDir

FORMAT_VERSION = 1  # bump when a change to requests or merging changes what a caption means


@dataclass(frozen=True)
class CaptionJob:
    source: Path
    out: Path
    prompt: str
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    model: str | None = None  # served model name; None = the server's first model
    fps: float = 2.0
    max_pixels: int = 640 * 360
    window: float | None = None
    overlap: float = 2.0
    media: Literal["file", "http", "inline"] = "file"
    audio: Literal["auto", "on", "off"] = "auto"
    concurrency: int = 64
    force: bool = False
    shard: tuple[int, int] | None = None
    limit: int | None = None
    extensions: tuple[str, ...] = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts")
    max_model_len: int = 32768
    request_timeout: float = 600.0
    max_attempts: int = 6
    retry_max_seconds: float = 900.0
    retry_wait_max: float = 20.0
    server_wait: float = 900.0
    job_id: str | None = None
    decode_workers: int | None = None


@dataclass(frozen=True)
class Event:
    kind: Literal["start", "discovered", "done", "skipped", "failed", "warning", "total"]
    rel: str = ""
    message: str = ""
    value: float = 0.0


EventSink = Callable[[Event], None]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def hash_payload(job: CaptionJob, model: str, max_model_len: int) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "model": model,
        "prompt": hashlib.sha256(job.prompt.encode()).hexdigest(),
        "sampling": chat.sampling_params(job.sampling),
        "fps": job.fps,
        "max_pixels": job.max_pixels,
        "audio": job.audio,
        "window": job.window,
        "overlap": job.overlap,
        "max_model_len": max_model_len,
    }


def _candidates(job: CaptionJob, store: OutputDir, chash: str) -> Iterator[tuple[Entry | Problem, bool]]:
    """(entry, done) in walk order, shard-filtered; blocking (stat + record reads), run in a thread."""
    for item in walk(job.source, job.extensions):
        if job.shard and shard_of(item.rel, job.shard[1]) != job.shard[0]:
            continue
        if isinstance(item, Problem):
            yield item, False
        else:
            yield item, (not job.force and store.is_done(item.rel, item.size, item.mtime, chash))


class _Run:
    def __init__(self, job: CaptionJob, endpoint: Endpoint, store: OutputDir, sink: EventSink) -> None:
        self.job, self.endpoint, self.store, self.sink = job, endpoint, store, sink
        self.counts = Counts()
        self.usage = Usage()
        self.run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        self.audio_verified: bool | None = None
        self._audio_check: asyncio.Future[bool | None] | None = None
        self.model = ""
        self.limit_tokens = 0
        self.chash = ""
        self.server = ServerInfo(url=endpoint.base_url, job_id=job.job_id)

    # -- per video ----------------------------------------------------------------------------------

    async def caption(
        self, entry: Entry, pool: media.MediaPool, requester: Requester, slots: asyncio.Semaphore
    ) -> None:
        job = self.job
        started, t0 = _now(), time.monotonic()
        attempts = 0
        try:
            probe = await pool.run(_probe, entry.path, job.audio != "off")
            send_audio = bool(probe.has_audio) and job.audio != "off"
            if job.audio == "on" and not probe.has_audio:
                self.sink(Event("warning", entry.rel, "--audio on, but the video has no audio track"))
            plan = windows.plan_video(
                probe,
                limit=self.limit_tokens,
                fps=job.fps,
                max_pixels=job.max_pixels,
                audio=send_audio,
                window=job.window,
                overlap=job.overlap,
            )
            replies = await asyncio.gather(
                *(self._window(entry, probe, plan, w, pool, requester, slots) for w in plan.windows)
            )
            attempts = sum(r.attempts for r in replies)
            segments = None
            if plan.windowed:
                segments = [
                    Segment(
                        start_s=w.start_s,
                        end_s=w.end_s,
                        caption=r.text,
                        finish_reason=r.finish_reason,
                        usage=r.usage,
                    )
                    for w, r in zip(plan.windows, replies, strict=False)
                ]
                final = await self._merge(segments, requester, slots)
                attempts += final.attempts
                usage = sum((r.usage for r in replies), final.usage)
            else:
                final, usage = replies[0], replies[0].usage
            if final.finish_reason == "length":
                raise RequestFailed(
                    "truncated", "caption cut at max_tokens (finish_reason=length)", attempts, False
                )
            if send_audio and self._audio_check is not None:
                self.audio_verified = await self._audio_check
            record = CaptionRecord(
                config_hash=self.chash,
                video=VideoInfo(
                    path=entry.rel,
                    size=entry.size,
                    mtime=entry.mtime,
                    duration_s=probe.duration_s,
                    fps=probe.fps,
                    width=probe.width,
                    height=probe.height,
                    has_audio=probe.has_audio,
                    vfr=probe.vfr,
                ),
                model=self.model,
                server=self.server,
                prompt=PromptInfo(text=job.prompt, sha256=hashlib.sha256(job.prompt.encode()).hexdigest()),
                params=Params(
                    sampling=chat.sampling_params(job.sampling),
                    fps=plan.fps,
                    max_pixels=plan.max_pixels,
                    audio=send_audio,
                    audio_verified=self.audio_verified if send_audio else None,
                    window=plan.window_s,
                    overlap=plan.overlap_s,
                    media="inline" if (plan.windowed or job.media == "inline") else job.media,
                ),
                caption=final.text.strip(),
                segments=segments,
                usage=usage,
                finish_reason=final.finish_reason,
                timing=Timing(
                    started=started,
                    finished=_now(),
                    latency_s=round(time.monotonic() - t0, 3),
                    attempts=attempts,
                ),
                vidcap_version=__version__,
            )
            await asyncio.to_thread(self.store.write_record, entry.rel, record)
        except MediaError as exc:
            await self._fail(entry.rel, exc.kind, str(exc), attempts or 0, False)
        except RequestFailed as exc:
            await self._fail(entry.rel, exc.kind, str(exc), exc.attempts, exc.retryable)
        except (ServerUnreachableError, asyncio.CancelledError):
            raise
        except OSError as exc:
            await self._fail(
                entry.rel, "io_error", f"{exc.strerror or exc}: {exc.filename or ''}", attempts, True
            )
        except Exception as exc:
            # Last resort, so that one video can never stop the run; the class name says where to look.
            await self._fail(entry.rel, "internal_error", f"{type(exc).__name__}: {exc}", attempts, True)
        else:
            self.counts.done += 1
            self.usage = self.usage + usage
            self.sink(Event("done", entry.rel, value=time.monotonic() - t0))

    async def _window(
        self,
        entry: Entry,
        probe: media.Probe,
        plan: windows.Plan,
        win: windows.Window,
        pool: media.MediaPool,
        requester: Requester,
        slots: asyncio.Semaphore,
    ) -> Reply:
        job = self.job
        if job.media == "file" and not plan.windowed:
            video_url, num_frames = media.file_url(entry.path), win.num_frames
            audio_url = None
            if plan.audio:
                audio_url, _ = await pool.run(media.encode_audio, entry.path, win.start_s, win.end_s)
        else:
            inline = await pool.run(
                media.encode_inline,
                entry.path,
                probe,
                win.start_s,
                win.end_s,
                plan.fps,
                plan.max_pixels,
                plan.audio,
            )
            video_url, num_frames, audio_url = inline.video_url, inline.num_frames, inline.audio_url
        body = chat.video_request(
            model=self.model,
            prompt=job.prompt,
            video_url=video_url,
            audio_url=audio_url,
            fps=plan.fps,
            num_frames=num_frames,
            sampling=job.sampling,
        )
        async with slots:
            reply = await requester.complete(body)
        if audio_url is not None and self._audio_check is None:
            self._audio_check = asyncio.ensure_future(self._verify_audio(body, reply, requester, slots))
        if reply.finish_reason == "length":
            where = f" in window {win.start_s:.1f}-{win.end_s:.1f} s" if plan.windowed else ""
            raise RequestFailed(
                "truncated", f"caption cut at max_tokens{where} (finish_reason=length)", reply.attempts, False
            )
        return reply

    async def _verify_audio(
        self, body: dict[str, Any], with_audio: Reply, requester: Requester, slots: asyncio.Semaphore
    ) -> bool | None:
        """Same request without the audio item: if the prompt does not shrink, the server drops audio."""
        content = [p for p in body["messages"][0]["content"] if p["type"] != "audio_url"]
        probe_body = {**body, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
        try:
            async with slots:
                without = await requester.complete(probe_body)
        except RequestFailed as exc:
            self.sink(Event("warning", message=f"could not check that audio reaches the model: {exc}"))
            return None
        verified = with_audio.usage.prompt_tokens > without.usage.prompt_tokens
        if not verified:
            self.sink(
                Event(
                    "warning",
                    message=(
                        "THE SERVER DROPS AUDIO: a request with audio counts as many prompt tokens "
                        f"as one without ({with_audio.usage.prompt_tokens}); captions will not reflect "
                        "sound (audio_verified=false)"
                    ),
                )
            )
        return verified

    async def _merge(self, segments: list[Segment], requester: Requester, slots: asyncio.Semaphore) -> Reply:
        job = self.job
        parts = [(s.start_s, s.end_s, s.caption) for s in segments]
        attempts, usage = 0, Usage()
        room = self.limit_tokens  # text budget of a merge request: what media would have had
        while True:
            groups = windows.merge_groups([p[2] for p in parts], room)
            merged = []
            for group in groups:
                chunk = [parts[i] for i in group]
                body = chat.merge_request(
                    model=self.model, prompt=chat.merge_prompt(job.prompt, chunk), sampling=job.sampling
                )
                async with slots:
                    reply = await requester.complete(body)
                attempts += reply.attempts
                usage = usage + reply.usage
                if reply.finish_reason == "length":
                    raise RequestFailed(
                        "truncated",
                        "merged caption cut at max_tokens (finish_reason=length)",
                        attempts,
                        False,
                    )
                merged.append((chunk[0][0], chunk[-1][1], reply.text))
            if len(merged) == 1:
                return Reply(merged[0][2], reply.finish_reason, usage, attempts)
            parts = merged

    async def _fail(self, rel: str, kind: str, message: str, attempts: int, retryable: bool) -> None:
        self.counts.failed += 1
        failure = Failure(
            ts=_now(),
            run_id=self.run_id,
            path=rel,
            error=kind,
            message=message,
            attempts=attempts,
            retryable=retryable,
        )
        await asyncio.to_thread(self.store.append_failure, failure)
        self.sink(Event("failed", rel, f"{kind}: {message}"))

    # -- the run --------------------------------------------------------------------------------------

    async def feed(self, queue: asyncio.Queue[Entry | None], workers: int) -> None:
        it = _candidates(self.job, self.store, self.chash)
        remaining = self.job.limit
        while remaining is None or remaining > 0:
            batch = await asyncio.to_thread(lambda: list(itertools.islice(it, 256)))
            if not batch:
                break
            for item, done in batch:
                if isinstance(item, Problem):
                    if item.video:
                        self.counts.seen += 1
                        await self._fail(item.rel, item.kind, item.message, 0, False)
                    else:
                        self.sink(Event("warning", item.rel, item.message))
                    continue
                self.counts.seen += 1
                self.sink(Event("discovered", item.rel))
                if done:
                    self.counts.skipped += 1
                    self.sink(Event("skipped", item.rel))
                    continue
                await queue.put(item)
                if remaining is not None:
                    remaining -= 1
                    if remaining == 0:
                        break
        self.sink(Event("total", value=self.counts.seen))
        # Sentinels only on a normal end (not in a finally): after a cancel no worker reads the queue.
        for _ in range(workers):
            await queue.put(None)

    async def count(self, stop: list[bool]) -> None:
        """Count the videos ahead of the feeder (stat only), so progress has a total and an ETA early."""

        def walk_count() -> int | None:
            n = 0
            for item in walk(self.job.source, self.job.extensions):
                if stop:
                    return None
                if self.job.shard and shard_of(item.rel, self.job.shard[1]) != self.job.shard[0]:
                    continue
                n += isinstance(item, Entry) or (isinstance(item, Problem) and item.video)
            return n

        if self.job.limit is None and (n := await asyncio.to_thread(walk_count)) is not None:
            self.sink(Event("total", value=n))

    async def work(
        self,
        queue: asyncio.Queue[Entry | None],
        pool: media.MediaPool,
        requester: Requester,
        slots: asyncio.Semaphore,
    ) -> None:
        while (entry := await queue.get()) is not None:
            await self.caption(entry, pool, requester, slots)


def _probe(path: str, audio: bool) -> media.Probe:
    return media.probe(path, audio=audio)


async def run(
    job: CaptionJob,
    endpoint: Endpoint,
    sink: EventSink = lambda e: None,
    pool: media.MediaPool | None = None,
) -> RunSummary:
    """Caption what is missing under ``job.source`` into ``job.out``; returns the run summary (also written
    to OUT/_vidcap/runs/). Raises ServerUnreachableError/ServerError before anything is written when the
    server cannot be used, OutputLockedError when another run holds the output dir."""
    if job.media == "http":
        raise UsageError("--media http needs the file server of a cluster job (vidcap caption PROFILE:PATH)")
    if not job.source.is_dir():
        raise UsageError(f"source {job.source} is not a directory")
    store = OutputDir(job.out)
    info = await server_info(endpoint)
    model = job.model or (info.models[0] if info.models else None)
    if not model:
        raise ServerError(f"{endpoint.base_url} serves no model")
    if job.model and job.model not in info.models:
        raise ServerError(
            f"{endpoint.base_url} does not serve {job.model!r} (it serves {', '.join(info.models)})"
        )
    max_len = info.max_model_len or job.max_model_len
    state = _Run(job, endpoint, store, sink)
    state.model = model
    state.server = ServerInfo(url=endpoint.base_url, vllm_version=info.version, job_id=job.job_id)
    state.limit_tokens = windows.budget(max_len, job.prompt, job.sampling.max_tokens)
    if state.limit_tokens <= 0:
        raise UsageError(
            f"max_tokens {job.sampling.max_tokens} leaves no room in the server's context ({max_len})"
        )
    state.chash = config_hash(hash_payload(job, model, max_len))
    summary = RunSummary(
        run_id=state.run_id,
        source=str(job.source),
        out=str(job.out),
        model=model,
        server=state.server,
        config_hash=state.chash,
        shard=f"{job.shard[0]}/{job.shard[1]}" if job.shard else None,
        limit=job.limit,
        started=_now(),
        vidcap_version=__version__,
    )
    with store.locked():
        sink(Event("start", message=f"{model} at {endpoint.base_url}, context {max_len}"))
        t0 = time.monotonic()
        own_pool = pool is None
        pool = pool or media.MediaPool(job.decode_workers)
        requester = Requester(
            endpoint,
            Gate(endpoint, job.server_wait),
            timeout=job.request_timeout,
            max_attempts=job.max_attempts,
            max_seconds=job.retry_max_seconds,
            wait_max=job.retry_wait_max,
        )
        slots = asyncio.Semaphore(job.concurrency)
        nworkers = job.concurrency + 2 * (os.cpu_count() or 2)
        queue: asyncio.Queue[Entry | None] = asyncio.Queue(maxsize=nworkers)
        tasks: list[asyncio.Future[None]] = []
        stopped: list[BaseException | int] = []

        def stop_all(reason: BaseException | int) -> None:
            stopped.append(reason)
            for t in tasks:
                t.cancel()

        async def guarded(coro: Any) -> None:
            # One task failing (the server gone for good, or a bug) stops the run instead of leaving
            # the feeder blocked on a queue nobody reads.
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                stop_all(exc)

        counting_stop: list[bool] = []
        tasks.append(asyncio.ensure_future(guarded(state.feed(queue, nworkers))))
        tasks.append(asyncio.ensure_future(guarded(state.count(counting_stop))))
        tasks += [
            asyncio.ensure_future(guarded(state.work(queue, pool, requester, slots))) for _ in range(nworkers)
        ]
        loop = asyncio.get_running_loop()
        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, stop_all, int(signum))
                installed.append(signum)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            counting_stop.append(True)
            for signum in installed:
                loop.remove_signal_handler(signum)
            await requester.close()
            if own_pool:
                pool.shutdown()
            reason = stopped[0] if stopped else None
            summary.interrupted = isinstance(reason, int)
            if isinstance(reason, BaseException):
                summary.aborted = f"{type(reason).__name__}: {reason}"
            summary.counts = state.counts
            summary.counts.requests = requester.requests
            summary.counts.retried_requests = requester.retried
            summary.usage = state.usage
            summary.audio_verified = state.audio_verified
            summary.finished = _now()
            summary.wall_s = round(time.monotonic() - t0, 3)
            summary.exit_code = exit_code(summary)
            store.write_summary(summary)
        if isinstance(reason, BaseException) and not isinstance(reason, ServerUnreachableError):
            raise reason  # a bug: the summary is written, the traceback must not be lost
        return summary


async def dry_run(job: CaptionJob, pool: media.MediaPool | None = None) -> list[dict[str, Any]]:
    """The plan of every video that a run would caption (probe + windows), sending nothing.

    Uses the configured context length, since the server is not asked. Holds one row per video: meant
    for a look before a run, not for a million-video tree (use --limit).
    """
    if not job.source.is_dir():
        raise UsageError(f"source {job.source} is not a directory")
    store = OutputDir(job.out)
    limit = windows.budget(job.max_model_len, job.prompt, job.sampling.max_tokens)
    chash = config_hash(hash_payload(job, job.model or "", job.max_model_len))
    own_pool = pool is None
    pool = pool or media.MediaPool(job.decode_workers)
    rows: list[dict[str, Any]] = []
    try:
        pending = []
        for item, done in await asyncio.to_thread(
            lambda: list(itertools.islice(_candidates(job, store, chash), job.limit or None))
        ):
            if isinstance(item, Problem):
                rows.append({"path": item.rel, "note": f"{item.kind}: {item.message}"})
            elif done:
                rows.append({"path": item.rel, "note": "done (record up to date)"})
            else:
                pending.append((item, asyncio.ensure_future(pool.run(_probe, item.path, job.audio != "off"))))
        for item, fut in pending:
            try:
                probe = await fut
                audio = bool(probe.has_audio) and job.audio != "off"
                plan = windows.plan_video(
                    probe,
                    limit=limit,
                    fps=job.fps,
                    max_pixels=job.max_pixels,
                    audio=audio,
                    window=job.window,
                    overlap=job.overlap,
                )
            except MediaError as exc:
                rows.append({"path": item.rel, "note": f"{exc.kind}: {exc}"})
                continue
            rows.append(
                {
                    "path": item.rel,
                    "duration_s": probe.duration_s,
                    "audio": audio,
                    "requests": len(plan.windows) + (1 if plan.windowed else 0),
                    "window_s": plan.window_s,
                    "fps": plan.fps,
                    "frame": f"{plan.width}x{plan.height}",
                    "est_tokens": plan.est_tokens,
                    "windows": [[w.start_s, w.end_s, w.est_tokens] for w in plan.windows],
                    "note": "",
                }
            )
    finally:
        if own_pool:
            pool.shutdown()
    return rows


def exit_code(summary: RunSummary) -> int:
    if summary.interrupted:
        return 130
    if summary.aborted:
        return 3
    return 1 if summary.counts.failed else 0
