"""Token accounting of the stand-in: pure functions that mirror vLLM serving Qwen3-Omni.

The numbers only need to be close to the real model's, but they follow the real rules so that a
client which plans requests from a token budget (window length, fps, max_pixels) meets the same
limits here as on a GPU:

* Video frames are sampled like vLLM's video loader (``frames_to_sample``): the request's
  ``media_io_kwargs.video.num_frames`` (default 32) and ``fps`` each cap the count, the smaller wins,
  never more than the file has, never fewer than one.
* Each frame is resized like Qwen's ``smart_resize``: both sides rounded to a multiple of 32 (patch 16 x
  spatial merge 2), scaled down keeping the aspect ratio when the area exceeds ``max_pixels``. A frame
  of h x w then costs (h/32)*(w/32) tokens, and frames go in temporal pairs (an odd last frame is padded),
  so a video costs ceil(n/2) * tokens_per_frame.
* Audio costs what Qwen3-Omni's audio encoder emits: 13 tokens per full second of 100 mel frames (16 kHz,
  hop 160) plus the conv-downsampled remainder, about 13 tokens/s.
* Text costs ceil(chars/4) per text item, plus ``TEMPLATE_TOKENS`` for the chat template of the request
  and ``MEDIA_MARKER_TOKENS`` for the start/end markers around each media item.
* The context checks and their messages are vLLM's (``check_context``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

PATCH_SIZE = 16
SPATIAL_MERGE = 2
TEMPORAL_PATCH = 2
FACTOR = PATCH_SIZE * SPATIAL_MERGE
DEFAULT_VIDEO_MAX_PIXELS = 602112
DEFAULT_IMAGE_MAX_PIXELS = 12845056
DEFAULT_NUM_FRAMES = 32
MAX_ASPECT_RATIO = 200
CHARS_PER_TOKEN = 4
TEMPLATE_TOKENS = 20
MEDIA_MARKER_TOKENS = 2
MEL_FRAMES_PER_SECOND = 100


def smart_resize(
    height: int, width: int, max_pixels: int = DEFAULT_VIDEO_MAX_PIXELS, factor: int = FACTOR
) -> tuple[int, int]:
    """Qwen's resize rule: (height, width) as multiples of ``factor`` with area <= ``max_pixels``.

    Uses Python's round() (banker's rounding) because the reference implementation does, so 240 px
    becomes 256 and 208 becomes 192.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    return h_bar, w_bar


def frame_tokens(height: int, width: int, max_pixels: int = DEFAULT_VIDEO_MAX_PIXELS) -> int:
    """Tokens of one frame (or one temporal pair of frames) of ``height`` x ``width`` pixels."""
    h_bar, w_bar = smart_resize(height, width, max_pixels)
    return (h_bar // FACTOR) * (w_bar // FACTOR)


def frames_to_sample(
    total_frames: int, duration_s: float, num_frames: int | None = None, fps: float | None = None
) -> int:
    """How many frames vLLM's loader takes from a file of ``total_frames`` frames.

    ``num_frames``/``fps`` are the request's ``media_io_kwargs.video`` values (None when absent).
    vLLM keeps its default of 32 frames unless the request names ``num_frames`` (-1 means all frames),
    which is why a request that only sets ``fps`` still gets at most 32 frames.
    """
    if total_frames <= 0:
        return 0
    wanted = DEFAULT_NUM_FRAMES if num_frames is None else num_frames
    n = total_frames
    if wanted > 0:
        n = min(wanted, total_frames)
    if fps is not None and fps > 0:
        n = min(n, math.floor(duration_s * fps))
    return max(1, n)


def video_tokens(n_frames: int, height: int, width: int, max_pixels: int = DEFAULT_VIDEO_MAX_PIXELS) -> int:
    """Tokens of a video of ``n_frames`` sampled frames of ``height`` x ``width`` (markers excluded)."""
    if n_frames <= 0:
        return 0
    return math.ceil(n_frames / TEMPORAL_PATCH) * frame_tokens(height, width, max_pixels)


def image_tokens(height: int, width: int, max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS) -> int:
    """Tokens of one image (markers excluded): one temporal pair made of the image twice."""
    return frame_tokens(height, width, max_pixels)


def audio_tokens(duration_s: float) -> int:
    """Tokens Qwen3-Omni's audio encoder emits for ``duration_s`` seconds (markers excluded)."""
    mel_frames = math.floor(duration_s * MEL_FRAMES_PER_SECOND + 1e-9)
    if mel_frames <= 0:
        return 0
    leave = mel_frames % MEL_FRAMES_PER_SECOND
    feat = (leave - 1) // 2 + 1
    return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (mel_frames // MEL_FRAMES_PER_SECOND) * 13


def text_tokens(text: str) -> int:
    """Tokens of one text item: a crude 4 characters per token."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def prompt_tokens(texts: Iterable[str], media_tokens: Iterable[int]) -> int:
    """Prompt length of a request: its text items, its media items (each with markers) and the template."""
    total = TEMPLATE_TOKENS
    total += sum(text_tokens(t) for t in texts)
    total += sum(n + MEDIA_MARKER_TOKENS for n in media_tokens)
    return total


def completion(text: str, max_tokens: int) -> tuple[str, int, str]:
    """The reply as generated under ``max_tokens``: (text, completion_tokens, finish_reason)."""
    needed = text_tokens(text)
    if needed <= max_tokens:
        return text, needed, "stop"
    cut = text[: max_tokens * CHARS_PER_TOKEN]
    return cut, text_tokens(cut), "length"


def check_context(prompt: int, max_tokens: int | None, max_model_len: int) -> tuple[int, str | None]:
    """vLLM's context checks: (effective max_tokens, None) or (0, the 400 message vLLM gives)."""
    if prompt > max_model_len or (max_tokens is None and prompt >= max_model_len):
        return 0, (
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt} input tokens. Please reduce the length of the input messages."
        )
    if max_tokens is None:
        return max_model_len - prompt, None
    if prompt + max_tokens > max_model_len:
        return 0, (
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
            f"context length is {max_model_len} tokens and your request has {prompt} input tokens "
            f"({max_tokens} > {max_model_len} - {prompt})."
        )
    return max_tokens, None
