"""The captioning pipeline: stream the videos, skip what is done, probe, plan, send, write atomically.

Shape: the source is listed in batches (resume checks run in a thread: they are file reads) into a
bounded queue; ``concurrency + prefetch`` workers take videos from it; decoding runs wherever the source
decodes (worker processes, or the file server); at most ``concurrency`` chat requests are in flight
per model server replica (several endpoints of one model are one client.Pool). Memory is bounded by the
queue and the workers, never by the number of videos. Progress leaves as ``Event`` values for the caller
(the CLI) to render.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from vidcap import __version__, chat, client, media, windows
from vidcap.client import Endpoint, Pool, Reply, RequestFailed, server_info
from vidcap.config import SamplingConfig, config_hash
from vidcap.discovery import Entry, Problem
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
from vidcap.sources import LocalSource, Source
from vidcap.store import OutputDir

FORMAT_VERSION = 1  # bump when a change to requests or merging changes what a caption means


@dataclass(frozen=True)
class CaptionJob:
    source: Path | str
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
    # Seconds between rewrites of the run summary while the run goes on (0: only at start and end).
    progress_interval: float = 10.0
    lock_wait: float = 0.0  # seconds to wait for the output dir's lock


@dataclass(frozen=True)
class Event:
    kind: Literal["start", "discovered", "done", "skipped", "failed", "warning", "total"]
    rel: str = ""
    message: str = ""
    value: float = 0.0


EventSink = Callable[[Event], None]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def make_run_id(job_id: str | None) -> str:
    """A timestamp, plus the job id when there is one: shards (Slurm array tasks) start on several nodes
    at the same moment, and only the job id keeps their summary files apart for sure."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    if not job_id:
        return stamp
    return f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]', '_', job_id)}"


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


def local_source(job: CaptionJob) -> LocalSource:
    if not Path(job.source).is_dir():
        raise UsageError(f"source {job.source} is not a directory")
    return LocalSource(Path(job.source), job.extensions, job.media, job.decode_workers)


