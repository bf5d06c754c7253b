"""Fetching and decoding media parts the way vLLM's MediaConnector does. Blocking: run in a thread.

URLs are ``file://`` (only under ``--allowed-local-media-path``, with vLLM's messages), ``data:`` (base64;
``video/jpeg`` means comma-separated JPEG frames, as vLLM accepts pre-extracted frames) and
``http(s)://`` (fetched with urllib). Videos are decoded with decord, frames and images with Pillow,
audio must be WAV (stdlib ``wave``). Every failure is a ``MediaError`` whose text becomes the 400 message.

With ``decode=False`` nothing is decoded or fetched: paths are still checked, inline JPEG frames counted,
WAV headers read, and the rest assumed (``ASSUMED_*``), for benchmarks of the client's own overhead.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import urllib.error
import urllib.request
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import decord
import numpy as np
from PIL import Image, ImageStat

from . import tokens

ASSUMED_WIDTH = 640
ASSUMED_HEIGHT = 360
ASSUMED_FPS = 2.0
ASSUMED_AUDIO_S = 10.0
ASSUMED_NUM_FRAMES = 32
NEUTRAL_RGB = (128, 128, 128)


class MediaError(ValueError):
    """A media item that vLLM would reject with 400; the text is the message."""


@dataclass(frozen=True, slots=True)
class Video:
    n_frames: int
    width: int
    height: int
    duration_s: float
    mean_rgb: tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Audio:
    duration_s: float
    rms: float


@dataclass(frozen=True, slots=True)
class Picture:
    width: int
    height: int
    mean_rgb: tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Source:
    """Where media may come from and whether to decode it (the server's options)."""

    allowed_root: Path | None
    decode: bool = True
    fetch_timeout: float = 10.0


def media_key(url: str) -> str:
    """The name a media item is counted and logged under: a path, a URL or ``inline:<sha1[:12]>``."""
    if url.startswith("data:"):
        return "inline:" + hashlib.sha1(url.encode()).hexdigest()[:12]
    if url.startswith("file:"):
        return url2pathname(urlsplit(url).path)
    return url


def local_path(url: str, allowed_root: Path | None) -> Path:
    """The file a ``file://`` URL names, refused like vLLM unless it resolves under ``allowed_root``."""
    if allowed_root is None:
        raise MediaError("Cannot load local files without `--allowed-local-media-path`.")
    spec = urlsplit(url)
    # vLLM ignores the host part; refusing it catches file://relative/path bugs in clients.
    if spec.netloc not in ("", "localhost"):
        raise MediaError(f"file URL {url!r} has a host part {spec.netloc!r}; use file:///absolute/path")
    path = Path(url2pathname(spec.path))
    if allowed_root not in path.resolve().parents:
        raise MediaError(
            f"The file path {path} must be a subpath of `--allowed-local-media-path` {allowed_root}."
        )
    return path


def _data_url(url: str) -> tuple[str, str]:
    """(media type, base64 payload) of a data URL, split by hand: urlsplit copies big payloads thrice."""
    header, sep, payload = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if not sep or encoding.lower() != "base64":
        raise MediaError("Only base64 data URLs are supported for now.")
    return media_type.strip().lower(), payload


def _b64(payload: str) -> bytes:
    try:
        return base64.b64decode(payload)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"invalid base64 data: {exc}") from exc


