"""Probing videos and building the media parts of a request (file:// URLs, inline JPEG frames, WAV audio).

Everything here is blocking (decord, Pillow) and meant to run in a worker process (see ``MediaPool``);
the functions are plain so that they pickle and can be tested directly.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import os
import wave
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np

from vidcap.errors import MediaError

AUDIO_RATE = 16000
PATCH = 32  # Qwen3-Omni: 16 px patches merged 2x2, so one visual token covers 32x32 px.
T = TypeVar("T")
VFR_SPREAD = 0.10  # relative spread of frame intervals above which a video counts as variable-rate

# Leading bytes of the containers vidcap expects; used only to tell "corrupt video" from "not a video".
_MAGIC = (
    (4, b"ftyp"),  # mp4, mov, m4v, 3gp
    (0, b"\x1a\x45\xdf\xa3"),  # matroska, webm
    (0, b"RIFF"),  # avi
    (0, b"\x00\x00\x01\xba"),  # mpeg program stream
    (0, b"\x47"),  # mpeg transport stream
    (0, b"FLV"),
    (0, b"OggS"),
)


@dataclass(frozen=True)
class Probe:
    duration_s: float
    fps: float
    frames: int
    width: int
    height: int
    has_audio: bool | None
    vfr: bool


@dataclass(frozen=True)
class InlineMedia:
    video_url: str
    num_frames: int
    width: int
    height: int
    audio_url: str | None
    audio_s: float


def _decord():  # type: ignore[no-untyped-def]
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    return decord


def _open_error(path: str, exc: Exception) -> MediaError:
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as os_exc:
        return MediaError("unreadable", f"cannot read file: {os_exc.strerror}")
    if not head:
        return MediaError("empty", "empty file (0 bytes)")
    if any(head[off : off + len(magic)] == magic for off, magic in _MAGIC):
        return MediaError("corrupt", f"corrupt or truncated video: the decoder could not open it ({exc})")
    return MediaError("not_video", "not a video file (unknown format; the decoder could not open it)")


def probe(path: str, *, audio: bool = True) -> Probe:
    """Duration, rate, size and audio presence of one video; MediaError when it cannot be used."""
    decord = _decord()
    try:
        if os.path.getsize(path) == 0:
            raise MediaError("empty", "empty file (0 bytes)")
        vr = decord.VideoReader(path)
    except MediaError:
        raise
    except OSError as exc:
        raise MediaError("unreadable", f"cannot read file: {exc.strerror}") from exc
    except Exception as exc:  # decord raises RuntimeError and its own DECORDError
        raise _open_error(path, exc) from exc
    frames = len(vr)
    if frames == 0:
        raise MediaError("no_frames", "the video stream has no frames")
    stamps = np.asarray(vr.get_frame_timestamp(np.arange(frames)), dtype=np.float64).reshape(frames, 2)
    duration = float(stamps[-1, 1])
    if not math.isfinite(duration) or duration <= 0:
        avg = float(vr.get_avg_fps())
        if not (math.isfinite(avg) and avg > 0):
            raise MediaError("no_timing", "the container reports no frame rate and no timestamps")
        duration = frames / avg
    try:
        height, width = vr[0].shape[:2]
    except Exception as exc:  # DECORDError: the first frame does not decode
        raise MediaError("decode_failed", f"the first frame does not decode: {_first_line(exc)}") from exc
    starts = stamps[:, 0]
    vfr = False
    if frames > 2:
        gaps = np.diff(starts)
        gaps = gaps[gaps > 0]
        vfr = bool(gaps.size and (gaps.max() - gaps.min()) > VFR_SPREAD * gaps.mean())
    has_audio = _has_audio(path) if audio else None
    return Probe(
        duration_s=round(duration, 3),
        fps=round(frames / duration, 3),
        frames=frames,
        width=int(width),
        height=int(height),
        has_audio=has_audio,
        vfr=vfr,
    )


def _first_line(exc: Exception) -> str:
    """decord's messages carry C++ source positions and newlines; keep the readable tail of line one."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.rsplit(": ", 1)[-1][:200]


def _has_audio(path: str) -> bool:
    decord = _decord()
    try:
        reader = decord.AudioReader(path, sample_rate=AUDIO_RATE, mono=True)
    except Exception:  # decord says "Can't find audio stream"; an unreadable track is no audio to send
        return False
    return reader.shape[1] > 0


def fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Frame size the model sees: aspect kept, sides multiples of 32, area <= max_pixels (Qwen's rule)."""
    w = max(PATCH, round(width / PATCH) * PATCH)
    h = max(PATCH, round(height / PATCH) * PATCH)
    if w * h > max_pixels:
        beta = math.sqrt(width * height / max_pixels)
        w = max(PATCH, math.floor(width / beta / PATCH) * PATCH)
        h = max(PATCH, math.floor(height / beta / PATCH) * PATCH)
    return w, h


def frame_count(span_s: float, fps: float) -> int:
    """Frames sampled from a span: even (the model packs frames in pairs) and at least 2."""
    n = max(2, math.ceil(span_s * fps - 1e-9))
    return n + (n % 2)


def sample_times(start_s: float, end_s: float, fps: float) -> list[float]:
    n = frame_count(end_s - start_s, fps)
    step = (end_s - start_s) / n
    return [start_s + (i + 0.5) * step for i in range(n)]


def file_url(path: str | Path) -> str:
    # abspath, not resolve: a symlinked video keeps its own path, and vLLM checks the allowed prefix itself.
    return "file://" + quote(os.path.abspath(path), safe="/")


def encode_inline(
    path: str,
    probe_: Probe,
    start_s: float,
    end_s: float,
    fps: float,
    max_pixels: int,
    with_audio: bool,
    quality: int = 85,
) -> InlineMedia:
    """Decode the frames of one span at the model's size and JPEG them; cut the span's audio as WAV."""
    from PIL import Image

    decord = _decord()
    width, height = fit_size(probe_.width, probe_.height, max_pixels)
    try:
        vr = decord.VideoReader(path, width=width, height=height)
        frames = len(vr)
        starts = np.asarray(vr.get_frame_timestamp(np.arange(frames)), dtype=np.float64).reshape(frames, 2)[
            :, 0
        ]
        times = sample_times(start_s, end_s, fps)
        idx = np.clip(np.searchsorted(starts, times, side="right") - 1, 0, frames - 1)
        batch = vr.get_batch(idx.tolist()).asnumpy()
    except Exception as exc:
        raise MediaError(
            "decode_failed", f"could not decode frames {start_s:.1f}-{end_s:.1f} s: {exc}"
        ) from exc
    parts = []
    for frame in batch:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
        parts.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    video_url = "data:video/jpeg;base64," + ",".join(parts)
    audio_url, audio_s = encode_audio(path, start_s, end_s) if with_audio else (None, 0.0)
    return InlineMedia(video_url, len(parts), width, height, audio_url, audio_s)


def encode_audio(path: str, start_s: float, end_s: float) -> tuple[str | None, float]:
    """16 kHz mono 16-bit WAV of a span as a data URL; (None, 0) when the file has no audio there."""
    samples = _audio_samples(path, start_s, end_s)
    if samples is None:
        return None, 0.0
    return wav_data_url(samples), samples.size / AUDIO_RATE


def audio_wav(path: str, start_s: float = 0.0, end_s: float | None = None) -> bytes | None:
    """WAV file bytes (16 kHz mono 16-bit) of a span, to the end when ``end_s`` is None; None: no audio."""
    samples = _audio_samples(path, start_s, end_s)
    return None if samples is None else wav_bytes(samples)


def _audio_samples(path: str, start_s: float, end_s: float | None) -> np.ndarray | None:
    decord = _decord()
    try:
        reader = decord.AudioReader(path, sample_rate=AUDIO_RATE, mono=True)
    except Exception:
        return None
    total = reader.shape[1]
    a = int(start_s * AUDIO_RATE)
    b = total if end_s is None else min(total, math.ceil(end_s * AUDIO_RATE))
    if b - a < AUDIO_RATE // 10:
        return None
    try:
        return reader[a:b].asnumpy().reshape(-1)
    except Exception as exc:
        end = f"{end_s:.1f}" if end_s is not None else "end"
        raise MediaError("decode_failed", f"could not decode audio {start_s:.1f}-{end} s: {exc}") from exc


def wav_bytes(samples: np.ndarray) -> bytes:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(AUDIO_RATE)
        wav.writeframes(pcm)
    return buf.getvalue()


def wav_data_url(samples: np.ndarray) -> str:
    return "data:audio/wav;base64," + base64.b64encode(wav_bytes(samples)).decode("ascii")


def _quiet_worker() -> None:
    # decord's C++ layer prints its own errors to fd 2; a corrupt file is reported once, by vidcap.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


class MediaPool:
    """Worker processes for decoding: the event loop keeps its core and decoding gets all the others.

    In concurrent.futures one worker that dies (a decoder crash on one bad file) breaks the whole pool;
    here the pool is replaced and the call retried once, so one bad file costs one failure, not the run.
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or max(1, os.cpu_count() or 1)
        self._generation = 0
        self._pool = self._new()

    def _new(self) -> ProcessPoolExecutor:
        # forkserver: forking a process that runs threads (the event loop's executors) is unsafe.
        return ProcessPoolExecutor(
            max_workers=self.workers, mp_context=get_context("forkserver"), initializer=_quiet_worker
        )

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        for _ in range(2):
            generation, pool = self._generation, self._pool
            try:
                return await loop.run_in_executor(pool, fn, *args)
            except BrokenProcessPool:
                if generation == self._generation:
                    self._generation += 1
                    self._pool = self._new()
                    pool.shutdown(wait=False, cancel_futures=True)
        raise MediaError("decoder_crash", "the decoder process crashed on this file (twice)")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
