"""Probing videos and building the media parts of a request (file:// URLs, inline JPEG frames, WAV audio).

Everything here is blocking (decord, Pillow) and meant to run in a worker process (see ``MediaPool``);
the functions are plain so that they pickle and can be tested directly.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
import wave
from collections import OrderedDict
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
# decord's default (0) lets FFmpeg start a thread per core for every reader; MediaPool already runs one
# process per core, so more threads only oversubscribe the cores and slow down opening a reader. With
# frame threads decord also fails on VP9 (webm) after the first few frames.
DECODE_THREADS = 1
# Decoded audio kept per process, so that the windows of one video (and the probe before them) landing on
# the same worker decode its track once. 16-bit mono at 16 kHz is 115 MB an hour: at most two tracks and
# two hours in all; a longer track is decoded again for every call rather than held.
AUDIO_CACHE_ENTRIES = 2
AUDIO_CACHE_BYTES = 2 * 3600 * AUDIO_RATE * 2

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
        vr = decord.VideoReader(path, num_threads=DECODE_THREADS)
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
    # decord cannot tell whether a track decodes without decoding all of it; the samples go to the cache,
    # where the encode_audio calls that usually follow on this worker find them.
    pcm = _audio_track(path)
    return pcm is not None and pcm.size > 0


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
        vr = decord.VideoReader(path, width=width, height=height, num_threads=DECODE_THREADS)
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
    pcm = _audio_span(path, start_s, end_s)
    if pcm is None:
        return None, 0.0
    return wav_url(_wav(pcm)), pcm.size / AUDIO_RATE


def audio_wav(path: str, start_s: float = 0.0, end_s: float | None = None) -> bytes | None:
    """WAV file bytes (16 kHz mono 16-bit) of a span, to the end when ``end_s`` is None; None: no audio."""
    pcm = _audio_span(path, start_s, end_s)
    return None if pcm is None else _wav(pcm)


def _audio_span(path: str, start_s: float, end_s: float | None) -> np.ndarray | None:
    pcm = _audio_track(path)
    if pcm is None:
        return None
    total = pcm.size
    a = int(start_s * AUDIO_RATE)
    b = total if end_s is None else min(total, math.ceil(end_s * AUDIO_RATE))
    if b - a < AUDIO_RATE // 10:
        return None
    return pcm[a:b]


_audio_cache: OrderedDict[tuple[int, int, int, int], np.ndarray] = OrderedDict()
_audio_cache_lock = threading.Lock()  # the file server calls in from several threads


def _audio_track(path: str) -> np.ndarray | None:
    """The whole track as 16-bit mono PCM at 16 kHz (read-only, maybe shared); None: no usable audio."""
    try:
        st = os.stat(path)
        # device and inode rather than the path: links to one file share an entry, a replaced file does not
        key: tuple[int, int, int, int] | None = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        key = None  # decord will not open it either; nothing worth caching
    if key is not None:
        with _audio_cache_lock:
            pcm = _audio_cache.get(key)
            if pcm is not None:
                _audio_cache.move_to_end(key)
                return pcm
    pcm = _decode_audio(path)
    if pcm is not None and key is not None and 0 < pcm.nbytes <= AUDIO_CACHE_BYTES:
        with _audio_cache_lock:
            _audio_cache[key] = pcm
            _audio_cache.move_to_end(key)
            while len(_audio_cache) > AUDIO_CACHE_ENTRIES or (
                sum(a.nbytes for a in _audio_cache.values()) > AUDIO_CACHE_BYTES
            ):
                _audio_cache.popitem(last=False)
    return pcm


def _decode_audio(path: str) -> np.ndarray | None:
    decord = _decord()
    try:
        # decodes (and resamples) the whole track here, whatever span is wanted afterwards
        reader = decord.AudioReader(path, sample_rate=AUDIO_RATE, mono=True)
    except Exception:  # decord says "Can't find audio stream"; an unreadable track is no audio to send
        return None
    total = reader.shape[1]
    if total <= 0:
        return np.zeros(0, dtype="<i2")
    samples = getattr(reader, "_array", None)
    if not (isinstance(samples, np.ndarray) and samples.ndim == 2 and samples.shape[1] == total):
        # reader[a:b] builds a Python index list and copies three times: about 1 s for ten minutes of
        # audio, against a few ms for the array decord already holds. This path is only for a decord
        # that stops keeping that array.
        try:
            samples = reader[0:total].asnumpy().reshape(1, -1)
        except Exception as exc:
            raise MediaError("decode_failed", f"could not decode the audio: {_first_line(exc)}") from exc
    samples = samples[0]
    # decord holds two more copies of the track (its decode buffer and an NDArray); drop them before
    # converting, in place, so that converting a long track adds only its 16-bit copy to the peak.
    del reader
    pcm = _pcm(samples, in_place=True)
    pcm.flags.writeable = False  # shared by every later call through the cache
    return pcm


def _pcm(samples: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """16-bit PCM of float samples in [-1, 1], clipped, exactly as the WAV data URLs have always had it."""
    pcm = np.clip(samples, -1.0, 1.0, out=samples if in_place else None)
    pcm *= 32767
    return pcm.astype("<i2")


def _wav(pcm: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(AUDIO_RATE)
        wav.writeframes(pcm.tobytes())
    return buf.getvalue()


def wav_url(wav: bytes) -> str:
    """A WAV file as the data URL vLLM takes for an audio_url item."""
    return "data:audio/wav;base64," + base64.b64encode(wav).decode("ascii")


def _init_worker() -> None:
    # decord's C++ layer prints its own errors to fd 2; a corrupt file is reported once, by vidcap.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    _exit_with_parent()


def _exit_with_parent() -> None:
    """Exit as soon as the process that started this worker is gone, also when it was killed (-9).

    Workers wait for tasks on a queue whose write end they hold themselves, so they never see the
    parent go; and while they live they keep the forkserver alive too.
    """
    parent = multiprocessing.parent_process()
    sentinel = parent.sentinel if parent is not None else None
    if sentinel is not None:

        def watch() -> None:
            multiprocessing.connection.wait([sentinel])
            os._exit(1)

    else:
        ppid = os.getppid()

        def watch() -> None:
            while os.getppid() == ppid:
                time.sleep(1.0)
            os._exit(1)

    threading.Thread(target=watch, name="vidcap-parent-watch", daemon=True).start()


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
            max_workers=self.workers, mp_context=get_context("forkserver"), initializer=_init_worker
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
