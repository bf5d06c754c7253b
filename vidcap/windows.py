"""Planning requests for one video from a token budget: one request, or overlapping windows plus a merge.

Pure functions. Token estimates follow Qwen3-Omni: a frame of w x h (after ``fit_size``) costs
(w/32)*(h/32) tokens per pair of frames, audio ~13 tokens/s, text ~1 token per 3 characters (an
overestimate on purpose: the estimate must never be below what the server counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vidcap.errors import MediaError
from vidcap.media import PATCH, Probe, fit_size, frame_count

AUDIO_TOKENS_PER_S = 13.0
MAX_AUDIO_WINDOW_S = 30.0
TEMPLATE_TOKENS = 64
SAFETY = 1.05
MIN_WINDOW_S = 2.0
MIN_FPS = 0.25
MIN_PIXELS = 128 * 128


@dataclass(frozen=True)
class Window:
    index: int
    start_s: float
    end_s: float
    num_frames: int
    est_tokens: int


@dataclass(frozen=True)
class Plan:
    windows: tuple[Window, ...]
    fps: float
    max_pixels: int
    width: int
    height: int
    audio: bool
    window_s: float | None
    overlap_s: float

    @property
    def windowed(self) -> bool:
        return self.window_s is not None

    @property
    def est_tokens(self) -> int:
        return sum(w.est_tokens for w in self.windows)


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / 3)


def media_tokens(span_s: float, fps: float, width: int, height: int, audio: bool) -> int:
    per_frame = (width // PATCH) * (height // PATCH)
    video = frame_count(span_s, fps) // 2 * per_frame
    sound = math.ceil(span_s * AUDIO_TOKENS_PER_S) if audio else 0
    return math.ceil((video + sound) * SAFETY)


def budget(max_model_len: int, prompt: str, max_tokens: int) -> int:
    """Tokens left for media in one request."""
    return max_model_len - max_tokens - text_tokens(prompt) - TEMPLATE_TOKENS


def _longest_span(limit: int, fps: float, width: int, height: int, audio: bool, cap: float) -> float:
    """The longest span (<= cap) whose media fits ``limit`` tokens; 0 when not even MIN_WINDOW_S fits."""
    if media_tokens(MIN_WINDOW_S, fps, width, height, audio) > limit:
        return 0.0
    lo, hi = MIN_WINDOW_S, cap
    if media_tokens(hi, fps, width, height, audio) <= limit:
        return hi
    for _ in range(40):
        mid = (lo + hi) / 2
        if media_tokens(mid, fps, width, height, audio) <= limit:
            lo = mid
        else:
            hi = mid
    return math.floor(lo * 100) / 100


def plan_video(
    probe: Probe,
    *,
    limit: int,
    fps: float,
    max_pixels: int,
    audio: bool,
    window: float | None = None,
    overlap: float = 2.0,
) -> Plan:
    """Choose window length, fps and max_pixels so that no request exceeds ``limit`` media tokens.

    Quality is given up only when it must be: first the longest window at the asked fps and size; when
    not even a short window fits, the frame area is halved, then the fps, until one does.
    """
    duration = probe.duration_s
    cap = min(window or math.inf, MAX_AUDIO_WINDOW_S if audio else math.inf)
    pixels, rate = max_pixels, min(fps, max(probe.fps, MIN_FPS))
    while True:
        width, height = fit_size(probe.width, probe.height, pixels)
        longest = _longest_span(limit, rate, width, height, audio, min(cap, max(duration, MIN_WINDOW_S)))
        if longest > 0:
            break
        if pixels / 2 >= MIN_PIXELS:
            pixels //= 2
        elif rate / 2 >= MIN_FPS:
            rate /= 2
        else:
            raise MediaError(
                "too_large", f"even {MIN_WINDOW_S:.0f} s at the lowest quality exceed {limit} tokens"
            )
    if duration <= longest:
        only = Window(
            0, 0.0, duration, frame_count(duration, rate), media_tokens(duration, rate, width, height, audio)
        )
        return Plan((only,), rate, pixels, width, height, audio, None, 0.0)
    step_overlap = min(overlap, longest / 4)
    count = max(1, math.ceil((duration - step_overlap) / (longest - step_overlap)))
    length = min(longest, (duration + (count - 1) * step_overlap) / count)
    stride = length - step_overlap
    windows = []
    for i in range(count):
        start = round(i * stride, 3)
        end = round(min(duration, i * stride + length), 3) if i < count - 1 else duration
        span = end - start
        windows.append(
            Window(i, start, end, frame_count(span, rate), media_tokens(span, rate, width, height, audio))
        )
    return Plan(tuple(windows), rate, pixels, width, height, audio, round(length, 3), step_overlap)


def merge_groups(captions: list[str], limit: int) -> list[list[int]]:
    """Split window captions into consecutive groups whose merge prompt fits ``limit`` text tokens.

    One group for all of them is the usual case; very long videos merge in a tree (groups first).
    """
    groups: list[list[int]] = [[]]
    used = 0
    for i, text in enumerate(captions):
        cost = text_tokens(text) + 16
        if groups[-1] and used + cost > limit:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += cost
    return groups