def _fetch(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "vLLM/0.0.0-standin"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise MediaError(f"Failed to fetch {url}: {exc}") from exc


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MediaError(f"{exc.strerror or exc}: {str(path)!r}") from exc


def _scheme(url: str) -> str:
    scheme = url.partition(":")[0].lower()
    if scheme not in ("file", "data", "http", "https"):
        raise MediaError("The URL must be either a HTTP, data or file URL.")
    return scheme


# ---- video ---------------------------------------------------------------------------------------


def load_video(url: str, src: Source, num_frames: int | None, fps: float | None) -> Video:
    scheme = _scheme(url)
    if scheme == "data":
        media_type, payload = _data_url(url)
        if media_type == "video/jpeg":
            return _jpeg_frames(payload, fps, src.decode)
        if not src.decode:
            return _assumed_video(num_frames, fps)
        return _decode_video(io.BytesIO(_b64(payload)), "data URL", num_frames, fps)
    if scheme == "file":
        path = local_path(url, src.allowed_root)
        try:
            st = path.stat()
        except OSError as exc:
            raise MediaError(f"{exc.strerror or exc}: {str(path)!r}") from exc
        if not src.decode:
            return _assumed_video(num_frames, fps)
        return _decode_video_file(str(path), st.st_size, st.st_mtime_ns, num_frames, fps)
    if not src.decode:
        return _assumed_video(num_frames, fps)
    return _decode_video(io.BytesIO(_fetch(url, src.fetch_timeout)), url, num_frames, fps)


def _assumed_video(num_frames: int | None, fps: float | None) -> Video:
    n = num_frames if num_frames is not None and num_frames > 0 else ASSUMED_NUM_FRAMES
    return Video(n, ASSUMED_WIDTH, ASSUMED_HEIGHT, n / (fps or ASSUMED_FPS), NEUTRAL_RGB)


@functools.lru_cache(maxsize=1024)
def _decode_video_file(
    path: str, size: int, mtime_ns: int, num_frames: int | None, fps: float | None
) -> Video:
    # Keyed on size and mtime so a rewritten file is decoded again; benchmarks re-send the same files.
    del size, mtime_ns
    return _decode_video(path, path, num_frames, fps)


def _decode_video(source: str | io.BytesIO, name: str, num_frames: int | None, fps: float | None) -> Video:
    try:
        reader = decord.VideoReader(source, num_threads=1)
        total = len(reader)
        avg_fps = float(reader.get_avg_fps())
        duration = total / avg_fps if avg_fps > 0 else 0.0
        n = tokens.frames_to_sample(total, duration, num_frames, fps)
        indices = np.linspace(0, total - 1, n, dtype=int)
        sums = np.zeros(3)
        height = width = 0
        # Batches of 8 keep memory flat for long 4K clips; the sums only need every 4th pixel.
        for start in range(0, len(indices), 8):
            batch = reader.get_batch(indices[start : start + 8]).asnumpy()
            height, width = batch.shape[1:3]
            sums += batch[:, ::4, ::4].reshape(-1, 3).mean(axis=0) * len(batch)
    except Exception as exc:  # decord raises RuntimeError, DECORDError, AssertionError, IndexError
        raise MediaError(f"Failed to load video from {name}: {exc}") from exc
    return Video(n, int(width), int(height), duration, _rgb(sums / max(1, n)))


def _jpeg_frames(payload: str, fps: float | None, decode: bool) -> Video:
    frames = payload.split(",")
    if not decode:
        return Video(
            len(frames), ASSUMED_WIDTH, ASSUMED_HEIGHT, len(frames) / (fps or ASSUMED_FPS), NEUTRAL_RGB
        )
    size: tuple[int, int] | None = None
    sums = np.zeros(3)
    for i, frame in enumerate(frames):
        try:
            picture = _decode_picture(_b64(frame))
        except MediaError as exc:
            raise MediaError(f"Failed to load video from data URL: frame {i}: {exc}") from exc
        if size is not None and (picture.width, picture.height) != size:
            raise MediaError(
                f"Failed to load video from data URL: frame {i} is "
                f"{picture.width}x{picture.height}, frame 0 is {size[0]}x{size[1]}"
            )
        size = (picture.width, picture.height)
        sums += picture.mean_rgb
    assert size is not None
    return Video(len(frames), size[0], size[1], len(frames) / (fps or ASSUMED_FPS), _rgb(sums / len(frames)))


# ---- images --------------------------------------------------------------------------------------


def _decode_picture(data: bytes) -> Picture:
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise MediaError(f"cannot decode image: {exc}") from exc
    return Picture(rgb.width, rgb.height, _rgb(ImageStat.Stat(rgb).mean))


def _rgb(mean: Any) -> tuple[int, int, int]:
    r, g, b = (int(np.rint(v)) for v in mean[:3])
    return r, g, b


def load_image(url: str, src: Source) -> Picture:
    scheme = _scheme(url)
    if scheme == "data":
        data = _b64(_data_url(url)[1])
    elif scheme == "file":
        data = _read(local_path(url, src.allowed_root))
    elif not src.decode:
        return Picture(ASSUMED_WIDTH, ASSUMED_HEIGHT, NEUTRAL_RGB)
    else:
        data = _fetch(url, src.fetch_timeout)
    try:
        return _decode_picture(data)
    except MediaError as exc:
        raise MediaError(f"Failed to load image from {media_key(url)}: {exc}") from exc


# ---- audio ---------------------------------------------------------------------------------------


def load_audio(url: str, src: Source) -> Audio:
    scheme = _scheme(url)
    name = media_key(url)
    if scheme == "data":
        media_type, payload = _data_url(url)
        if media_type not in ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"):
            raise MediaError(f"the stand-in decodes only WAV audio, got {media_type!r}")
        if not src.decode:
            # The first 512 base64 characters hold the RIFF header: enough for the duration.
            return _wav(io.BytesIO(_b64(payload[:512])), name, header_only=True)
        return _wav(io.BytesIO(_b64(payload)), name, header_only=False)
    if scheme == "file":
        path = local_path(url, src.allowed_root)
        if not src.decode:
            try:
                with path.open("rb") as f:
                    return _wav(f, name, header_only=True)
            except OSError as exc:
                raise MediaError(f"{exc.strerror or exc}: {str(path)!r}") from exc
        return _wav(io.BytesIO(_read(path)), name, header_only=False)
    if not src.decode:
        return Audio(ASSUMED_AUDIO_S, 0.0)
    return _wav(io.BytesIO(_fetch(url, src.fetch_timeout)), name, header_only=False)


def _wav(stream: io.BufferedIOBase | io.BytesIO, name: str, *, header_only: bool) -> Audio:
    try:
        with wave.open(stream) as w:
            rate, width, channels, n = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
            raw = b"" if header_only else w.readframes(n)
    except (wave.Error, EOFError, OSError, ValueError) as exc:
        raise MediaError(
            f"Failed to load audio from {name}: not a WAV file the stand-in can read "
            f"({exc or type(exc).__name__})"
        ) from exc
    if rate <= 0:
        raise MediaError(f"Failed to load audio from {name}: sample rate {rate}")
    if header_only:
        return Audio(n / rate, 0.0)
    n = len(raw) // (width * max(1, channels))
    if n == 0:
        raise MediaError(f"Failed to load audio from {name}: no samples")
    return Audio(n / rate, _rms(raw, width))


def _rms(raw: bytes, width: int) -> float:
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float64) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2") / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = np.where(v >= 1 << 23, v - (1 << 24), v) / float(1 << 23)
    else:
        x = np.frombuffer(raw, "<i4") / float(1 << 31)
    return float(np.sqrt(np.mean(np.square(x))))
