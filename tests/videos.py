"""Real video fixtures for the tests, generated with ffmpeg (DESIGN.md §4 and §5).

Everything here shells out to ``ffmpeg``/``ffprobe`` with argv lists (never a shell), writes to a
temporary name in the destination directory and renames into place, so destination names may be as
hostile as the tests like (quotes, ``$(...)``, newlines, a leading dash, a colon, ...).

Output is deterministic: the same arguments give the same bytes (``+bitexact`` muxing and encoding,
one encoder thread, fixed tone and pattern, seeded garbage).

Main entry points:

* :func:`make_video` -- one small video (optionally without audio, variable frame rate, another
  container);
* :func:`make_corrupt`, :func:`make_zero_byte`, :func:`make_text_as_video`, :func:`make_garbage_mid`
  -- bad inputs with a video extension;
* :func:`build_corpus` -- a whole directory tree for the captioning pipeline tests, described by a
  :class:`Corpus`;
* :func:`has_audio_stream`, :func:`probe_duration` -- ffprobe-based cross-checks.

Note: the tests run as root, so ``chmod 000`` does not make a file unreadable; the corpus has no
"unreadable file" case for that reason.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CANARIES",
    "PATTERNS",
    "Corpus",
    "FfmpegError",
    "FixtureUnavailable",
    "VideoSpec",
    "build_corpus",
    "has_audio_stream",
    "make_corrupt",
    "make_garbage_mid",
    "make_text_as_video",
    "make_video",
    "make_zero_byte",
    "probe_duration",
]

FFMPEG = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"
FFPROBE = shutil.which("ffprobe") or "/usr/bin/ffprobe"

#: Test-pattern sources accepted by :func:`make_video` (besides ``"color:<name>"``).
PATTERNS = (
    "testsrc2",
    "testsrc",
    "smptebars",
    "smptehdbars",
    "rgbtestsrc",
    "yuvtestsrc",
    "pal75bars",
    "pal100bars",
)

#: Files that a shell injection through the hostile corpus names would create (in the current
#: directory of whatever ran the injected command). Tests should assert none of them appears.
CANARIES = ("pwned", "pwned_tick", "pwned_semi", "pwned_dir")

_AUDIO_RATE = 16000
_COLOR_RE = re.compile(r"^(#[0-9A-Fa-f]{6}|0x[0-9A-Fa-f]{6}|[A-Za-z]+)$")
_TIMEOUT = 300


class FfmpegError(RuntimeError):
    """ffmpeg or ffprobe failed; the message holds the command and the tail of its stderr."""


class FixtureUnavailable(RuntimeError):
    """The local ffmpeg lacks an encoder needed for the requested container (tests should skip)."""


@dataclass(frozen=True)
class _Container:
    muxer: str
    video: tuple[str, ...]
    audio: tuple[str, ...]
    video_encoder: str
    audio_encoder: str


_X264 = ("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-threads", "1")
_AAC = ("-c:a", "aac", "-b:a", "32k")
_VP9 = (
    "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "200k",
    "-pix_fmt", "yuv420p", "-threads", "1", "-row-mt", "0",
)  # fmt: skip
_OPUS = ("-c:a", "libopus", "-b:a", "32k")
_MPEG4 = ("-c:v", "mpeg4", "-q:v", "5", "-pix_fmt", "yuv420p", "-threads", "1")
_MP3 = ("-c:a", "libmp3lame", "-b:a", "32k")

_CONTAINERS: dict[str, _Container] = {
    "mp4": _Container("mp4", _X264, _AAC, "libx264", "aac"),
    "m4v": _Container("mp4", _X264, _AAC, "libx264", "aac"),
    "mov": _Container("mov", _X264, _AAC, "libx264", "aac"),
    "mkv": _Container("matroska", _X264, _AAC, "libx264", "aac"),
    "webm": _Container("webm", _VP9, _OPUS, "libvpx-vp9", "libopus"),
    "avi": _Container("avi", _MPEG4, _MP3, "mpeg4", "libmp3lame"),
}


@functools.cache
def _encoders() -> frozenset[str]:
    """Names of the encoders the local ffmpeg provides."""
    out = _run([FFMPEG, "-hide_banner", "-nostdin", "-encoders"]).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and len(parts[0]) == 6 and parts[0][0] in "VAS":
            names.add(parts[1])
    return frozenset(names)


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (no shell), return the completed process or raise :class:`FfmpegError`."""
    try:
        proc = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as exc:
        raise FixtureUnavailable(f"{argv[0]} not found") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise FfmpegError(f"{argv[0]} exited {proc.returncode}: {list(argv)!r}\n{tail}")
    return proc


