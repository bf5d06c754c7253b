"""Turning a profile plus command-line options into a CaptionJob and an Endpoint (no I/O but reading a
prompt/API-key file, and the endpoint of a running local job when no server is named)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vidcap.captioner import CaptionJob
from vidcap.client import Endpoint, normalize_url
from vidcap.config import Config, model_tag
from vidcap.discovery import parse_shard
from vidcap.errors import UsageError
from vidcap.jobs import choose_preset

MEDIA = ("file", "http", "inline")
JOB_KEY_ENV = "VIDCAP_JOB_KEY"
AUDIO = ("auto", "on", "off")


@dataclass(frozen=True)
class Settings:
    """What the user typed; None means 'from the profile'."""

    source: str
    out: Path | None = None
    server: str | Sequence[str] | None = None  # several URLs: replicas of one model
    model: str | None = None
    prompt: str | None = None
    concurrency: int | None = None
    media: str | None = None
    audio: str | None = None
    window: float | None = None
    force: bool = False
    shard: str | None = None
    limit: int | None = None
    api_key_file: Path | None = None
    profile: str | None = None


def split_source(source: str, cfg: Config) -> tuple[str | None, str]:
    """'PROFILE:PATH' -> (PROFILE, PATH) when PROFILE is a configured profile and SOURCE is not an
    existing local path (a local file name may contain a colon)."""
    head, sep, tail = source.partition(":")
    if sep and head in cfg.profiles and not Path(source).exists():
        return head, tail
    return None, source


def read_prompt(text: str | None, default: str) -> str:
    if text is None:
        return default
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read prompt file {path}: {exc.strerror}") from exc
    if not text.strip():
        raise UsageError("the prompt is empty")
    return text.strip()


def read_api_key(path: Path | None) -> str | None:
    if path is not None:
        try:
            return path.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise UsageError(f"cannot read API key file {path}: {exc.strerror}") from exc
    return os.environ.get("VIDCAP_API_KEY") or None


@dataclass(frozen=True)
class Resolved:
    job: CaptionJob
    endpoint: Endpoint | None  # None for a cluster source: the tunnel decides the URL
    remote: tuple[str, str] | None = None  # (profile, cluster path)
    endpoints: tuple[Endpoint, ...] = ()  # every --server (replicas); endpoint is the first


def resolve(cfg: Config, s: Settings) -> Resolved:
    remote, path = split_source(s.source, cfg)
    if remote is not None and s.profile and s.profile != remote:
        raise UsageError(f"SOURCE names profile {remote!r} but --profile says {s.profile!r}")
    profile = cfg.profile(remote or s.profile)
    cap, srv = profile.caption, profile.server
    preset = choose_preset(cfg, profile)
    media = s.media or cap.media
    audio = s.audio or cap.audio
    if audio == "auto" and not preset.audio:
        audio = "off"  # the preset's model takes no audio item: vLLM would refuse every such request
    if media not in MEDIA:
        raise UsageError(f"--media must be one of {', '.join(MEDIA)} (got {media!r})")
    if audio not in AUDIO:
        raise UsageError(f"--audio must be one of {', '.join(AUDIO)} (got {audio!r})")
    try:
        shard = parse_shard(s.shard)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if remote is None:
        if media == "http":
            raise UsageError("--media http needs a cluster source (PROFILE:PATH) and its file server")
        local = Path(path).expanduser()
        if not local.is_dir():
            raise UsageError(f"source {local} is not a directory")
    model = s.model or srv.served_name
    tag = model_tag(s.model or preset.model)
    out = s.out or (Path(cap.out) if cap.out else Path("captions") / tag)
    urls = [s.server] if isinstance(s.server, str) else list(s.server or ())
    url = (urls[0] if urls else None) or srv.url
    api_key = read_api_key(s.api_key_file)
    if remote is None and url is None and not profile.ssh.host:
        from vidcap.jobs import local_endpoint

        found = local_endpoint(cfg, profile)
        if found is not None:
            url, job_key = found
            api_key = api_key or job_key
    url = url or f"http://127.0.0.1:{srv.local_vllm_port}/v1"
    job = CaptionJob(
        source=local.resolve() if remote is None else f"{remote}:{path}",
        out=out.expanduser().resolve(),
        prompt=read_prompt(s.prompt, cap.prompt),
        sampling=cap.sampling,
        model=model,
        fps=cap.fps,
        max_pixels=cap.max_pixels,
        window=s.window if s.window is not None else cap.window,
        overlap=cap.overlap,
        media=media,  # type: ignore[arg-type]
        audio=audio,  # type: ignore[arg-type]
        concurrency=s.concurrency or cap.concurrency,
        force=s.force,
        shard=shard,
        limit=s.limit,
        extensions=tuple(cap.extensions),
        max_model_len=srv.max_model_len,
        request_timeout=cap.request_timeout,
        max_attempts=cap.max_attempts,
        retry_max_seconds=cap.retry_max_seconds,
        server_wait=cap.server_wait,
        progress_interval=cap.progress_interval,
        lock_wait=cap.lock_wait,
        # Set by the job script around an on-cluster run: the run summary is then named after the job
        # (task), which is how `vidcap job status` finds each shard's progress.
        job_id=(os.environ.get(JOB_KEY_ENV) or None) if remote is None else None,
    )
    if remote is not None:
        return Resolved(job, None, (remote, path))
    endpoints = tuple(dict.fromkeys(Endpoint(normalize_url(u), api_key) for u in [url, *urls[1:]]))
    return Resolved(job, endpoints[0], endpoints=endpoints)
