"""Probing and inline media against real files made with ffmpeg."""

from __future__ import annotations

import base64
import io
import wave
from pathlib import Path

import pytest
import videos
from PIL import Image

from vidcap import media
from vidcap.errors import MediaError


def test_probe_matches_ffprobe(corpus: videos.Corpus) -> None:
    for rel in corpus.good:
        path = corpus.root / rel
        p = media.probe(str(path))
        assert p.duration_s == pytest.approx(videos.probe_duration(path), abs=0.3), rel
        assert p.has_audio == (rel in corpus.with_audio), rel
        assert p.width > 0 and p.height > 0 and p.frames > 0


def test_probe_flags_vfr(corpus: videos.Corpus) -> None:
    for rel in corpus.vfr:
        assert media.probe(str(corpus.root / rel)).vfr
    assert not media.probe(str(corpus.root / "top.mp4")).vfr


@pytest.mark.parametrize(
    ("name", "kind"),
    [("bad/truncated.mp4", "corrupt"), ("bad/empty.mp4", "empty"), ("bad/text.mp4", "not_video")],
)
def test_bad_files_have_clear_kinds(corpus: videos.Corpus, name: str, kind: str) -> None:
    with pytest.raises(MediaError) as info:
        media.probe(str(corpus.root / name))
    assert info.value.kind == kind
    assert "\n" not in str(info.value)


def test_probe_without_audio_check(corpus: videos.Corpus) -> None:
    assert media.probe(str(corpus.root / "top.mp4"), audio=False).has_audio is None


def test_inline_frames_are_jpegs_at_the_model_size(corpus: videos.Corpus) -> None:
    path = str(corpus.root / "top.mp4")
    p = media.probe(path)
    got = media.encode_inline(path, p, 0.0, p.duration_s, 2.0, 64 * 64, with_audio=True)
    head, frames = got.video_url.split(",", 1)
    assert head == "data:video/jpeg;base64"
    parts = frames.split(",")
    assert len(parts) == got.num_frames == media.frame_count(p.duration_s, 2.0)
    img = Image.open(io.BytesIO(base64.b64decode(parts[0])))
    assert img.format == "JPEG" and img.size == (got.width, got.height)
    assert got.width * got.height <= 64 * 64 and got.width % 32 == 0
    assert got.audio_url is not None and got.audio_url.startswith("data:audio/wav;base64,")
    with wave.open(io.BytesIO(base64.b64decode(got.audio_url.split(",", 1)[1]))) as wav:
        assert wav.getframerate() == 16000 and wav.getnchannels() == 1
        assert wav.getnframes() / 16000 == pytest.approx(p.duration_s, abs=0.1)


def test_inline_window_audio_span(corpus: videos.Corpus) -> None:
    path = str(corpus.root / "top.mp4")
    url, seconds = media.encode_audio(path, 0.5, 1.5)
    assert url is not None and seconds == pytest.approx(1.0, abs=0.01)
    assert media.encode_audio(str(corpus.root / "one/a.mkv"), 0, 1) == (None, 0.0)


def test_garbage_in_the_middle_fails_to_decode(corpus: videos.Corpus) -> None:
    # decord's threaded decoder may already fail on the first frame (probe) or only later (frames)
    path = str(corpus.root / "bad/garbage middle.mp4")
    with pytest.raises(MediaError) as info:
        p = media.probe(path)
        media.encode_inline(path, p, 0.0, p.duration_s, 4.0, 64 * 64, with_audio=False)
    assert info.value.kind == "decode_failed"
    assert "\n" not in str(info.value)


def test_file_url_quotes_hostile_names(tmp_path: Path) -> None:
    url = media.file_url(tmp_path / "a b#c?d%e $(x).mp4")
    assert url.startswith("file:///")
    assert " " not in url and "#" not in url and "?" not in url
