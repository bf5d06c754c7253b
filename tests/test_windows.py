"""Window planning from a token budget (pure functions, literal inputs)."""

from __future__ import annotations

import itertools

import pytest

from vidcap import windows
from vidcap.errors import MediaError
from vidcap.media import Probe, fit_size, frame_count


def probe(duration: float, w: int = 1280, h: int = 720, fps: float = 30.0) -> Probe:
    return Probe(
        duration_s=duration, fps=fps, frames=int(duration * fps), width=w, height=h, has_audio=True, vfr=False
    )


def test_fit_size_keeps_aspect_and_area() -> None:
    w, h = fit_size(1920, 1080, 640 * 360)
    assert w % 32 == 0 and h % 32 == 0
    assert w * h <= 640 * 360
    assert abs(w / h - 16 / 9) < 0.15
    assert fit_size(100, 60, 10**7) == (96, 64)


def test_frame_count_is_even_and_at_least_two() -> None:
    assert frame_count(0.1, 2.0) == 2
    assert frame_count(3.0, 2.0) == 6
    assert frame_count(3.2, 2.0) == 8


def test_short_video_is_one_request() -> None:
    plan = windows.plan_video(probe(8.0), limit=20000, fps=2.0, max_pixels=640 * 360, audio=True)
    assert not plan.windowed
    assert len(plan.windows) == 1
    assert plan.windows[0].end_s == 8.0
    assert plan.est_tokens <= 20000


@pytest.mark.parametrize("audio", [True, False])
@pytest.mark.parametrize("limit", [3000, 12000, 31000])
def test_long_video_windows_fit_overlap_and_cover(audio: bool, limit: int) -> None:
    duration = 600.0
    plan = windows.plan_video(probe(duration), limit=limit, fps=2.0, max_pixels=640 * 360, audio=audio)
    assert plan.windowed
    ws = plan.windows
    assert ws[0].start_s == 0.0 and ws[-1].end_s == duration
    for w in ws:
        assert w.est_tokens <= limit
        assert w.est_tokens == windows.media_tokens(
            w.end_s - w.start_s, plan.fps, plan.width, plan.height, audio
        )
        if audio:
            assert w.end_s - w.start_s <= windows.MAX_AUDIO_WINDOW_S + 1e-6
    for a, b in itertools.pairwise(ws):
        assert b.start_s < a.end_s, "neighbouring windows overlap"
        assert a.end_s - b.start_s <= plan.overlap_s + 2e-3


def test_forced_window_length() -> None:
    plan = windows.plan_video(
        probe(100.0), limit=30000, fps=1.0, max_pixels=320 * 180, audio=False, window=20
    )
    assert plan.window_s is not None and plan.window_s <= 20
    assert len(plan.windows) >= 5


def test_quality_drops_only_when_needed() -> None:
    # 4K frames at 2 fps do not fit 2 s in 600 tokens: pixels must drop, then fps.
    plan = windows.plan_video(
        probe(60.0, 3840, 2160), limit=600, fps=2.0, max_pixels=3840 * 2160, audio=False
    )
    assert plan.max_pixels < 3840 * 2160
    assert all(w.est_tokens <= 600 for w in plan.windows)
    roomy = windows.plan_video(probe(5.0), limit=30000, fps=2.0, max_pixels=640 * 360, audio=False)
    assert roomy.max_pixels == 640 * 360 and roomy.fps == 2.0


def test_impossible_budget_is_a_media_error() -> None:
    with pytest.raises(MediaError) as info:
        windows.plan_video(probe(60.0), limit=5, fps=2.0, max_pixels=640 * 360, audio=True)
    assert info.value.kind == "too_large"


def test_merge_groups_split_when_too_long() -> None:
    caps = ["x" * 300] * 10
    assert windows.merge_groups(caps, 10_000) == [list(range(10))]
    groups = windows.merge_groups(caps, 250)
    assert [i for g in groups for i in g] == list(range(10))
    assert len(groups) > 1