class _Run:
    def __init__(self, job: CaptionJob, source: Source, store: OutputDir, sink: EventSink) -> None:
        self.job, self.source, self.store, self.sink = job, source, store, sink
        self.counts = Counts()
        self.usage = Usage()
        self.run_id = make_run_id(job.job_id)
        self.total: int | None = None
        # Summary writes (start, progress in a thread, final) go one at a time, and none after the final.
        self._summary_lock = threading.Lock()
        self._summary_final = False
        self.audio_verified: bool | None = None
        self._audio_check: asyncio.Future[bool | None] | None = None
        self.model = ""
        self.limit_tokens = 0
        self.chash = ""
        self.servers = [ServerInfo()]  # per replica of the pool; the summary names the first
        self.pool: Pool

    # -- per video ----------------------------------------------------------------------------------

    async def caption(self, entry: Entry) -> None:
        job = self.job
        started, t0 = _now(), time.monotonic()
        attempts = 0
        try:
            probe = await self.source.probe(entry, job.audio != "off")
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
            results = await asyncio.gather(*(self._window(entry, probe, plan, w) for w in plan.windows))
            replies = [r for r, _ in results]
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
                    for w, r in zip(plan.windows, replies, strict=True)
                ]
                final = await self._merge(segments)
                attempts += final.attempts
                usage = sum((r.usage for r in replies), final.usage)
            else:
                final, usage = replies[0], replies[0].usage
            if send_audio and self._audio_check is not None:
                self.audio_verified = await self._audio_check
            record = self._record(entry, probe, plan, results[0][1], final, segments, usage, attempts)
            record.timing = Timing(
                started=started, finished=_now(), latency_s=round(time.monotonic() - t0, 3), attempts=attempts
            )
            await self._write(entry.rel, record, t0)
        except MediaError as exc:
            await self._fail(entry.rel, exc.kind, str(exc), attempts, False)
        except RequestFailed as exc:
            await self._fail(entry.rel, exc.kind, str(exc), exc.attempts, exc.retryable)
        except (ServerUnreachableError, asyncio.CancelledError):
            raise
        except OSError as exc:
            message = f"{exc.strerror or exc}: {exc.filename or ''}"
            await self._fail(entry.rel, "io_error", message, attempts, True)
        except Exception as exc:
            # Last resort, so that one video can never stop the run; the class name says where to look.
            await self._fail(entry.rel, "internal_error", f"{type(exc).__name__}: {exc}", attempts, True)
        else:
            self._done(entry.rel, record, t0)

    def _done(self, rel: str, record: CaptionRecord, t0: float) -> None:
        self.counts.done += 1
        self.usage = self.usage + record.usage
        self.sink(Event("done", rel, value=time.monotonic() - t0))

    async def _write(self, rel: str, record: CaptionRecord, t0: float) -> None:
        """Write one record; a cancel (SIGINT) that arrives meanwhile lets the write land and counts it,
        so the run summary agrees with what is on disk. The write takes milliseconds."""
        write = asyncio.ensure_future(asyncio.to_thread(self.store.write_record, rel, record))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await asyncio.wait([write])
            if not write.cancelled() and write.exception() is None:
                self._done(rel, record, t0)
            raise

    def _record(
        self,
        entry: Entry,
        probe: media.Probe,
        plan: windows.Plan,
        kind: Literal["file", "http", "inline"],
        final: Reply,
        segments: list[Segment] | None,
        usage: Usage,
        attempts: int,
    ) -> CaptionRecord:
        job = self.job
        return CaptionRecord(
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
            server=self.servers[final.replica],
            prompt=PromptInfo(text=job.prompt, sha256=hashlib.sha256(job.prompt.encode()).hexdigest()),
            params=Params(
                sampling=chat.sampling_params(job.sampling),
                fps=plan.fps,
                max_pixels=plan.max_pixels,
                audio=plan.audio,
                audio_verified=self.audio_verified if plan.audio else None,
                window=plan.window_s,
                overlap=plan.overlap_s,
                media=kind,
            ),
            caption=final.text.strip(),
            segments=segments,
            usage=usage,
            finish_reason=final.finish_reason,
            timing=Timing(started="", finished="", latency_s=0.0, attempts=attempts),
            vidcap_version=__version__,
        )

    async def _window(
        self, entry: Entry, probe: media.Probe, plan: windows.Plan, win: windows.Window
    ) -> tuple[Reply, Literal["file", "http", "inline"]]:
        parts = await self.source.media(entry, probe, plan, win)
        body = chat.video_request(
            model=self.model,
            prompt=self.job.prompt,
            video_url=parts.video_url,
            audio_url=parts.audio_url,
            fps=plan.fps,
            num_frames=parts.num_frames,
            sampling=self.job.sampling,
        )
        reply = await self._send(body)
        if parts.audio_url is not None and self._audio_check is None:
            self._audio_check = asyncio.ensure_future(self._verify_audio(body, reply))
        if reply.finish_reason == "length":
            where = f" in window {win.start_s:.1f}-{win.end_s:.1f} s" if plan.windowed else ""
            message = f"caption cut at max_tokens{where} (finish_reason=length)"
            raise RequestFailed("truncated", message, reply.attempts, False)
        return reply, parts.kind

    async def _send(self, body: dict[str, Any], replica: int | None = None) -> Reply:
        return await self.pool.complete(body, replica)

    async def _verify_audio(self, body: dict[str, Any], with_audio: Reply) -> bool | None:
        """Same request without the audio item: if the prompt does not shrink, the server drops audio."""
        content = [p for p in body["messages"][0]["content"] if p["type"] != "audio_url"]
        probe_body = {**body, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
        try:
            without = await self._send(probe_body, with_audio.replica)  # the same server compares
        except RequestFailed as exc:
            self.sink(Event("warning", message=f"could not check that audio reaches the model: {exc}"))
            return None
        verified = with_audio.usage.prompt_tokens > without.usage.prompt_tokens
        if not verified:
            message = (
                "THE SERVER DROPS AUDIO: a request with audio counts as many prompt tokens as one without "
                f"({with_audio.usage.prompt_tokens}); captions will not reflect sound (audio_verified=false)"
            )
            self.sink(Event("warning", message=message))
        return verified

    async def _merge(self, segments: list[Segment]) -> Reply:
        """One text-only request over the window captions; a tree of them when they do not fit at once."""
        parts = [(s.start_s, s.end_s, s.caption) for s in segments]
        attempts, usage = 0, Usage()
        while True:
            merged = []
            for group in windows.merge_groups([p[2] for p in parts], self.limit_tokens):
                chunk = [parts[i] for i in group]
                prompt = chat.merge_prompt(self.job.prompt, chunk)
                reply = await self._send(
                    chat.merge_request(model=self.model, prompt=prompt, sampling=self.job.sampling)
                )
                attempts += reply.attempts
                usage = usage + reply.usage
                if reply.finish_reason == "length":
                    message = "merged caption cut at max_tokens (finish_reason=length)"
                    raise RequestFailed("truncated", message, attempts, False)
                merged.append((chunk[0][0], chunk[-1][1], reply.text))
            if len(merged) == 1:
                return Reply(merged[0][2], reply.finish_reason, usage, attempts, reply.replica)
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

    def _resume_flags(self, batch: list[Entry | Problem]) -> list[bool]:
        if self.job.force:
            return [False] * len(batch)
        return [
            isinstance(i, Entry) and self.store.is_done(i.rel, i.size, i.mtime, self.chash) for i in batch
        ]

    async def feed(self, queue: asyncio.Queue[Entry | None], workers: int) -> None:
        remaining = self.job.limit
        async for batch in self.source.batches(self.job.shard):
            done_flags = await asyncio.to_thread(self._resume_flags, batch)
            for item, done in zip(batch, done_flags, strict=True):
                if remaining == 0:
                    break
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
        self._total(self.counts.seen)  # the exact number, now that the listing is through
        # Sentinels only on a normal end (not in a finally): after a cancel no worker reads the queue.
        for _ in range(workers):
            await queue.put(None)

    async def count(self) -> None:
        """Count ahead of the feeder, so that progress has a total and an ETA early."""
        with contextlib.suppress(OSError):  # only a nicety: a listing error shows up in the feeder
            if self.job.limit is None and (n := await self.source.count(self.job.shard)) is not None:
                self._total(n)

    def _total(self, n: int) -> None:
        self.total = n
        self.sink(Event("total", value=n))

    def snapshot(self, summary: RunSummary, t0: float) -> None:
        """Bring ``summary`` up to date with the run so far (finished and exit_code stay as they are)."""
        summary.counts = self.counts.model_copy()
        summary.counts.requests = self.pool.requests
        summary.counts.retried_requests = self.pool.retried
        summary.usage = self.usage
        summary.total = self.total
        summary.audio_verified = self.audio_verified
        summary.wall_s = round(time.monotonic() - t0, 3)

    def write_summary(self, summary: RunSummary, final: bool = False) -> None:
        """The one way the run summary is written. The lock makes the final write wait for a progress
        write still running in its thread (the same temp file); the flag drops any progress write that
        would come later, so the final one is the last on disk whatever cancels what."""
        with self._summary_lock:
            if not self._summary_final:
                self.store.write_summary(summary)
                self._summary_final = final

    async def write_progress(self, summary: RunSummary, t0: float) -> None:
        """Rewrite the run summary every ``progress_interval`` seconds, so that a run on a cluster shows
        how far it got while it goes on (and, if killed, where it stopped). Runs until cancelled."""
        warned = False
        while True:
            await asyncio.sleep(self.job.progress_interval)
            self.snapshot(summary, t0)
            # Serialised here, on the loop, so the thread never sees the counts change under it.
            write = asyncio.ensure_future(asyncio.to_thread(self.write_summary, summary.model_copy()))
            try:
                # A cancel lets a write in progress land first (a thread cannot be stopped): once this task
                # is done, no progress write is in flight.
                await asyncio.shield(write)
            except asyncio.CancelledError:
                await asyncio.wait([write])
                raise
            except OSError as exc:
                if not warned:  # a full or flaky disk must not stop the captioning; the final write retries
                    self.sink(Event("warning", message=f"cannot update the run summary: {exc}"))
                    warned = True

    async def work(self, queue: asyncio.Queue[Entry | None]) -> None:
        while (entry := await queue.get()) is not None:
            await self.caption(entry)


async def run(
    job: CaptionJob,
    endpoint: Endpoint | Sequence[Endpoint],
    sink: EventSink = lambda e: None,
    source: Source | None = None,
) -> RunSummary:
    """Caption what is missing under the source into ``job.out``; returns the run summary (also written
    to OUT/_vidcap/runs/). Raises ServerUnreachableError/ServerError before anything is written when the
    server cannot be used, OutputLockedError when another run holds the output dir.

    Several endpoints are replicas of one model: requests are spread over those that answer and serve
    the model (the others are left out with a warning), ``job.concurrency`` in flight on each."""
    endpoints = [endpoint] if isinstance(endpoint, Endpoint) else list(endpoint)
    if not endpoints:
        raise UsageError("no model server to send requests to")
    if job.media == "http" and source is None:
        raise UsageError("--media http needs the file server of a cluster job (vidcap caption PROFILE:PATH)")
    source = source or local_source(job)
    try:
        return await _run(job, endpoints, sink, source)
    finally:
        await source.close()


def _serves(endpoint: Endpoint, info: client.ServerInfo, model: str | None) -> str:
    """The model to use on this server (``model``, or its first one); ServerError when it has none."""
    if not model:
        if not info.models:
            raise ServerError(f"{endpoint.base_url} serves no model")
        return info.models[0]
    if model not in info.models:
        served = ", ".join(info.models)
        raise ServerError(f"{endpoint.base_url} does not serve {model!r} (it serves {served})")
    return model


async def _replicas(
    job: CaptionJob, endpoints: list[Endpoint], sink: EventSink
) -> tuple[str, list[tuple[Endpoint, client.ServerInfo]]]:
    """Ask every server (at once) what it serves; keep those that serve the job's model (or the first
    answering server's first model). Errors as for one server when none can be used."""
    if len(endpoints) == 1:
        info = await server_info(endpoints[0])
        return _serves(endpoints[0], info, job.model), [(endpoints[0], info)]
    answers = await asyncio.gather(*(server_info(e) for e in endpoints), return_exceptions=True)
    model, kept, errors = job.model, [], []
    for ep, answer in zip(endpoints, answers, strict=True):
        try:
            if isinstance(answer, BaseException):
                raise answer
            model = _serves(ep, answer, model)
            kept.append((ep, answer))
        except (ServerUnreachableError, ServerError) as exc:
            errors.append(exc)
    if not kept:
        if all(isinstance(e, ServerUnreachableError) for e in errors):
            raise ServerUnreachableError(
                f"cannot reach any of the {len(endpoints)} model servers "
                f"({', '.join(e.base_url for e in endpoints)}); is the job running and the tunnel up? "
                "try 'vidcap tunnel status'"
            )
        why = "; ".join(map(str, errors))
        raise ServerError(f"none of the {len(endpoints)} model servers can be used: {why}")
    for exc in errors:
        sink(Event("warning", message=f"model server left out: {exc}"))
    assert model is not None
    return model, kept


async def _run(job: CaptionJob, endpoints: list[Endpoint], sink: EventSink, source: Source) -> RunSummary:
    model, replicas = await _replicas(job, endpoints, sink)
    endpoints = [ep for ep, _ in replicas]
    lens = [info.max_model_len for _, info in replicas if info.max_model_len]
    max_len = min(lens) if lens else job.max_model_len
    store = OutputDir(job.out)
    state = _Run(job, source, store, sink)
    state.model = model
    state.servers = [
        ServerInfo(url=ep.base_url, vllm_version=info.version, job_id=ep.job_id or job.job_id)
        for ep, info in replicas
    ]
    state.limit_tokens = windows.budget(max_len, job.prompt, job.sampling.max_tokens)
    if state.limit_tokens <= 0:
        raise UsageError(
            f"max_tokens {job.sampling.max_tokens} leaves no room in the server's context ({max_len})"
        )
    state.chash = config_hash(hash_payload(job, model, max_len))
    summary = RunSummary(
        run_id=state.run_id,
        source=source.label,
        out=str(job.out),
        model=model,
        server=state.servers[0],
        config_hash=state.chash,
        shard=f"{job.shard[0]}/{job.shard[1]}" if job.shard else None,
        limit=job.limit,
        started=_now(),
        vidcap_version=__version__,
    )
    with store.locked(job.shard, job.lock_wait):
        where = endpoints[0].base_url
        if len(endpoints) > 1:
            where = f"{len(endpoints)} replicas ({', '.join(ep.base_url for ep in endpoints)})"
        sink(Event("start", message=f"{model} at {where}, context {max_len}"))
        t0 = time.monotonic()
        # Written at the start (finished null), so that a run shows while it goes on, or if it is killed.
        state.write_summary(summary)

        def dead(index: int, reason: str) -> None:
            url = endpoints[index].base_url
            sink(Event("warning", message=f"model server {url} left the run: {reason}"))

        state.pool = Pool.connect(
            endpoints,
            slots=job.concurrency,
            server_wait=job.server_wait,
            timeout=job.request_timeout,
            max_attempts=job.max_attempts,
            max_seconds=job.retry_max_seconds,
            wait_max=job.retry_wait_max,
            on_dead=dead,
        )
        reason = None
        progress: asyncio.Future[None] | None = None
        try:
            if job.progress_interval > 0:
                progress = asyncio.ensure_future(state.write_progress(summary, t0))
            workers = len(endpoints) * job.concurrency + 2 * (os.cpu_count() or 2)
            reason = await _supervise(state, workers)
        finally:
            try:
                if progress is not None:
                    # Stopped (its write landed) before the final write, which must be the last one.
                    progress.cancel()
                    await asyncio.wait([progress])
                await state.pool.close()
            finally:  # written even when a second cancel lands while the run is stopping
                state.snapshot(summary, t0)
                summary.interrupted = isinstance(reason, int)
                if isinstance(reason, BaseException):
                    summary.aborted = f"{type(reason).__name__}: {reason}"
                summary.finished = _now()
                summary.exit_code = exit_code(summary)
                state.write_summary(summary, final=True)
        if isinstance(reason, BaseException) and not isinstance(reason, ServerUnreachableError):
            raise reason  # a bug: the summary is written, the traceback must not be lost
        return summary


async def _supervise(state: _Run, nworkers: int) -> BaseException | int | None:
    """Run feeder, counter and workers; the first failure or signal stops them all. Returns why it
    stopped early: an exception, a signal number, or None for a normal end."""
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

    tasks.append(asyncio.ensure_future(guarded(state.feed(queue, nworkers))))
    counter = asyncio.ensure_future(state.count())
    watcher = asyncio.ensure_future(guarded(state.source.watch()))
    tasks += [asyncio.ensure_future(guarded(state.work(queue))) for _ in range(nworkers)]
    loop = asyncio.get_running_loop()
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop_all, int(signum))
            installed.append(signum)
    try:
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        counter.cancel()
        watcher.cancel()
        for signum in installed:
            loop.remove_signal_handler(signum)
    return stopped[0] if stopped else None


def exit_code(summary: RunSummary) -> int:
    if summary.interrupted:
        return 130
    if summary.aborted:
        return 3
    return 1 if summary.counts.failed else 0
