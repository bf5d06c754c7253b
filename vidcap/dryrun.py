"""`vidcap caption --dry-run`: the plan of every video a run would caption, sending nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from vidcap import windows
from vidcap.captioner import CaptionJob, hash_payload, local_source
from vidcap.client import Endpoint, server_info
from vidcap.config import config_hash
from vidcap.discovery import Entry
from vidcap.errors import MediaError, ServerError, ServerUnreachableError
from vidcap.sources import Source
from vidcap.store import OutputDir


async def server_view(
    job: CaptionJob, endpoint: Endpoint | None, warn: Callable[[str], None] = lambda m: None
) -> tuple[str, int]:
    """(model, context length) as a run would see them: the server's when it answers (only GET /models:
    nothing is sent for captioning), else the configured ones, with a warning. The resume check needs the
    server's: the config hash covers both, so a guess would call done videos "not done"."""
    if endpoint is not None:
        try:
            info = await server_info(endpoint, timeout=5.0)
        except (ServerUnreachableError, ServerError) as exc:
            warn(f"{exc}; planning with the configured model and context length instead")
        else:
            model = job.model or (info.models[0] if info.models else "")
            return model, info.max_model_len or job.max_model_len
    return job.model or "", job.max_model_len


async def dry_run(
    job: CaptionJob,
    source: Source | None = None,
    endpoint: Endpoint | None = None,
    warn: Callable[[str], None] = lambda m: None,
) -> list[dict[str, Any]]:
    """Probe and plan with the server's model and context length (see server_view). Holds one row per
    video: a look before a run, not a report over a million videos (use --limit)."""
    source = source or local_source(job)
    store = OutputDir(job.out)
    model, max_len = await server_view(job, endpoint, warn)
    limit = windows.budget(max_len, job.prompt, job.sampling.max_tokens)
    chash = config_hash(hash_payload(job, model, max_len))
    rows: list[dict[str, Any]] = []
    pending: list[tuple[Entry, asyncio.Future[Any]]] = []
    try:
        async for batch in source.batches(job.shard):
            for item in batch:
                if job.limit is not None and len(rows) + len(pending) >= job.limit:
                    break
                if not isinstance(item, Entry):
                    rows.append({"path": item.rel, "note": f"{item.kind}: {item.message}"})
                elif not job.force and store.is_done(item.rel, item.size, item.mtime, chash):
                    rows.append({"path": item.rel, "note": "done (record up to date)"})
                else:
                    pending.append((item, asyncio.ensure_future(source.probe(item, job.audio != "off"))))
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
        await source.close()
    return rows
