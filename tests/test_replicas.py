"""One run over several model-server replicas (client.Pool): work is spread, a replica that goes away or
is dropped hands its requests to the others, a replica that cannot serve is left out at the start."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import videos
from standin.server import StandIn

from vidcap import captioner, chat
from vidcap.client import Endpoint, Pool
from vidcap.config import SamplingConfig
from vidcap.errors import ServerUnreachableError
from vidcap.records import CaptionRecord, RunSummary

VIDCAP = str(Path(sys.executable).parent / "vidcap")
PIXELS = 160 * 128


@contextmanager
def standins(corpus: videos.Corpus, n: int, **kw: Any) -> Iterator[list[StandIn]]:
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                StandIn(allowed_local_media_path=str(corpus.root), video_max_pixels=PIXELS, **kw)
            )
            for _ in range(n)
        ]


def make_job(corpus: videos.Corpus, out: Path, **kw: Any) -> captioner.CaptionJob:
    opts: dict[str, Any] = {
        "source": corpus.root,
        "out": out,
        "prompt": "Describe the video.",
        "max_pixels": PIXELS,
        "concurrency": 2,
        "retry_wait_max": 0.2,
        "max_attempts": 10,
        "server_wait": 30.0,
        "decode_workers": 2,
        "progress_interval": 0,
    }
    opts.update(kw)
    return captioner.CaptionJob(**opts)


def run(job: captioner.CaptionJob, servers: list[StandIn]) -> tuple[RunSummary, list[captioner.Event]]:
    events: list[captioner.Event] = []
    endpoints = [Endpoint(s.url + "/v1") for s in servers]
    return asyncio.run(captioner.run(job, endpoints, events.append)), events


def records(out: Path) -> dict[str, CaptionRecord]:
    found = {}
    for path in out.rglob("*.json"):
        if "_vidcap" not in path.relative_to(out).parts:
            rec = CaptionRecord.model_validate_json(path.read_text(encoding="utf-8"))
            found[rec.video.path] = rec
    return found


def failures(out: Path) -> dict[str, dict[str, Any]]:
    path = out / "_vidcap" / "failures.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return {json.loads(line)["path"]: json.loads(line) for line in lines}


def good(corpus: videos.Corpus) -> set[str]:
    return {str(p) for p in corpus.good}


def bad(corpus: videos.Corpus) -> set[str]:
    return {str(p) for p in corpus.bad}


def completed(server: StandIn) -> int:
    return int(server.stats()["completed"])


def warnings(events: list[captioner.Event]) -> list[str]:
    return [e.message for e in events if e.kind == "warning"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_three_replicas_share_the_work_and_finish_sooner(corpus: videos.Corpus, tmp_path: Path) -> None:
    # Capacity is the stand-ins' slots: 2 at a time, 0.4 s each; --concurrency 2 per replica.
    with standins(corpus, 1, latency=0.4, slots=2) as servers:
        one, _ = run(make_job(corpus, tmp_path / "one"), servers)
    assert one.counts.done == len(good(corpus))
    with standins(corpus, 3, latency=0.4, slots=2) as servers:
        summary, events = run(make_job(corpus, tmp_path / "three"), servers)
        stats = [s.stats() for s in servers]
    out = tmp_path / "three"
    recs = records(out)
    assert set(recs) == good(corpus) and set(failures(out)) == bad(corpus)
    assert summary.exit_code == 1 and summary.counts.done == len(good(corpus))
    # every good video captioned once (plus the one audio check), each replica got its share
    assert sum(sum(st["by_video"].values()) for st in stats) == len(good(corpus)) + 1
    total = sum(st["completed"] for st in stats)
    assert all(st["completed"] >= total / 6 for st in stats), [st["completed"] for st in stats]
    assert all(st["max_in_flight"] <= 2 for st in stats)
    # each record names the replica that answered its request
    urls = [s.url + "/v1" for s in servers]
    assert {rec.server.url for rec in recs.values()} == set(urls)
    for rel, rec in recs.items():
        if Path(rel) not in corpus.symlinks:
            assert str(corpus.root / rel) in stats[urls.index(rec.server.url)]["by_video"], rel
    assert summary.server.url == urls[0]
    assert summary.audio_verified is True
    # the same work, clearly sooner: in theory a third of the time; loosely below 0.7
    assert summary.wall_s < 0.7 * one.wall_s, (summary.wall_s, one.wall_s)
    # the resume key does not depend on the replicas: the one-replica records are up to date here
    assert summary.config_hash == one.config_hash
    assert any("3 replicas" in e.message for e in events if e.kind == "start")


def test_replica_gone_mid_run_hands_its_requests_to_the_others(corpus: videos.Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    server_wait = 30.0  # were a request to wait for the gone replica, the run would take this long
    with standins(corpus, 3, latency=0.4, slots=2) as servers:

        def stop_one() -> None:
            deadline = time.monotonic() + 60
            while completed(servers[1]) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            servers[1].pause()  # listening socket closed, requests in flight cut: the server is gone

        watcher = threading.Thread(target=stop_one, daemon=True)
        watcher.start()
        summary, _ = run(make_job(corpus, out, server_wait=server_wait), servers)
        watcher.join()
    # no video failed because of it; the bad files fail as usual
    assert set(records(out)) == good(corpus)
    assert set(failures(out)) == bad(corpus)
    assert summary.exit_code == 1 and not summary.aborted
    assert summary.counts.retried_requests >= 1
    assert summary.wall_s < server_wait / 2, summary.wall_s
    assert completed(servers[0]) > 0 and completed(servers[2]) > 0


def test_replica_serving_another_model_is_left_out(corpus: videos.Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with (
        StandIn(allowed_local_media_path=str(corpus.root), video_max_pixels=PIXELS) as right,
        StandIn(
            allowed_local_media_path=str(corpus.root), video_max_pixels=PIXELS, served_model_name="other"
        ) as wrong,
    ):
        summary, events = run(make_job(corpus, out), [right, wrong])
        assert wrong.stats()["requests"] == 0
    assert any("left out" in w and wrong.url in w and "does not serve" in w for w in warnings(events))
    assert summary.counts.done == len(good(corpus))
    assert {rec.server.url for rec in records(out).values()} == {right.url + "/v1"}


def test_replica_that_does_not_answer_at_start_is_left_out(corpus: videos.Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    gone = f"http://127.0.0.1:{closed_port()}/v1"
    with StandIn(allowed_local_media_path=str(corpus.root), video_max_pixels=PIXELS) as server:
        events: list[captioner.Event] = []
        job = make_job(corpus, out)
        endpoints = [Endpoint(gone), Endpoint(server.url + "/v1")]
        summary = asyncio.run(captioner.run(job, endpoints, events.append))
    assert any("left out" in w and gone in w for w in warnings(events))
    assert summary.counts.done == len(good(corpus)) and summary.server.url == server.url + "/v1"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VIDCAP, *args], capture_output=True, text=True, timeout=300)


def test_cli_all_replicas_unreachable_exits_3(corpus: videos.Corpus, tmp_path: Path) -> None:
    urls = [f"http://127.0.0.1:{closed_port()}" for _ in range(2)]
    out = tmp_path / "out"
    res = _cli("caption", str(corpus.root), "--server", urls[0], "--server", urls[1], "--out", str(out))
    assert res.returncode == 3, res.stderr
    message = " ".join(res.stderr.split())
    assert "cannot reach any of the 2 model servers" in message
    assert all(u + "/v1" in message for u in urls)
    assert not out.exists()  # nothing written


def test_cli_repeated_server_spreads_the_run(corpus: videos.Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with standins(corpus, 2, latency=0.1, slots=2) as servers:
        argv = ["caption", str(corpus.root), "--out", str(out), "--json", "--concurrency", "2"]
        res = _cli(*argv, "--server", servers[0].url, "--server", servers[1].url + "/v1/")
        assert all(completed(s) > 0 for s in servers)
    assert res.returncode == 1, res.stderr
    summary = RunSummary.model_validate_json(res.stdout)
    assert summary.counts.done == len(good(corpus)) and summary.server.url == servers[0].url + "/v1"
    assert {rec.server.url for rec in records(out).values()} == {s.url + "/v1" for s in servers}


# -- the Pool on its own ------------------------------------------------------------------------------


def _body(model: str) -> dict[str, Any]:
    return chat.merge_request(model=model, prompt="Say something.", sampling=SamplingConfig())


async def served(pool: Pool, model: str, n: int) -> list[int]:
    """Send n requests at once; the replica that answered each."""
    return [r.replica for r in await asyncio.gather(*(pool.complete(_body(model)) for _ in range(n)))]


def _pool(servers: list[StandIn], dead: list[tuple[int, str]], server_wait: float = 30.0) -> Pool:
    return Pool.connect(
        [Endpoint(s.url + "/v1") for s in servers],
        slots=2,
        server_wait=server_wait,
        timeout=30.0,
        max_attempts=5,
        max_seconds=60.0,
        wait_max=0.2,
        on_dead=lambda i, why: dead.append((i, why)),
    )


def test_pool_drop_sends_nothing_more_there_and_retries_its_cut_requests(tmp_path: Path) -> None:
    with StandIn(latency=0.2) as a, StandIn(latency=0.2) as b:
        model = a.model

        async def main() -> tuple[list[int], list[int], list[int], list[tuple[int, str]]]:
            dead: list[tuple[int, str]] = []
            pool = _pool([a, b], dead)
            try:
                before = [
                    r.replica for r in await asyncio.gather(*(pool.complete(_body(model)) for _ in range(8)))
                ]
                # b's job ends: dropped while requests run there, then the server goes away under them
                await asyncio.to_thread(setattr, b, "latency", 5.0)
                pending = [asyncio.ensure_future(pool.complete(_body(model))) for _ in range(4)]
                await asyncio.sleep(0.3)
                assert pool.replicas[1].in_flight >= 1
                pool.drop(1, "job 42 ended")
                await asyncio.to_thread(b.pause)
                cut = [r.replica for r in await asyncio.gather(*pending)]
                after = [
                    r.replica for r in await asyncio.gather(*(pool.complete(_body(model)) for _ in range(6)))
                ]
                assert pool.live() == [0]
                pool.drop(0, "job 41 ended")
                with pytest.raises(ServerUnreachableError, match="no model server replica is left"):
                    await pool.complete(_body(model))
                return before, cut, after, dead
            finally:
                await pool.close()

        before, cut, after, dead = asyncio.run(main())
        assert b.stats()["cancelled"] >= 1  # requests were cut there, and none of them failed
    assert before.count(0) == before.count(1) == 4  # an idle pool alternates, a busy one evens out
    assert cut == [0, 0, 0, 0] and after == [0] * 6
    assert dead == [(1, "job 42 ended"), (0, "job 41 ended")]


def test_pool_replica_away_too_long_is_dead(tmp_path: Path) -> None:
    with StandIn() as a, StandIn() as b:
        model = a.model

        async def main() -> tuple[list[int], list[tuple[int, str]], int]:
            dead: list[tuple[int, str]] = []
            pool = _pool([a, b], dead, server_wait=1.0)
            try:
                await asyncio.to_thread(b.pause)
                # the first requests there fail over at once (b's /health fails, a is open)
                replies = await asyncio.gather(*(pool.complete(_body(model)) for _ in range(4)))
                assert not dead and pool.failovers >= 1
                await asyncio.sleep(2.5)  # b's gate gives up after server_wait
                replies += [await pool.complete(_body(model))]
                return [r.replica for r in replies], dead, pool.retried
            finally:
                await pool.close()

        served, dead, retried = asyncio.run(main())
    assert served == [0] * 5
    assert dead == [(1, "no answer for 1 s")]
    assert retried >= 1
