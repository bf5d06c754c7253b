"""Probing and inline media against real files made with ffmpeg."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
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


def test_webm_frames_decode(tmp_path: Path) -> None:
    # decord's default frame threading fails on VP9 after the first few frames
    try:
        path = str(videos.make_video(tmp_path / "v.webm", duration=3.0))
    except videos.FixtureUnavailable as exc:
        pytest.skip(str(exc))
    p = media.probe(path)
    got = media.encode_inline(path, p, 0.0, p.duration_s, 4.0, 64 * 64, with_audio=True)
    assert got.num_frames == media.frame_count(p.duration_s, 4.0)
    assert got.audio_url is not None


def test_audio_spans_match_the_whole_track(corpus: videos.Corpus) -> None:
    path = str(corpus.root / "one/two/clip.mov")
    whole = media.audio_wav(path)
    assert whole is not None
    with wave.open(io.BytesIO(whole)) as wav:
        pcm = wav.readframes(wav.getnframes())
    # 0.5 s to 1.5 s at 16 kHz, 2 bytes a sample
    part = media.audio_wav(path, 0.5, 1.5)
    assert part is not None
    with wave.open(io.BytesIO(part)) as wav:
        assert wav.readframes(wav.getnframes()) == pcm[16000:48000]
    url, seconds = media.encode_audio(path, 0.5, 1.5)
    assert url is not None and base64.b64decode(url.split(",", 1)[1]) == part and seconds == 1.0
    assert media.audio_wav(path, 2.95, 3.0) is None  # under 0.1 s: nothing worth sending


def test_audio_is_decoded_once_per_file_version(
    corpus: videos.Corpus, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(media, "_audio_cache", type(media._audio_cache)())
    decoded: list[str] = []
    real = media._decode_audio

    def counting(path: str):  # type: ignore[no-untyped-def]
        decoded.append(path)
        return real(path)

    monkeypatch.setattr(media, "_decode_audio", counting)
    path = tmp_path / "a.mp4"
    path.write_bytes((corpus.root / "one/a.mp4").read_bytes())
    link = tmp_path / "link.mp4"
    link.symlink_to(path)
    assert media.probe(str(path)).has_audio
    for start in (0.0, 1.0, 2.0):
        assert media.encode_audio(str(path), start, start + 1.0)[0] is not None
    assert media.audio_wav(str(link)) is not None
    assert len(decoded) == 1  # probe, windows and a link to the same file share one decode

    os.utime(path, ns=(0, 0))  # a changed file (here: its mtime) is decoded again
    assert media.audio_wav(str(path)) is not None
    assert len(decoded) == 2

    # at most AUDIO_CACHE_ENTRIES tracks stay: the least recently used one goes
    others = [corpus.root / "top.mp4", corpus.root / "one/two/clip.mov"]
    for other in others:
        media.audio_wav(str(other))
    assert len(media._audio_cache) == media.AUDIO_CACHE_ENTRIES
    media.audio_wav(str(path))
    assert len(decoded) == 5

    # a track larger than the budget is decoded for every call rather than kept
    monkeypatch.setattr(media, "AUDIO_CACHE_BYTES", 1000)
    media._audio_cache.clear()
    media.audio_wav(str(path))
    media.audio_wav(str(path))
    assert len(decoded) == 7 and not media._audio_cache


def test_no_audio_is_not_an_error(corpus: videos.Corpus) -> None:
    path = str(corpus.root / "one/a.mkv")
    assert media.probe(path).has_audio is False
    assert media.audio_wav(path) is None
    assert media.audio_wav(str(corpus.root / "bad/text.mp4")) is None
    assert media.audio_wav(str(corpus.root / "missing.mp4")) is None


_ORPHAN_CHILD = """
import asyncio, sys
from multiprocessing import forkserver
from vidcap import media

async def main() -> None:
    pool = media.MediaPool(2)
    await asyncio.gather(*(pool.run(media.probe, sys.argv[1]) for _ in range(4)))
    pids = [*pool._pool._processes, forkserver._forkserver._forkserver_pid]
    print(" ".join(map(str, pids)), flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # gone between the open and the read (ESRCH), or an empty read
        return False
    return state != "Z"  # a zombie has exited; reaping it is up to whoever inherited it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_the_parent_is_killed(corpus: videos.Corpus) -> None:
    repo = Path(media.__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_ORPHAN_CHILD), str(corpus.root / "top.mp4")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) >= 2, line  # at least one worker and the forkserver
        assert all(_running(pid) for pid in pids)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.05)
    left = [pid for pid in pids if _running(pid)]
    for pid in left:  # do not leave them behind for the next test run
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after the parent was killed: {left}"
