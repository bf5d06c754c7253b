"""The captioning pipeline end to end against the vLLM stand-in, on real videos made with ffmpeg."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import videos
from standin.server import StandIn

from vidcap import captioner
from vidcap.client import Endpoint
from vidcap.config import SamplingConfig
from vidcap.errors import OutputLockedError, ServerError, ServerUnreachableError
from vidcap.records import CaptionRecord, RunSummary
from vidcap.store import OutputDir

VIDCAP = str(Path(sys.executable).parent / "vidcap")
PIXELS = 160 * 128


@pytest.fixture
def server(corpus: videos.Corpus) -> Any:
    with StandIn(allowed_local_media_path=str(corpus.root), video_max_pixels=PIXELS, seed=7) as s:
        yield s


def make_job(corpus: videos.Corpus, out: Path, **kw: Any) -> captioner.CaptionJob:
    opts: dict[str, Any] = {
        "source": corpus.root,
        "out": out,
        "prompt": "Describe the video.",
        "max_pixels": PIXELS,
        "concurrency": 8,
        "retry_wait_max": 0.2,
        "max_attempts": 10,
        "server_wait": 30.0,
        "decode_workers": 2,
    }
    opts.update(kw)
    return captioner.CaptionJob(**opts)


def run(job: captioner.CaptionJob, url: str, api_key: str | None = None) -> tuple[RunSummary, list[Any]]:
    events: list[Any] = []
    summary = asyncio.run(captioner.run(job, Endpoint(url + "/v1", api_key), events.append))
    return summary, events


def records(out: Path) -> dict[str, CaptionRecord]:
    found = {}
    for path in out.rglob("*.json"):
        if "_vidcap" in path.relative_to(out).parts:
            continue
        rec = CaptionRecord.model_validate_json(path.read_text(encoding="utf-8"))
        assert out / (rec.video.path + ".json") == path
        found[rec.video.path] = rec
    return found


def failures(out: Path) -> dict[str, dict[str, Any]]:
    lines = (out / "_vidcap" / "failures.jsonl").read_text(encoding="utf-8").splitlines()
    return {json.loads(line)["path"]: json.loads(line) for line in lines}


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".vidcap-tmp")]


def good(corpus: videos.Corpus) -> set[str]:
    return {str(p) for p in corpus.good}


def bad(corpus: videos.Corpus) -> set[str]:
    return {str(p) for p in corpus.bad}


def test_every_good_video_gets_a_record_and_every_bad_one_a_failure(
    corpus: videos.Corpus, server: Any, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    summary, events = run(make_job(corpus, out), server.url)
    recs = records(out)
    assert set(recs) == good(corpus)
    fails = failures(out)
    assert set(fails) == bad(corpus)
    assert fails["bad/empty.mp4"]["error"] == "empty"
    assert fails["bad/text.mp4"]["error"] == "not_video"
    assert fails["bad/truncated.mp4"]["error"] == "corrupt"
    # garbage mid-stream: the probe fails on frame 0, or the server (vLLM) cannot decode it
    assert fails["bad/garbage middle.mp4"]["error"] in ("decode_failed", "http_400")
    assert all("\n" not in f["message"] for f in fails.values())
    assert summary.exit_code == 1
    assert summary.counts.done == len(good(corpus)) and summary.counts.failed == len(bad(corpus))
    assert not temp_files(out)
    for rel, rec in recs.items():
        assert rec.caption.startswith("A "), rec.caption  # the stand-in describes what it decoded
        assert rec.video.has_audio == (Path(rel) in corpus.with_audio)
        assert rec.params.audio == rec.video.has_audio
        assert rec.finish_reason == "stop"
        assert rec.usage.prompt_tokens > 0
    # captions depend on the pixels: two different clips never get the same caption
    assert recs["one/a.mp4"].caption != recs["one/a.mkv"].caption
    assert any(e.kind == "warning" and "symlink loop" in e.message for e in events)
    assert summary.audio_verified is True
    # the symlink loop was not followed: one request per good video, plus the one audio check
    assert sum(server.stats()["by_video"].values()) == len(good(corpus)) + 1


def test_second_run_sends_nothing(corpus: videos.Corpus, server: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(make_job(corpus, out), server.url)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if "_vidcap" not in p.parts}
    server.reset_stats()
    summary, _ = run(make_job(corpus, out), server.url)
    # only failed videos are tried again (the one the server could not decode); none that are done
    assert set(server.stats()["by_video"]) <= {str(corpus.root / p) for p in bad(corpus)}
    assert server.stats()["requests"] <= 1
    assert summary.counts.skipped == len(good(corpus))
    assert summary.counts.done == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # a changed video (new mtime) is redone, and only it
    target = corpus.root / "top.mp4"
    os.utime(target, (time.time() + 5, time.time() + 5))
    server.reset_stats()
    summary, _ = run(make_job(corpus, out), server.url)
    assert summary.counts.done == 1
    assert set(server.stats()["by_video"]) == {str(target.resolve())}


def test_faults_are_retried_and_nothing_is_lost(corpus: videos.Corpus, server: Any, tmp_path: Path) -> None:
    # ~150 videos, so that 5% dropped connections surely happen (0.95**150 < 0.1%)
    for i in range(4):
        shutil.copytree(corpus.root / "names", corpus.root / f"copies {i}")
        shutil.copytree(corpus.root / "one", corpus.root / f"copies {i}" / "one", symlinks=True)
    expected_good = {
        str(p.relative_to(corpus.root))
        for p in corpus.root.rglob("*")
        if p.suffix in (".mp4", ".mkv", ".mov", ".MP4") and "bad" not in p.parts and "loop" not in p.parts
    }
    server.error_rate = 0.2
    server.drop_rate = 0.05
    out = tmp_path / "out"
    summary, _ = run(make_job(corpus, out, concurrency=16), server.url)
    stats = server.stats()
    assert stats["dropped"] > 0 and sum(stats["errors"].values()) > 0, stats
    assert set(records(out)) == expected_good
    assert set(failures(out)) == bad(corpus)
    assert summary.exit_code == 1
    assert summary.counts.retried_requests > 0
    assert not temp_files(out)
    assert any(r.timing.attempts > 1 for r in records(out).values())


def test_long_video_is_windowed_and_merged(corpus_template: videos.Corpus, tmp_path: Path) -> None:
    root = tmp_path / "long"
    root.mkdir()
    videos.make_video(root / "ten minutes.mp4", duration=600, size=(64, 48), fps=2, audio=True)
    out = tmp_path / "out"
    with StandIn(allowed_local_media_path=str(root), video_max_pixels=PIXELS, max_model_len=8192) as server:
        job = captioner.CaptionJob(
            source=root,
            out=out,
            prompt="Describe.",
            max_pixels=PIXELS,
            concurrency=8,
            decode_workers=2,
            sampling=SamplingConfig(max_tokens=512),
        )
        summary, _ = run(job, server.url)
        log = server.stats()
    assert summary.exit_code == 0, summary
    rec = records(out)["ten minutes.mp4"]
    assert rec.segments is not None and len(rec.segments) >= 20  # audio windows are <= 30 s
    assert rec.segments[0].start_s == 0 and rec.segments[-1].end_s == pytest.approx(600, abs=0.5)
    for a, b in zip(rec.segments, rec.segments[1:], strict=False):
        assert b.start_s < a.end_s
        assert b.end_s - b.start_s <= 30.0 + 1e-6
    assert all(s.usage.prompt_tokens + 512 <= 8192 for s in rec.segments)
    assert rec.caption.startswith("Merged")
    assert rec.params.window is not None and rec.params.media == "inline"
    assert log["completed"] >= len(rec.segments) + 1


def test_truncated_caption_is_a_failure(corpus: videos.Corpus, server: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = make_job(corpus, out, sampling=SamplingConfig(max_tokens=3), extensions=(".mov",))
    summary, _ = run(job, server.url)
    assert summary.counts.done == 0 and summary.exit_code == 1
    fails = failures(out)
    assert fails and all(f["error"] == "truncated" and not f["retryable"] for f in fails.values())
    assert not records(out)


def test_server_that_drops_audio_is_reported(corpus: videos.Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with StandIn(
        allowed_local_media_path=str(corpus.root), video_max_pixels=PIXELS, drop_audio=True
    ) as server:
        summary, events = run(make_job(corpus, out, extensions=(".mov",)), server.url)
    assert summary.audio_verified is False
    assert any(e.kind == "warning" and "DROPS AUDIO" in e.message for e in events)
    with_audio = [r for r in records(out).values() if r.params.audio]
    assert with_audio and all(r.params.audio_verified is False for r in with_audio)


def test_audio_off_sends_no_audio(corpus: videos.Corpus, server: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(make_job(corpus, out, audio="off", extensions=(".mov",)), server.url)
    recs = records(out)
    assert recs and all(not r.params.audio and r.video.has_audio is None for r in recs.values())
    assert all("sound" not in r.caption for r in recs.values())


def test_inline_media_mode(corpus: videos.Corpus, server: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary, _ = run(make_job(corpus, out, media="inline"), server.url)
    assert set(records(out)) == good(corpus)
    assert all(r.params.media == "inline" for r in records(out).values())
    assert all(k.startswith("inline:") for k in server.stats()["by_video"])
    # different media path, same config: a file-mode rerun finds everything done
    server.reset_stats()
    summary, _ = run(make_job(corpus, out, media="file"), server.url)
    assert summary.counts.skipped == len(good(corpus))
    assert server.stats()["requests"] <= 1  # only a failed one, tried again


def test_shards_and_limit(corpus: videos.Corpus, server: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done: set[str] = set()
    for i in range(3):
        summary, _ = run(make_job(corpus, out, shard=(i, 3)), server.url)
        now = set(records(out))
        assert not (now - done) & done
        done = now
    assert done == good(corpus)
    out2 = tmp_path / "out2"
    summary, _ = run(make_job(corpus, out2, limit=3), server.url)
    assert summary.counts.done + summary.counts.failed == 3


def test_unreachable_server_fails_before_writing(corpus: videos.Corpus, tmp_path: Path) -> None:
    with pytest.raises(ServerUnreachableError, match="cannot reach"):
        run(make_job(corpus, tmp_path / "out"), "http://127.0.0.1:9")
    assert not (tmp_path / "out").exists()


def test_wrong_api_key_and_model(corpus: videos.Corpus, tmp_path: Path) -> None:
    with StandIn(allowed_local_media_path=str(corpus.root), api_key="right") as server:
        with pytest.raises(ServerError, match="401"):
            run(make_job(corpus, tmp_path / "out"), server.url, api_key="wrong")
        with pytest.raises(ServerError, match="does not serve"):
            run(make_job(corpus, tmp_path / "out", model="other"), server.url, api_key="right")
        summary, _ = run(
            make_job(corpus, tmp_path / "out", extensions=(".mov",)), server.url, api_key="right"
        )
        assert summary.counts.done > 0


def test_server_away_mid_run_is_waited_for(corpus: videos.Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with StandIn(
        allowed_local_media_path=str(corpus.root), video_max_pixels=PIXELS, latency=0.2, slots=4
    ) as server:
        watcher = pause_after(server, out, 3, then=lambda: (time.sleep(2.5), server.resume()))
        summary, _ = run(make_job(corpus, out), server.url)
        watcher.join()
    assert set(records(out)) == good(corpus)
    assert set(failures(out)) == bad(corpus)
    assert summary.exit_code == 1


def wait_for_records(out: Path, count: int, timeout: float = 60) -> None:
    """Wait on progress, not a timer: start-up time varies from machine to machine."""
    deadline = time.time() + timeout
    while time.time() < deadline and len(records(out) if out.exists() else {}) < count:
        time.sleep(0.02)


def start_cli_until(
    corpus: videos.Corpus, server: Any, out: Path, *, concurrency: int, records_at_least: int, quiet: bool
) -> subprocess.Popen[str]:
    """`vidcap caption` in a child process, returned once it has written some records."""
    argv = [VIDCAP, "caption", str(corpus.root), "--server", server.url, "--out", str(out)]
    sink = subprocess.DEVNULL if quiet else subprocess.PIPE
    proc = subprocess.Popen([*argv, "--concurrency", str(concurrency)], stdout=sink, stderr=sink, text=True)
    wait_for_records(out, records_at_least)
    return proc


def pause_after(server: Any, out: Path, count: int, then: Any = None) -> threading.Thread:
    """Pause the server once ``count`` records exist."""

    def watch() -> None:
        wait_for_records(out, count)
        server.pause()
        if then is not None:
            then()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_server_gone_for_good_stops_with_exit_3(corpus: videos.Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with StandIn(
        allowed_local_media_path=str(corpus.root), video_max_pixels=PIXELS, latency=0.2, slots=2
    ) as server:
        watcher = pause_after(server, out, 3)
        summary, _ = run(make_job(corpus, out, server_wait=2.0), server.url)
        watcher.join()
    assert summary.exit_code == 3 and summary.aborted and "has not answered" in summary.aborted
    assert 3 <= summary.counts.done < len(good(corpus))
    assert summary.counts.done == len(records(out))
    assert not temp_files(out)
    assert len(list((out / "_vidcap" / "runs").glob("*.json"))) == 1


def test_output_lock(corpus: videos.Corpus, server: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputDir(out).locked(), pytest.raises(OutputLockedError):
        run(make_job(corpus, out), server.url)


def _cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VIDCAP, *args], capture_output=True, text=True, timeout=300, **kw)


def test_cli_caption_json_and_report(corpus: videos.Corpus, server: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _cli(
        "caption", str(corpus.root), "--server", server.url, "--out", str(out), "--json", "--concurrency", "8"
    )
    assert res.returncode == 1, res.stderr
    summary = json.loads(res.stdout)
    assert summary["counts"]["done"] == len(good(corpus))
    assert "bad/empty.mp4" in res.stderr and "empty file" in res.stderr
    rep = _cli("report", str(out), "--json")
    assert rep.returncode == 0, rep.stderr
    data = json.loads(rep.stdout)
    assert data["records"] == len(good(corpus))
    assert data["failures"] == len(bad(corpus))
    assert data["failures_by_class"]["empty"] == 1
    assert set(data["latency_s"]) >= {"p50", "p90", "p99"}
    human = _cli("report", str(out))
    assert human.returncode == 0 and "captions" in human.stdout


def test_cli_dry_run_sends_nothing(corpus: videos.Corpus, server: Any, tmp_path: Path) -> None:
    res = _cli(
        "caption",
        str(corpus.root),
        "--server",
        server.url,
        "--out",
        str(tmp_path / "o"),
        "--dry-run",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    planned = {r["path"] for r in rows if r.get("requests")}
    # the garbage-in-the-middle file may open (then the server rejects it later) or fail at frame 0
    assert good(corpus) <= planned <= good(corpus) | {"bad/garbage middle.mp4"}
    notes = {r["path"]: r["note"] for r in rows}
    assert notes["bad/empty.mp4"].startswith("empty")
    assert server.stats()["requests"] == 0

    # after a run, the plan calls its videos done: the server's model and context, which the config hash
    # covers, are asked of the server (GET /models), not guessed from the config
    out = str(tmp_path / "o")
    assert _cli("caption", str(corpus.root), "--server", server.url, "--out", out).returncode == 1
    sent = server.stats()["requests"]
    res = _cli("caption", str(corpus.root), "--server", server.url, "--out", out, "--dry-run", "--json")
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    notes = {r["path"]: r["note"] for r in json.loads(res.stdout)}
    assert {p for p, n in notes.items() if n.startswith("done")} == good(corpus)
    assert server.stats()["requests"] == sent
    # no server: planned with the configured values, and said so
    res = _cli("caption", str(corpus.root), "--server", "http://127.0.0.1:9/v1", "--out", out, "--dry-run")
    assert res.returncode == 0 and "planning with the configured model" in res.stderr


def test_cli_usage_errors_exit_2(corpus: videos.Corpus, tmp_path: Path) -> None:
    assert _cli("caption", str(tmp_path / "missing")).returncode == 2
    res = _cli("caption", str(corpus.root), "--media", "carrier-pigeon")
    assert res.returncode == 2 and "--media" in res.stderr
    assert _cli("caption", str(corpus.root), "--shard", "5/2").returncode == 2
    res = _cli("caption", str(corpus.root), "--server", "http://127.0.0.1:9/v1")
    assert res.returncode == 3 and "cannot reach" in res.stderr


def test_kill_9_then_rerun_completes_without_duplicates(corpus: videos.Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with StandIn(
        allowed_local_media_path=str(corpus.root), video_max_pixels=PIXELS, latency=0.4, slots=2
    ) as server:
        proc = start_cli_until(corpus, server, out, concurrency=2, records_at_least=4, quiet=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = set(records(out))
        assert 4 <= len(first) < len(good(corpus))
        server.reset_stats()
        server.latency = 0.0
        res = _cli("caption", str(corpus.root), "--server", server.url, "--out", str(out), "--json")
        asked = set(server.stats()["by_video"])
    assert res.returncode == 1, res.stderr
    assert set(records(out)) == good(corpus)
    assert json.loads(res.stdout)["counts"]["skipped"] == len(first)
    assert not any(str(corpus.root / rel) in asked for rel in first), "finished videos were re-sent"
    assert not temp_files(out)


def test_sigint_writes_summary_and_exits_130(corpus: videos.Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with StandIn(
        allowed_local_media_path=str(corpus.root), video_max_pixels=PIXELS, latency=0.5, slots=1
    ) as server:
        proc = start_cli_until(corpus, server, out, concurrency=1, records_at_least=2, quiet=False)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    runs = list((out / "_vidcap" / "runs").glob("*.json"))
    assert len(runs) == 1
    summary = RunSummary.model_validate_json(runs[0].read_text())
    assert summary.interrupted and summary.exit_code == 130
    assert summary.counts.done == len(records(out))
    assert not temp_files(out)
