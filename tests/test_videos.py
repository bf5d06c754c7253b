"""The video fixtures are what they claim to be (checked with decord and ffprobe)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import decord
import numpy as np
import pytest

try:  # tests/ on sys.path (rootdir-style "prepend" import, no tests/__init__.py)
    import videos as v
except ImportError:  # pragma: no cover - tests/ as a package
    from tests import videos as v  # type: ignore[no-redef]

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")

DURATION_TOL = 0.3

# Names written out as bytes by hand, independently of videos.py, to check them byte-for-byte.
HOSTILE_BYTES = {
    b"with space.mp4",
    b"it's.mp4",
    b'say "hi".mp4',
    b"both 'single' and \"double\".mkv",
    b"$(touch pwned).mp4",
    b"`touch pwned_tick`.mp4",
    b"semi;touch pwned_semi;.mp4",
    b"caf\xc3\xa9 \xe5\x8b\x95\xe7\x94\xbb.mp4",  # NFC "café 動画.mp4"
    b"emoji \xf0\x9f\x8e\xac.mp4",  # U+1F3AC CLAPPER BOARD
    b"-rf.mp4",
    b"new\nline.mp4",
    b"back\\slash.mov",
    b"glob [x]*?.mp4",
    b"url #frag?q=1&x=%20 100%.mp4",
    b"proto:colon.mp4",
    b"dir with 'quote' $(touch pwned_dir)",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> v.Corpus:
    root = tmp_path_factory.mktemp("corpus")
    start = time.monotonic()
    built = v.build_corpus(root, long=True)
    elapsed = time.monotonic() - start
    print(f"corpus (with the 10-minute video) built in {elapsed:.2f}s")
    assert elapsed < 60, f"corpus build took {elapsed:.1f}s"
    return built


def _reader(path: Path) -> decord.VideoReader:
    return decord.VideoReader(os.fspath(path))


def _timestamps(vr: decord.VideoReader) -> np.ndarray:
    """(n, 2) array of frame start/end times in seconds."""
    return np.asarray(vr.get_frame_timestamp(range(len(vr))))


def test_categories_are_consistent(corpus: v.Corpus) -> None:
    good, bad, ignored = set(corpus.good), set(corpus.bad), set(corpus.ignored)
    assert not good & bad and not good & ignored and not bad & ignored
    assert corpus.with_audio <= good
    assert set(corpus.long) <= good and set(corpus.vfr) <= good
    assert set(corpus.specs) == good
    assert good - corpus.with_audio, "some good videos must lack audio"
    assert len(corpus.vfr) == 1 and len(corpus.long) == 1
    for path in [*corpus.good, *corpus.bad, *corpus.ignored, *corpus.loops]:
        assert not path.is_absolute()
        assert (corpus.root / path).exists() or (corpus.root / path).is_symlink()
    suffixes = {p.suffix for p in corpus.good}
    assert {".mp4", ".mkv", ".mov"} <= suffixes
    assert max(len(p.parts) for p in corpus.good) >= 4, "need at least 3 levels of nesting"
    same_folder = [p for p in corpus.good if p.parent == Path("one") and p.stem == "a"]
    assert sorted(p.name for p in same_folder) == ["a.mkv", "a.mp4"]


def test_walk_without_following_dir_links_finds_exactly_the_corpus(corpus: v.Corpus) -> None:
    """The corpus description is complete: nothing on disk is unaccounted for."""
    found = set()
    dir_links = set()
    for dirpath, dirnames, filenames in os.walk(corpus.root):  # followlinks=False
        rel = Path(dirpath).relative_to(corpus.root)
        found |= {rel / f for f in filenames}
        dir_links |= {rel / d for d in dirnames if (Path(dirpath) / d).is_symlink()}
    assert found == set(corpus.good) | set(corpus.bad) | set(corpus.ignored)
    assert dir_links == set(corpus.loops)
    assert not [p for p in found if p.name.startswith(".videos-")], "temporary files left behind"


def test_good_videos_open_with_expected_duration_and_size(corpus: v.Corpus) -> None:
    problems = []
    for rel in corpus.good:
        spec = corpus.specs[rel]
        path = corpus.root / rel
        vr = _reader(path)
        height, width, channels = vr[0].shape
        if (width, height, channels) != (*spec.size, 3):
            problems.append(f"{rel!s:.60}: frame {width}x{height}x{channels}, want {spec.size}")
        end = float(_timestamps(vr)[-1, 1])
        if abs(end - spec.duration) > DURATION_TOL:
            problems.append(f"{rel!s:.60}: decord duration {end:.2f}, want {spec.duration}")
        probed = v.probe_duration(path)
        if abs(probed - spec.duration) > DURATION_TOL:
            problems.append(f"{rel!s:.60}: ffprobe duration {probed:.2f}, want {spec.duration}")
        if not spec.vfr and abs(vr.get_avg_fps() - spec.fps) > 0.01:
            problems.append(f"{rel!s:.60}: fps {vr.get_avg_fps()}, want {spec.fps}")
    assert not problems, "\n".join(problems)


def test_audio_present_exactly_where_claimed(corpus: v.Corpus) -> None:
    problems = []
    for rel in corpus.good:
        path = os.fspath(corpus.root / rel)
        claimed = rel in corpus.with_audio
        if v.has_audio_stream(corpus.root / rel) != claimed:
            problems.append(f"{rel!s:.60}: ffprobe audio != {claimed}")
        if claimed:
            ar = decord.AudioReader(path, sample_rate=16000, mono=True)
            if abs(ar.duration() - corpus.specs[rel].duration) > DURATION_TOL:
                problems.append(f"{rel!s:.60}: audio lasts {ar.duration():.2f}")
            if float(np.abs(ar[0 : min(ar.shape[1], 16000)].asnumpy()).max()) < 0.1:
                problems.append(f"{rel!s:.60}: audio is silent")
        else:
            with pytest.raises(decord.DECORDError, match="Can't find audio stream"):
                decord.AudioReader(path)
    assert not problems, "\n".join(problems)


def test_videos_look_different(corpus: v.Corpus) -> None:
    means = {}
    for rel in corpus.good:
        if rel in corpus.symlinks:
            continue
        vr = _reader(corpus.root / rel)
        means[rel] = vr[len(vr) // 2].asnumpy().reshape(-1, 3).mean(axis=0)
    rels = sorted(means)
    close = [
        (str(a), str(b))
        for i, a in enumerate(rels)
        for b in rels[i + 1 :]
        if np.abs(means[a] - means[b]).max() < 8
    ]
    assert not close, f"videos with nearly the same mean colour: {close}"


def test_vfr_video_has_varying_frame_intervals(corpus: v.Corpus) -> None:
    (rel,) = corpus.vfr
    vr = _reader(corpus.root / rel)
    intervals = np.round(np.diff(_timestamps(vr)[:, 0]), 3)
    # All frames in the first and last thirds, every 3rd frame of the source in the middle one.
    assert intervals.min() == pytest.approx(0.1) and intervals.max() == pytest.approx(0.3), intervals
    assert len(set(intervals.tolist())) >= 2
    # decord's "fps" for a VFR file is the average rate, not the nominal one.
    assert vr.get_avg_fps() < corpus.specs[rel].fps - 1
    # Constant-rate videos, for contrast, have a single interval.
    cfr = _reader(corpus.root / "top.mp4")
    assert len(set(np.round(np.diff(_timestamps(cfr)[:, 0]), 3).tolist())) == 1


def test_bad_files_fail_in_decord(corpus: v.Corpus) -> None:
    for rel in corpus.bad:
        path = os.fspath(corpus.root / rel)
        if rel.name.startswith("garbage"):
            vr = decord.VideoReader(path)  # opens: header and index are intact ...
            assert len(vr) == 30
            vr[0].asnumpy()  # ... the frames before the garbage decode ...
            with pytest.raises(decord.DECORDError, match="Error sending packet"):
                decord.VideoReader(path)[len(vr) - 1]  # ... the later ones do not.
        else:
            # decord 0.6 / decord2 3.4 raise a plain RuntimeError("Error reading <path>...") here.
            with pytest.raises(RuntimeError, match="Error reading"):
                decord.VideoReader(path)
    assert (corpus.root / "bad/empty.mp4").stat().st_size == 0
    assert (corpus.root / "bad/truncated.mp4").stat().st_size == 5000
    assert b"moov" not in (corpus.root / "bad/truncated.mp4").read_bytes()
    assert (corpus.root / "bad/text.mp4").read_text(encoding="utf-8").startswith("This is not a video")


def test_hostile_names_exist_byte_for_byte(corpus: v.Corpus) -> None:
    on_disk = set(os.listdir(os.fsencode(corpus.root / "names")))
    assert on_disk == HOSTILE_BYTES
    inner = os.listdir(os.fsencode(corpus.root / "names") + b"/dir with 'quote' $(touch pwned_dir)")
    assert inner == [b"inner.mp4"]
    assert Path("names/new\nline.mp4") in corpus.good
    assert Path("names/café 動画.mp4") in corpus.good


def test_no_injection_canary_was_created(corpus: v.Corpus) -> None:
    for where in (Path.cwd(), corpus.root, corpus.root / "names"):
        for canary in v.CANARIES:
            assert not (where / canary).exists(), where / canary


def test_symlinks(corpus: v.Corpus) -> None:
    (loop,) = corpus.loops
    link = corpus.root / loop
    assert link.is_symlink() and link.is_dir()
    assert os.readlink(link) == ".."
    assert link.resolve() == (corpus.root / loop).parent.parent.resolve()
    assert (link / "two" / "loop" / "two" / "loop" / "a.mp4").is_file()  # it really loops

    for rel, target in corpus.symlinks.items():
        path = corpus.root / rel
        assert path.is_symlink() and not os.path.isabs(os.readlink(path))
        assert path.resolve() == (corpus.root / target).resolve()
        assert rel in corpus.good and target in corpus.good
        assert len(_reader(path)) == len(_reader(corpus.root / target))


def test_ignored_files_are_not_videos_by_extension(corpus: v.Corpus) -> None:
    assert sorted(p.suffix for p in corpus.ignored) == [".jpg", ".json", ".txt"]
    jpg = next(p for p in corpus.ignored if p.suffix == ".jpg")
    assert (corpus.root / jpg).read_bytes()[:3] == b"\xff\xd8\xff"  # a real JPEG


def test_long_video_lasts_ten_minutes(corpus: v.Corpus) -> None:
    (rel,) = corpus.long
    path = corpus.root / rel
    vr = _reader(path)
    assert vr[0].shape == (48, 64, 3)
    assert len(vr) == 1200
    assert abs(float(_timestamps(vr)[-1, 1]) - 600) <= DURATION_TOL
    assert abs(v.probe_duration(path) - 600) <= DURATION_TOL
    assert rel in corpus.with_audio
    assert abs(decord.AudioReader(os.fspath(path), sample_rate=16000).duration() - 600) <= DURATION_TOL


def test_long_video_generates_quickly(tmp_path: Path) -> None:
    start = time.monotonic()
    v.make_video(tmp_path / "long.mp4", duration=600, size=(64, 48), fps=2)
    elapsed = time.monotonic() - start
    assert elapsed < 15, f"10-minute video took {elapsed:.1f}s"


def test_make_video_is_deterministic(tmp_path: Path) -> None:
    a = v.make_video(tmp_path / "a.mkv", duration=1, pattern="smptebars", tint="red")
    b = v.make_video(tmp_path / "b.mkv", duration=1, pattern="smptebars", tint="red")
    assert a.read_bytes() == b.read_bytes()


def test_make_video_hostile_path_and_forced_container(tmp_path: Path) -> None:
    path = tmp_path / "-i x:y $(touch pwned) 'q'.mp4"
    v.make_video(path, duration=1, container="mkv", audio=False)
    assert path.exists() and not (tmp_path / "pwned").exists()
    assert os.listdir(tmp_path) == [path.name]
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=format_name", "-of", "csv=p=0", f"file:{path}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "matroska" in out.stdout
    assert not v.has_audio_stream(path)


@pytest.mark.parametrize("container", ["webm", "avi"])
def test_other_containers(tmp_path: Path, container: str) -> None:
    path = tmp_path / f"clip.{container}"
    try:
        v.make_video(path, duration=2, fps=10, pattern="color:teal")
    except v.FixtureUnavailable as exc:
        pytest.skip(str(exc))
    vr = _reader(path)
    assert abs(float(_timestamps(vr)[-1, 1]) - 2) <= DURATION_TOL
    assert v.has_audio_stream(path)


def test_make_video_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        v.make_video(tmp_path / "x.mp4", duration=1, size=(161, 120))
    with pytest.raises(ValueError):
        v.make_video(tmp_path / "x.flv", duration=1)
    with pytest.raises(ValueError):
        v.make_video(tmp_path / "x.mp4", duration=1, pattern="color:red,drawtext")
    assert not os.listdir(tmp_path)


def test_make_corrupt_refuses_faststart_source(tmp_path: Path) -> None:
    src = v.make_video(tmp_path / "src.mp4", duration=2)
    fast = tmp_path / "fast.mp4"
    subprocess.run(
        [
            *("ffmpeg", "-nostdin", "-loglevel", "error", "-i", f"file:{src}", "-c", "copy"),
            *("-movflags", "+faststart", f"file:{fast}"),
        ],
        check=True,
    )
    with pytest.raises(ValueError, match="moov"):
        v.make_corrupt(tmp_path / "bad.mp4", fast)
    v.make_corrupt(tmp_path / "bad.mp4", src)
    with pytest.raises(RuntimeError):
        decord.VideoReader(os.fspath(tmp_path / "bad.mp4"))
