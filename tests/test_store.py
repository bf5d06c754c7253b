"""Discovery (streaming, sorted, loop-safe, shards) and the output store (lock, atomic writes, resume)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import videos

from vidcap import discovery
from vidcap.errors import OutputLockedError
from vidcap.store import OutputDir, atomic_write

EXTS = (".mp4", ".mkv", ".mov")


def test_walk_finds_exactly_the_videos(corpus: videos.Corpus) -> None:
    items = list(discovery.walk(corpus.root, EXTS))
    entries = [i for i in items if isinstance(i, discovery.Entry)]
    problems = [i for i in items if isinstance(i, discovery.Problem)]
    expected = sorted(str(p) for p in corpus.good + corpus.bad if p.suffix.lower() in EXTS)
    assert sorted(e.rel for e in entries) == expected
    assert [p.kind for p in problems] == ["symlink_loop"]
    assert not any(e.rel.endswith((".txt", ".json", ".jpg")) for e in entries)
    for e in entries:
        assert Path(e.path).is_file()
        assert e.size == os.stat(e.path).st_size


def test_walk_order_is_deterministic(corpus: videos.Corpus) -> None:
    first = [i.rel for i in discovery.walk(corpus.root, EXTS)]
    assert first == [i.rel for i in discovery.walk(corpus.root, EXTS)]


def test_shards_partition_the_videos(corpus: videos.Corpus) -> None:
    rels = [e.rel for e in discovery.walk(corpus.root, EXTS) if isinstance(e, discovery.Entry)]
    shards = [{r for r in rels if discovery.shard_of(r, 3) == i} for i in range(3)]
    assert set().union(*shards) == set(rels)
    assert sum(len(s) for s in shards) == len(rels)
    assert all(shards)


@pytest.mark.parametrize("bad", ["3/3", "-1/2", "x", "1/0", "1"])
def test_parse_shard_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        discovery.parse_shard(bad)


def test_broken_link_is_a_video_problem(tmp_path: Path) -> None:
    (tmp_path / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    items = list(discovery.walk(tmp_path, EXTS))
    assert len(items) == 1 and isinstance(items[0], discovery.Problem) and items[0].video


def test_non_utf8_name_is_a_clear_problem(tmp_path: Path) -> None:
    with open(os.fsencode(tmp_path) + b"/caf\xe9.mp4", "wb") as fh:
        fh.write(b"x")
    (items,) = list(discovery.walk(tmp_path, EXTS))
    assert isinstance(items, discovery.Problem) and items.kind == "bad_name" and items.video
    assert items.rel == "caf\\xe9.mp4"
    items.rel.encode("utf-8")


def test_non_utf8_broken_link_is_printable(tmp_path: Path) -> None:
    os.symlink(b"/nowhere", os.fsencode(tmp_path) + b"/gone\xff.mp4")
    (item,) = list(discovery.walk(tmp_path, EXTS))
    assert isinstance(item, discovery.Problem) and item.kind == "unreadable"
    item.rel.encode("utf-8")


def test_lock_excludes_a_second_writer(tmp_path: Path) -> None:
    store = OutputDir(tmp_path / "out")
    with (
        store.locked(),
        pytest.raises(OutputLockedError, match=str(os.getpid())),
        OutputDir(tmp_path / "out").locked(),
    ):
        pass
    with store.locked():
        pass


def test_atomic_write_replaces_leftover_temp(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    leftover = tmp_path / ".x.json.vidcap-tmp"
    leftover.write_text("partial")
    atomic_write(target, "whole\n")
    assert target.read_text() == "whole\n"
    assert not leftover.exists()


def test_is_done_checks_hash_size_and_mtime(tmp_path: Path) -> None:
    store = OutputDir(tmp_path)
    path = store.record_path("a/b.mp4")
    path.parent.mkdir(parents=True)
    path.write_text('{"config_hash": "h", "video": {"size": 10, "mtime": 5.0}}')
    assert store.is_done("a/b.mp4", 10, 5.0, "h")
    assert not store.is_done("a/b.mp4", 11, 5.0, "h")
    assert not store.is_done("a/b.mp4", 10, 6.0, "h")
    assert not store.is_done("a/b.mp4", 10, 5.0, "other")
    path.write_text('{"config_hash": "h", "vid')
    assert not store.is_done("a/b.mp4", 10, 5.0, "h")
