"""Shards writing one output dir: the locks (real flock), one failure ledger per writer, run summaries
that are written as a run goes on, and what `vidcap report` and `vidcap sync` make of all that."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import videos
from standin.server import StandIn

from vidcap import captioner, report, sync
from vidcap.client import Endpoint
from vidcap.discovery import shard_of
from vidcap.errors import OutputLockedError
from vidcap.records import RunSummary
from vidcap.store import META, OutputDir

PIXELS = 160 * 128
PID = str(os.getpid())


# ---- locks --------------------------------------------------------------------------------------------


def refused(out: Path, shard: tuple[int, int] | None, match: str) -> None:
    """Taking the lock fails with a message that matches ``match`` (a regex)."""
    with pytest.raises(OutputLockedError, match=match), OutputDir(out).locked(shard):
        pytest.fail("the lock was taken")


def test_shards_of_one_n_hold_the_dir_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputDir(out).locked((0, 3)), OutputDir(out).locked((1, 3)), OutputDir(out).locked((2, 3)):
        for i in range(3):
            assert (out / META / f"lock.shard-{i}-of-3").read_text() == PID
    # all released: each can be taken again, and so can the whole dir
    with OutputDir(out).locked((1, 3)):
        pass
    with OutputDir(out).locked():
        assert (out / META / "lock").read_text() == PID


def test_the_same_shard_twice_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputDir(out).locked((1, 3)):
        refused(out, (1, 3), rf"shard 1/3 .*pid {PID}.*another --out")
        with OutputDir(out).locked((2, 3)):  # a refusal leaves nothing held behind
            pass
    with OutputDir(out).locked((1, 3)):
        pass


def test_unsharded_and_sharded_runs_exclude_each_other(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputDir(out).locked((0, 2)), OutputDir(out).locked((1, 2)):
        refused(out, None, rf"shards 0/2 \(pid {PID}\), 1/2 \(pid {PID}\).*another --out")
    with OutputDir(out).locked():
        refused(out, (1, 2), rf"unsharded vidcap run \(pid {PID}\).*shard 1/2.*another --out")
    with OutputDir(out).locked((1, 2)):
        pass
    with OutputDir(out).locked():
        pass


def test_shards_of_another_n_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputDir(out).locked((1, 2)):
        refused(out, (0, 3), rf"shard 1/2 \(pid {PID}\).*same N.*0/3.*another --out")
    # the lock files of the old N stay behind, but nobody holds them: a run of a new N goes ahead
    assert (out / META / "lock.shard-1-of-2").exists()
    with OutputDir(out).locked((0, 3)), OutputDir(out).locked((2, 3)):
        refused(out, (0, 2), r"shard [02]/3 .*same N")


def test_each_writer_appends_to_its_own_ledger(tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = OutputDir(out)
    with store.locked((2, 5)):
        assert store.failures_path == out / META / "failures.shard-2-of-5.jsonl"
    with store.locked():
        assert store.failures_path == out / META / "failures.jsonl"


# ---- report and sync ------------------------------------------------------------------------------------


def _record(out: Path, rel: str, where: Path | None = None) -> None:
    """A minimal caption record, as far as the report reads one."""
    path = (where or out) / (rel + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "schema": "vidcap.caption/1",
        "video": {"path": rel, "duration_s": 36.0},
        "model": "m",
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
        "timing": {"latency_s": 1.5},
        "params": {"audio": False},
        "finish_reason": "stop",
    }
    path.write_text(json.dumps(data))


def _ledger(out: Path, name: str, *items: dict[str, Any]) -> None:
    base = {"run_id": "r", "message": "m", "attempts": 1, "retryable": False}
    lines = [json.dumps({**base, **item}) for item in items]
    path = out / META / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_report_skips_rsync_partial_dirs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _record(out, "a.mp4")
    _record(out, "sub/b.mp4")
    # half-transferred copies that `vidcap sync` (rsync --partial-dir) leaves beside the real files
    _record(out, "c.mp4", where=out / ".vidcap-partial")
    _record(out, "d.mp4", where=out / "sub" / ".vidcap-partial")
    rep = report.build(out)
    assert rep.records == 2
    assert rep.models == {"m": 2}
    assert rep.video_hours == pytest.approx(0.02)


def test_report_reads_every_ledger_and_keeps_the_latest_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _record(out, "fixed.mp4")
    _ledger(
        out,
        "failures.jsonl",  # an unsharded run before the sharded ones
        {"ts": "2026-01-01T00:00:00.000+00:00", "path": "a.mp4", "error": "http_500"},
        {"ts": "2026-01-01T00:00:00.000+00:00", "path": "fixed.mp4", "error": "http_500"},
        {"ts": "2026-01-03T00:00:00.000+00:00", "path": "tie.mp4", "error": "old_file"},
    )
    _ledger(
        out,
        "failures.shard-0-of-2.jsonl",
        {"ts": "2026-01-02T00:00:00.000+00:00", "path": "a.mp4", "error": "corrupt"},
        {"ts": "2026-01-03T00:00:00.000+00:00", "path": "tie.mp4", "error": "later_file"},
    )
    _ledger(
        out,
        "failures.shard-1-of-2.jsonl",
        {"ts": "2026-01-02T00:00:00.000+00:00", "path": "b.mp4", "error": "http_400"},
        {"ts": "2026-01-05T00:00:00.000+00:00", "path": "b.mp4", "error": "empty"},
        {"ts": "2026-01-04T00:00:00.000+00:00", "path": "b.mp4", "error": "not_latest"},
    )
    with open(out / META / "failures.shard-1-of-2.jsonl", "a") as fh:
        fh.write('{"ts": "2026-01-06T00:00:00.000+00:00", "path": "b.m')  # a torn last line
    rep = report.build(out)
    by_path = {f["path"]: f["error"] for f in rep.failed_paths}
    assert by_path == {"a.mp4": "corrupt", "b.mp4": "empty", "tie.mp4": "later_file"}
    assert rep.failures == 3
    assert rep.failures_by_class == {"corrupt": 1, "empty": 1, "later_file": 1}


def _summary(run_id: str, finished: str | None, done: int, wall_s: float) -> str:
    data = {"run_id": run_id, "finished": finished, "counts": {"done": done}, "wall_s": wall_s}
    return json.dumps(data)


def test_report_counts_runs_still_going_but_not_in_throughput(tmp_path: Path) -> None:
    runs = tmp_path / "out" / META / "runs"
    runs.mkdir(parents=True)
    (runs / "20260101T000000.000000Z.json").write_text(_summary("1", "2026-01-01T00:10", 10, 5.0))
    (runs / "20260102T000000.000000Z-7_0.json").write_text(_summary("2", "2026-01-02T00:10", 20, 5.0))
    (runs / "20260103T000000.000000Z-8_0.json").write_text(_summary("3", None, 500, 1.0))  # going on
    rep = report.build(tmp_path / "out")
    assert rep.runs == 3
    assert rep.running_or_killed == 1
    assert rep.throughput_videos_per_s == 3.0  # (10 + 20) / (5 + 5): the unfinished run left out
    assert rep.last_run is not None and rep.last_run["run_id"] == "3"


def test_sync_leaves_every_lock_file_on_the_cluster(tmp_path: Path) -> None:
    """The filters of rsync_argv, given to the real rsync on a local copy."""
    argv = sync.rsync_argv("rsync", ["ssh"], "host", "/src", tmp_path / "dest")
    filters = [a for a in argv[: argv.index("--")] if a.startswith(("--exclude=", "--partial-dir="))]
    assert "--exclude=_vidcap/lock*" in filters
    src = tmp_path / "src" / "model"
    files = {
        "a.mp4.json": True,
        "_vidcap/runs/20260101T000000.000000Z-7_1.json": True,
        "_vidcap/failures.jsonl": True,
        "_vidcap/failures.shard-1-of-3.jsonl": True,
        "_vidcap/lock": False,
        "_vidcap/lock.shard-1-of-3": False,
        "_vidcap/lock.shard-12-of-20": False,
    }
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    dest = tmp_path / "dest"
    dest.mkdir()
    subprocess.run(["rsync", "-rlt", *filters, "--", f"{tmp_path / 'src'}/", f"{dest}/"], check=True)
    got = {str(p.relative_to(dest / "model")) for p in dest.rglob("*") if p.is_file()}
    assert got == {rel for rel, synced in files.items() if synced}


# ---- runs against the stand-in --------------------------------------------------------------------------


def make_job(corpus: videos.Corpus, out: Path, **kw: Any) -> captioner.CaptionJob:
    opts: dict[str, Any] = {
        "source": corpus.root,
        "out": out,
        "prompt": "Describe the video.",
        "max_pixels": PIXELS,
        "concurrency": 4,
        "retry_wait_max": 0.2,
        "max_attempts": 10,
        "server_wait": 30.0,
        "decode_workers": 1,
    }
    opts.update(kw)
    return captioner.CaptionJob(**opts)


def record_files(out: Path) -> list[str]:
    return sorted(
        str(p.relative_to(out))[: -len(".json")]
        for p in out.rglob("*.json")
        if META not in p.relative_to(out).parts
    )


async def _shards(corpus: videos.Corpus, out: Path, url: str, n: int) -> list[RunSummary]:
    endpoint = Endpoint(url + "/v1", None)
    jobs = [make_job(corpus, out, shard=(i, n), job_id=f"77_{i}") for i in range(n)]
    return list(await asyncio.gather(*(captioner.run(job, endpoint) for job in jobs)))


def test_concurrent_shards_write_one_out(corpus: videos.Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    good = {str(p) for p in corpus.good}
    bad = {str(p) for p in corpus.bad}  # corrupt, empty, text and garbage files named .mp4
    with StandIn(
        allowed_local_media_path=str(corpus.root), video_max_pixels=PIXELS, seed=7, latency=0.05
    ) as server:
        summaries = asyncio.run(_shards(corpus, out, server.url, 3))
        by_video = server.stats()["by_video"]
        # all three held the dir at once: each started before any of them had finished
        assert max(s.started for s in summaries) < min(s.finished or "" for s in summaries)
        # every good video exactly one record, and sent exactly once (plus each shard's audio check)
        assert record_files(out) == sorted(good)
        audio_checks = sum(s.audio_verified is not None for s in summaries)
        assert sum(by_video.values()) == len(good) + audio_checks
        assert sum(s.counts.done for s in summaries) == len(good)
        assert sum(s.counts.failed for s in summaries) == len(bad)
        runs = out / META / "runs"
        for i, s in enumerate(summaries):
            assert s.shard == f"{i}/3" and s.run_id.endswith(f"-77_{i}") and s.finished
            assert s.total == s.counts.seen > 0
            assert RunSummary.model_validate_json((runs / f"{s.run_id}.json").read_text()) == s
        assert sum(s.total or 0 for s in summaries) == len(good) + len(bad)
        # each failure is in the ledger of the shard that met it, and only there
        assert not (out / META / "failures.jsonl").exists()
        for i in range(3):
            lines = (out / META / f"failures.shard-{i}-of-3.jsonl").read_text().splitlines()
            assert sorted(json.loads(line)["path"] for line in lines) == sorted(
                b for b in bad if shard_of(b, 3) == i
            )
        # again: nothing good is redone, the bad ones fail again, and the report counts each once
        again = asyncio.run(_shards(corpus, out, server.url, 3))
    assert sum(s.counts.skipped for s in again) == len(good)
    assert sum(s.counts.failed for s in again) == len(bad)
    ledgers = out.glob(f"{META}/failures.shard-*-of-3.jsonl")
    assert sum(len(p.read_text().splitlines()) for p in ledgers) == 2 * len(bad)
    rep = report.build(out)
    assert rep.records == len(good)
    assert rep.failures == len(bad)
    assert {f["path"] for f in rep.failed_paths} == bad
    assert rep.runs == 6 and rep.running_or_killed == 0


def test_run_summary_is_written_while_the_run_goes_on(corpus: videos.Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    runs = out / META / "runs"
    seen: list[RunSummary] = []
    result: list[RunSummary] = []
    job = make_job(corpus, out, extensions=(".mov",), concurrency=1, progress_interval=0.2, job_id="123_4")
    with StandIn(
        allowed_local_media_path=str(corpus.root), video_max_pixels=PIXELS, latency=0.3, slots=1
    ) as server:
        endpoint = Endpoint(server.url + "/v1", None)
        thread = threading.Thread(target=lambda: result.append(asyncio.run(captioner.run(job, endpoint))))
        thread.start()
        while thread.is_alive():
            for path in runs.glob("*.json") if runs.is_dir() else []:
                # an atomic write: whole or not there, never a part
                seen.append(RunSummary.model_validate_json(path.read_text()))
            time.sleep(0.05)
        thread.join()
    (summary,) = result
    during = [s for s in seen if s.finished is None]
    assert len(during) >= 3
    assert during[0].counts.done == 0 and during[0].run_id == summary.run_id
    done = [s.counts.done for s in during]
    assert done == sorted(done) and len(set(done)) >= 2  # the file follows the run
    assert any(s.total == summary.total for s in during)
    assert all(s.exit_code is None for s in during)
    assert summary.finished is not None and summary.exit_code == 0
    assert summary.counts.done == summary.total == 4  # the .mov files, the linked one too
    (path,) = runs.glob("*.json")
    assert path.name == f"{summary.run_id}.json" and summary.run_id.endswith("-123_4")
    assert RunSummary.model_validate_json(path.read_text()) == summary


def test_progress_interval_0_writes_at_start_and_end_only(corpus: videos.Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = make_job(corpus, out, extensions=(".mov",), concurrency=1, progress_interval=0)
    writes: list[str] = []
    with StandIn(
        allowed_local_media_path=str(corpus.root), video_max_pixels=PIXELS, latency=0.3, slots=1
    ) as server:

        def sink(event: captioner.Event) -> None:
            if event.kind == "done":  # what is on disk while the run goes on
                writes.extend(p.read_text() for p in (out / META / "runs").glob("*.json"))

        summary = asyncio.run(captioner.run(job, Endpoint(server.url + "/v1", None), sink))
    assert len(writes) == 4
    assert {RunSummary.model_validate_json(w).counts.done for w in writes} == {0}  # the start write
    assert summary.counts.done == 4 and summary.run_id[:8].isdigit() and "-" not in summary.run_id


def test_run_ids_carry_the_job_id() -> None:
    assert captioner.make_run_id("123").endswith("Z-123")
    assert captioner.make_run_id("123_4").endswith("Z-123_4")
    assert captioner.make_run_id("local-20261124-101010-ab12").endswith("Z-local-20261124-101010-ab12")
    assert captioner.make_run_id("a/b c").endswith("Z-a_b_c")  # never a path separator in a file name
    assert captioner.make_run_id(None).endswith("Z")


def test_an_unsharded_run_is_refused_while_shards_run(corpus: videos.Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with StandIn(allowed_local_media_path=str(corpus.root), video_max_pixels=PIXELS) as server:
        endpoint = Endpoint(server.url + "/v1", None)
        with OutputDir(out).locked((0, 2)):
            with pytest.raises(OutputLockedError, match="shards 0/2"):
                asyncio.run(captioner.run(make_job(corpus, out), endpoint))
            with pytest.raises(OutputLockedError, match="same N"):
                asyncio.run(captioner.run(make_job(corpus, out, shard=(1, 3)), endpoint))
            summary = asyncio.run(captioner.run(make_job(corpus, out, shard=(1, 2)), endpoint))
    assert summary.shard == "1/2" and summary.counts.done > 0
    (only,) = (out / META / "runs").glob("*.json")  # the refused runs wrote no summary
    assert only.name == f"{summary.run_id}.json"


def test_throughput_counts_shards_side_by_side_once(tmp_path: Path) -> None:
    runs = tmp_path / "out" / META / "runs"
    runs.mkdir(parents=True)
    # three shards over the same 10 minutes, 100 videos each: 300 videos in 600 s, not in 1800 s
    for i in range(3):
        summary = _summary(f"s{i}", "2026-01-01T00:10:00+00:00", 100, 600.0)
        (runs / f"20260101T000000.000000Z-9_{i}.json").write_text(summary)
    assert report.build(tmp_path / "out").throughput_videos_per_s == 0.5
    assert report.busy_seconds([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25


def test_lock_wait_takes_over_when_the_holder_lets_go(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = OutputDir(out)
    released = threading.Event()

    def hold() -> None:
        with holder.locked((1, 3)):
            time.sleep(0.6)
        released.set()

    t = threading.Thread(target=hold)
    t.start()
    time.sleep(0.1)
    with pytest.raises(OutputLockedError, match="shard 1/3"), OutputDir(out).locked((1, 3)):
        pass
    t0 = time.monotonic()
    with OutputDir(out).locked((1, 3), wait=10.0):
        assert released.is_set()
    assert time.monotonic() - t0 < 5
    t.join()