def _file_url(path: Path) -> str:
    """An ffmpeg input/output name for ``path`` that can't be mistaken for an option or a protocol."""
    return "file:" + os.fspath(path.absolute())


def _tmp_beside(path: Path) -> Path:
    """A fresh hidden temporary file next to ``path`` (same filesystem, so renames are atomic)."""
    fd, name = tempfile.mkstemp(prefix=".videos-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _ffmpeg_to(path: Path, argv: Sequence[str]) -> Path:
    """Run ffmpeg ``argv`` + [a temporary output name beside ``path``], then rename it to ``path``."""
    tmp = _tmp_beside(path)
    try:
        _run([*argv, _file_url(tmp)])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _video_source(pattern: str, size: tuple[int, int], fps: float, duration: float) -> str:
    """The lavfi source description for ``pattern``."""
    common = f"size={size[0]}x{size[1]}:rate={fps:g}:duration={duration:g}"
    if pattern.startswith("color:"):
        colour = pattern.removeprefix("color:")
        if not _COLOR_RE.match(colour):
            raise ValueError(f"bad colour in pattern {pattern!r}")
        return f"color=c={colour}:{common}"
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; use one of {PATTERNS} or 'color:<name>'")
    return f"{pattern}={common}"


def _vfr_select(duration: float) -> str:
    """A ``select`` filter keeping every frame in the first and last thirds, every 3rd in the middle.

    Frame intervals are therefore 1/fps, then 3/fps (with one 2/fps step where the phase of ``n``
    meets a boundary), then 1/fps again; the last frame keeps the nominal 1/fps duration, so the
    stream still ends at ``duration``. For 3 s at 10 fps: 23 frames, decord's ``get_avg_fps()`` 7.67.
    """
    a, b = duration / 3, 2 * duration / 3
    return f"select='lt(t,{a:g})+gte(t,{b:g})+not(mod(n,3))'"


def make_video(
    path: Path,
    *,
    duration: float,
    size: tuple[int, int] = (160, 120),
    fps: float = 10,
    audio: bool = True,
    vfr: bool = False,
    container: str | None = None,
    tone_hz: int = 440,
    pattern: str = "testsrc2",
    tint: str | None = None,
) -> Path:
    """Generate a small test video at ``path`` and return ``path``.

    Args:
        path: destination; its parent must exist. Any file name is fine (it is written under a temporary
            name and renamed).
        duration: length in seconds.
        size: ``(width, height)``, both even (yuv420p).
        fps: nominal frame rate (the exact rate for constant-frame-rate videos).
        audio: add a mono 16 kHz sine tone of ``tone_hz`` (otherwise the file has no audio stream at all).
        vfr: make the frame rate really variable (see :func:`_vfr_select`): intervals from 1/fps to 3/fps
            (needs ffmpeg >= 5.1 for ``-fps_mode``).
        container: ``mp4``, ``m4v``, ``mov``, ``mkv``, ``webm`` or ``avi``; default: from the suffix of
            ``path``. Giving one that disagrees with the suffix makes a mislabelled (but valid) file.
            mp4/m4v/mov/mkv use H.264 + AAC, webm VP9 + Opus, avi MPEG-4 part 2 + MP3.
        tone_hz: sine frequency.
        pattern: a lavfi test source from :data:`PATTERNS` or ``"color:<name or #rrggbb>"``.
        tint: blend this colour (name or ``#rrggbb``) at 50 % over the whole picture, so that videos with
            the same pattern still have clearly different mean colours.

    Raises:
        FixtureUnavailable: the local ffmpeg lacks an encoder this container needs.
        FfmpegError: ffmpeg failed.
        ValueError: bad arguments.
    """
    path = Path(path)
    if duration <= 0 or fps <= 0:
        raise ValueError("duration and fps must be positive")
    width, height = size
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"size must be positive and even, got {size}")
    kind = (container or path.suffix.removeprefix(".")).lower()
    spec = _CONTAINERS.get(kind)
    if spec is None:
        raise ValueError(f"unknown container {kind!r} for {path!r}; use one of {sorted(_CONTAINERS)}")
    missing = [e for e in (spec.video_encoder, spec.audio_encoder if audio else None) if e]
    missing = [e for e in missing if e not in _encoders()]
    if missing:
        raise FixtureUnavailable(f"ffmpeg at {FFMPEG} lacks encoder(s) {missing} needed for {kind}")

    filters = [_video_source(pattern, size, fps, duration)]
    if tint is not None:
        if not _COLOR_RE.match(tint):
            raise ValueError(f"bad tint colour {tint!r}")
        filters.append(f"drawbox=x=0:y=0:w=iw:h=ih:color={tint}@0.5:t=fill")
    if vfr:
        filters.append(_vfr_select(duration))
    argv = [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", "-y"]
    argv += ["-f", "lavfi", "-i", ",".join(filters)]
    if audio:
        sine = f"sine=frequency={tone_hz}:sample_rate={_AUDIO_RATE}:duration={duration:g}"
        argv += ["-f", "lavfi", "-i", sine]
    argv += ["-map", "0:v"] + (["-map", "1:a", "-ac", "1"] if audio else [])
    argv += list(spec.video) + (list(spec.audio) if audio else [])
    if vfr:
        argv += ["-fps_mode", "vfr"]
    argv += ["-t", f"{duration:g}", "-fflags", "+bitexact", "-flags:v", "+bitexact"]
    if audio:
        argv += ["-flags:a", "+bitexact"]
    argv += ["-map_metadata", "-1", "-f", spec.muxer]
    return _ffmpeg_to(path, argv)


def _box_offsets(data: bytes) -> dict[bytes, int]:
    """Offsets of the top-level ISO-BMFF boxes of ``data`` (first occurrence of each type)."""
    offsets: dict[bytes, int] = {}
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if size == 1 and pos + 16 <= len(data):
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        elif size == 0:
            size = len(data) - pos
        if size < 8:
            break
        offsets.setdefault(kind, pos)
        pos += size
    return offsets


def make_corrupt(path: Path, source: Path, *, keep_bytes: int = 5000) -> Path:
    """Write the first ``keep_bytes`` bytes of the mp4/mov ``source`` to ``path`` (a truncated download).

    ``source`` must have its ``moov`` box after ``mdat`` (ffmpeg's default, i.e. no ``+faststart``) and
    be longer than ``keep_bytes``, so the copy has no ``moov`` at all and nothing can open it (decord:
    ``RuntimeError: Error reading <path>...``; ffmpeg logs "moov atom not found").
    """
    data = Path(source).read_bytes()
    boxes = _box_offsets(data)
    if b"mdat" not in boxes or b"moov" not in boxes:
        raise ValueError(f"{source} is not an mp4/mov with mdat and moov boxes")
    if boxes[b"moov"] < max(boxes[b"mdat"], keep_bytes):
        raise ValueError(f"{source}: moov at {boxes[b'moov']} would survive truncation to {keep_bytes} bytes")
    Path(path).write_bytes(data[:keep_bytes])
    return Path(path)


def make_zero_byte(path: Path) -> Path:
    """Create an empty file at ``path`` (e.g. ``empty.mp4``)."""
    Path(path).write_bytes(b"")
    return Path(path)


def make_text_as_video(path: Path) -> Path:
    """Write a small plain-text file at ``path`` (meant to be named like a video, e.g. ``notes.mp4``)."""
    text = "This is not a video.\nIt is a text file with a video extension.\n"
    Path(path).write_text(text, encoding="utf-8")
    return Path(path)


def make_garbage_mid(path: Path, source: Path, *, seed: int = 0) -> Path:
    """Copy the mp4/mov ``source`` to ``path`` with (seeded) random bytes over part of its media data.

    The bytes from 25 % to 50 % of the ``mdat`` payload are overwritten; the header (``ftyp``) and the
    index (``moov``) stay intact. What decord 0.6/decord2 3.4 does with the result (for a short H.264
    source made by :func:`make_video`, whose single GOP spans the whole clip):

    * ``VideoReader(path)`` opens it and reports the original frame count;
    * frames before the garbage decode; every frame from there to the next keyframe (for short clips,
      the end) raises ``decord._ffi.base.DECORDError`` ("... Check failed: avcodec_send_packet(...) >= 0
      ... Thread worker: Error sending packet."), so any sampler that reaches the end fails;
    * ``AudioReader(path)`` does *not* raise: it silently returns only the audio decoded before the
      garbage (shorter than the container duration).
    """
    data = bytearray(Path(source).read_bytes())
    boxes = _box_offsets(bytes(data))
    if b"mdat" not in boxes:
        raise ValueError(f"{source} has no mdat box")
    start = boxes[b"mdat"] + 8
    end = boxes[b"moov"] if boxes.get(b"moov", 0) > start else len(data)
    lo, hi = start + (end - start) // 4, start + (end - start) // 2
    rng = random.Random(seed)
    data[lo:hi] = rng.randbytes(hi - lo)
    Path(path).write_bytes(bytes(data))
    return Path(path)


def _ffprobe(path: Path) -> dict[str, object]:
    out = _run(
        [FFPROBE, "-v", "error", "-show_format", "-show_streams", "-of", "json", _file_url(Path(path))]
    ).stdout
    result: dict[str, object] = json.loads(out)
    return result


def has_audio_stream(path: Path) -> bool:
    """Whether ffprobe sees at least one audio stream in ``path``."""
    streams = _ffprobe(path).get("streams") or []
    assert isinstance(streams, list)
    return any(s.get("codec_type") == "audio" for s in streams)


def probe_duration(path: Path) -> float:
    """Duration of ``path`` in seconds per ffprobe (container duration, else the longest stream)."""
    info = _ffprobe(path)
    fmt = info.get("format") or {}
    assert isinstance(fmt, dict)
    if fmt.get("duration") not in (None, "N/A"):
        return float(fmt["duration"])
    streams = info.get("streams") or []
    assert isinstance(streams, list)
    durations = [float(s["duration"]) for s in streams if s.get("duration") not in (None, "N/A")]
    if not durations:
        raise FfmpegError(f"ffprobe reports no duration for {path!r}")
    return max(durations)


# --------------------------------------------------------------------------------------------------
# The corpus


@dataclass(frozen=True)
class VideoSpec:
    """What a generated good video is (the arguments given to :func:`make_video`)."""

    duration: float
    size: tuple[int, int] = (160, 120)
    fps: float = 10
    audio: bool = True
    vfr: bool = False
    pattern: str = "testsrc2"
    tint: str | None = None
    tone_hz: int = 440


@dataclass(frozen=True)
class Corpus:
    """A generated directory tree; every path is relative to ``root``.

    * ``good``: every file the pipeline should caption, sorted. It includes the hostile names, the VFR
      video, the long video (if built) and the file symlink ``links/linked.mov`` (which points to
      ``one/two/clip.mov``; it counts as a good video *under its link path*, so that video is
      captioned twice, once per path).
    * ``bad``: files with a video extension that must each produce a clear one-line error: truncated
      mp4 (no moov), zero bytes, text named .mp4, garbage in the middle (opens, fails to decode).
    * ``ignored``: files without a video extension (.txt, .json, a real .jpg); never listed.
    * ``with_audio``: the subset of ``good`` that has an audio stream; the rest of ``good`` has none.
    * ``long``: the subset of ``good`` that is long (10 minutes; empty unless ``long=True``).
    * ``vfr``: the subset of ``good`` with a variable frame rate.
    * ``loops``: directory symlinks pointing to an ancestor (``one/two/loop -> ..``). The expected
      contract is that directory symlinks are not descended into (or at least that nothing is listed
      twice and the walk terminates); no path through a loop is in ``good``.
    * ``symlinks``: file symlinks, link path -> target path (both relative to ``root``).
    * ``specs``: for each good video path, how it was made (the symlink maps to its target's spec).
    """

    root: Path
    good: list[Path]
    bad: list[Path]
    ignored: list[Path]
    with_audio: set[Path]
    long: list[Path]
    vfr: list[Path]
    loops: list[Path] = field(default_factory=list)
    symlinks: dict[Path, Path] = field(default_factory=dict)
    specs: dict[Path, VideoSpec] = field(default_factory=dict)


_D = VideoSpec

#: Ordinary good videos: nested folders, three containers, with and without audio.
_PLAIN: dict[str, VideoSpec] = {
    "top.mp4": _D(2.0, pattern="testsrc2", tone_hz=440),
    "one/a.mp4": _D(3.0, pattern="testsrc2", tint="red", tone_hz=523),
    "one/a.mkv": _D(2.5, pattern="smptebars", audio=False),
    "one/two/clip.mov": _D(3.0, pattern="rgbtestsrc", tone_hz=659),
    "one/two/UPPER.MP4": _D(2.0, pattern="color:navy", audio=False),
    "one/two/three/deep.mp4": _D(2.0, size=(128, 96), pattern="testsrc", tint="green", audio=False),
    "one/two/three/four/deeper.mkv": _D(4.0, fps=8, pattern="pal75bars", tone_hz=880),
    "one/two/three/four/deeper.mov": _D(2.0, pattern="testsrc2", tint="blue", audio=False),
    "vfr/variable.mp4": _D(3.0, vfr=True, pattern="yuvtestsrc", tint="yellow", tone_hz=330),
}

#: Good videos with hostile names (each a different solid colour or tinted pattern).
_HOSTILE_NAMES: tuple[str, ...] = (
    "names/with space.mp4",
    "names/it's.mp4",
    'names/say "hi".mp4',
    "names/both 'single' and \"double\".mkv",
    "names/$(touch pwned).mp4",
    "names/`touch pwned_tick`.mp4",
    "names/semi;touch pwned_semi;.mp4",
    "names/café 動画.mp4",
    "names/emoji 🎬.mp4",
    "names/-rf.mp4",
    "names/new\nline.mp4",
    "names/back\\slash.mov",
    "names/glob [x]*?.mp4",
    "names/url #frag?q=1&x=%20 100%.mp4",
    "names/proto:colon.mp4",
    "names/dir with 'quote' $(touch pwned_dir)/inner.mp4",
)
_COLOURS = (
    "red", "green", "blue", "yellow", "cyan", "magenta", "orange", "purple",
    "white", "gray", "brown", "pink", "olive", "teal", "maroon", "lime",
)  # fmt: skip

_IGNORED_TEXT = {
    "notes.txt": "Not a video; ignored by extension.\n",
    "one/two/meta.json": '{"note": "not a video", "ignored": true}\n',
}
_JPEG = "one/thumb.jpg"
_LONG = "long/ten minutes.mp4"
_LONG_SPEC = _D(600.0, size=(64, 48), fps=2, pattern="testsrc2", tint="purple", tone_hz=220)
_LOOP = "one/two/loop"
_LINK = "links/linked.mov"
_LINK_TARGET = "one/two/clip.mov"
_BAD_TRUNCATED = "bad/truncated.mp4"
_BAD_EMPTY = "bad/empty.mp4"
_BAD_TEXT = "bad/text.mp4"
_BAD_GARBAGE = "bad/garbage middle.mp4"
_CORRUPT_SOURCE = "one/a.mp4"


def _hostile_specs() -> dict[str, VideoSpec]:
    specs = {}
    for i, name in enumerate(_HOSTILE_NAMES):
        colour = _COLOURS[i % len(_COLOURS)]
        specs[name] = _D(2.0, audio=i % 2 == 0, pattern=f"color:{colour}", tone_hz=300 + 50 * i)
    return specs


def _make_from_spec(path: Path, spec: VideoSpec) -> Path:
    return make_video(
        path,
        duration=spec.duration,
        size=spec.size,
        fps=spec.fps,
        audio=spec.audio,
        vfr=spec.vfr,
        tone_hz=spec.tone_hz,
        pattern=spec.pattern,
        tint=spec.tint,
    )


def _make_jpeg(path: Path) -> Path:
    return _ffmpeg_to(
        path,
        [
            FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", "smptebars=size=64x48:rate=1:duration=1",
            "-frames:v", "1", "-c:v", "mjpeg", "-pix_fmt", "yuvj420p",
            "-fflags", "+bitexact", "-flags:v", "+bitexact", "-f", "image2",
        ],
    )  # fmt: skip


def build_corpus(root: Path, *, long: bool = False, workers: int | None = None) -> Corpus:
    """Create the test corpus under ``root`` (created if needed; should be empty) and describe it.

    Takes about a second on two cores (plus about 1.5 s with ``long=True``, which adds the 10-minute
    64x48 2 fps video with audio ``long/ten minutes.mp4``). Deterministic: two builds give identical
    bytes. See :class:`Corpus` for the categories.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    specs: dict[str, VideoSpec] = {**_PLAIN, **_hostile_specs()}
    if long:
        specs[_LONG] = _LONG_SPEC
    for rel in [*specs, *_IGNORED_TEXT, _JPEG, _LINK, _BAD_TRUNCATED]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)

    jobs = sorted(specs.items(), key=lambda kv: -kv[1].duration)  # longest first
    with ThreadPoolExecutor(max_workers=workers or min(4, (os.cpu_count() or 2) + 1)) as pool:
        futures = [pool.submit(_make_from_spec, root / rel, spec) for rel, spec in jobs]
        futures.append(pool.submit(_make_jpeg, root / _JPEG))
        for fut in futures:
            fut.result()

    for rel, text in _IGNORED_TEXT.items():
        (root / rel).write_text(text, encoding="utf-8")
    make_corrupt(root / _BAD_TRUNCATED, root / _CORRUPT_SOURCE)
    make_zero_byte(root / _BAD_EMPTY)
    make_text_as_video(root / _BAD_TEXT)
    make_garbage_mid(root / _BAD_GARBAGE, root / _CORRUPT_SOURCE)
    (root / _LOOP).symlink_to("..", target_is_directory=True)
    (root / _LINK).symlink_to(os.path.relpath(root / _LINK_TARGET, (root / _LINK).parent))

    all_specs = {Path(rel): spec for rel, spec in specs.items()}
    all_specs[Path(_LINK)] = all_specs[Path(_LINK_TARGET)]
    good = sorted(all_specs)
    return Corpus(
        root=root,
        good=good,
        bad=sorted(Path(p) for p in (_BAD_TRUNCATED, _BAD_EMPTY, _BAD_TEXT, _BAD_GARBAGE)),
        ignored=sorted(Path(p) for p in (*_IGNORED_TEXT, _JPEG)),
        with_audio={p for p, s in all_specs.items() if s.audio},
        long=[Path(_LONG)] if long else [],
        vfr=sorted(p for p, s in all_specs.items() if s.vfr),
        loops=[Path(_LOOP)],
        symlinks={Path(_LINK): Path(_LINK_TARGET)},
        specs=all_specs,
    )
