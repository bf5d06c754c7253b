"""Scale-out of replicas: one `vidcap caption DIR --server U1 ... --server UN` run spread over N bounded
stand-ins (client.Pool), against the same run with one --server.

Run from the repository root::

    .venv/bin/python tests/bench/bench_replicas.py [--quick] [--replicas N] [--json-out F]

The stand-ins, the videos and the CLI are bench_shards.py's (this script imports its helpers): each stand-in
is a latency-bound "GPU" (``--slots S --latency L --decode none``, capacity S/L requests/s whatever the 2
cores are doing), and vidcap is the real CLI (``.venv/bin/vidcap caption DIR --server URL ... --out OUT
--json --concurrency C --audio off --media file``) in its own process. ``--concurrency`` is per replica.

- baseline: the run against one stand-in: videos/s from its process start to its exit.
- replicas: the same run against N fresh stand-ins. The goal (DESIGN.md §6) is videos/s >= 0.9 x N x
  baseline.

Every run is checked, and the bench fails (exit 2, with the reason) unless each video has exactly one
record in OUT naming it, no stand-in was asked for a video twice and no two stand-ins for the same one,
every stand-in got a share of the requests (and each record names the stand-in that answered it), there
is no failure or retry, and the run left one finished run summary. See tests/bench/README.md for what
each row means and the latest results.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_shards
from bench_shards import (
    GOAL,
    BenchFailure,
    caption_argv,
    clips,
    common_args,
    copy_corpus,
    cpu_rows,
    iso_ts,
    log,
    rates,
    records_row,
    run_bench,
    run_processes,
    run_summaries,
    scan_records,
)
from benchtable import Row, ratio_row

bench_shards.LOG_NAME = "bench-replicas"


def check(phase: dict[str, Any], out: Path, source: Path, rels: list[str], tag: str) -> dict[str, Any]:
    """Raise BenchFailure unless the one run captioned every video exactly once, spread over all its
    stand-ins; returns what the checks counted (requests per stand-in, caption times)."""
    n = len(rels)
    records = scan_records(out, set(rels), tag)  # one per video, naming it; no temp file, no failure
    summaries = run_summaries(out)
    cli = phase["processes"][0]["summary"]
    if len(summaries) != 1 or summaries[0]["run_id"] != cli["run_id"] or summaries[0]["finished"] is None:
        raise BenchFailure(f"{tag}: {len(summaries)} run summaries, expected 1 finished: {cli['run_id']}")
    counts = summaries[0]["counts"]
    if (
        counts["done"] != n
        or counts["failed"]
        or counts["skipped"]
        or counts["retried_requests"]
        or counts["requests"] != n
    ):
        raise BenchFailure(f"{tag}: run summary counts {counts}, expected {n} done in {n} requests")
    # At the stand-ins: each video requested once, on one stand-in, and every stand-in got some.
    root = source.resolve()
    where: dict[str, list[int]] = {}
    for i, (st, by_video) in enumerate(zip(phase["servers"], phase["by_video"], strict=True)):
        if st["requests"] != st["completed"] or st["errors"] or st["dropped"] or st["cancelled"]:
            raise BenchFailure(
                f"{tag}: stand-in {i} got {st['requests']} requests, answered {st['completed']} "
                f"(errors {st['errors']}, dropped {st['dropped']}, cancelled {st['cancelled']})"
            )
        twice = [k for k, v in by_video.items() if v != 1]
        if twice or st["by_video_overflow"] or sum(by_video.values()) != st["completed"]:
            raise BenchFailure(
                f"{tag}: stand-in {i} was asked more than once for {twice[:5]} ({len(twice)} videos), or "
                f"answered {st['completed']} requests for {sum(by_video.values())} videos"
            )
        for key in by_video:
            where.setdefault(Path(key).resolve().relative_to(root).as_posix(), []).append(i)
    split = [st["completed"] for st in phase["servers"]]
    on_two = {rel: at for rel, at in where.items() if len(at) > 1}
    if on_two or set(where) != set(rels) or sum(split) != n:
        raise BenchFailure(
            f"{tag}: {len(on_two)} videos requested on two stand-ins (e.g. {list(on_two.items())[:3]}), "
            f"{len(set(rels) - set(where))} never requested; requests per stand-in {split}, {n} videos"
        )
    if not all(split):
        raise BenchFailure(f"{tag}: a stand-in got no request: split {split}")
    wrong = [rel for rel, data in records.items() if data["server"]["url"] != phase["urls"][where[rel][0]]]
    if wrong:
        raise BenchFailure(
            f"{tag}: {len(wrong)} records name another stand-in than the one that answered, e.g. "
            f"{wrong[0]}: {records[wrong[0]]['server']['url']} for {phase['urls'][where[wrong[0]][0]]}"
        )
    finished = [iso_ts(data["timing"]["finished"]) for data in records.values()]
    return {
        "records": len(records),
        "split": split,
        "run_span_s": iso_ts(summaries[0]["finished"]) - iso_ts(summaries[0]["started"]),
        "caption_span_s": max(finished) - min(finished),
    }


def measure(
    cfg: argparse.Namespace, tmp: Path, source: Path, rels: list[str], replicas: int, tag: str
) -> dict[str, Any]:
    out = tmp / f"out-{tag}"
    phase = run_processes(
        cfg, tmp, source, replicas, lambda urls: [caption_argv(cfg, source, urls, out)], tag
    )
    phase.update(check(phase, out, source, rels, tag))
    del phase["by_video"]
    proc, servers = phase["processes"][0], phase["servers"]
    phase["startup_s"] = min(st["first_request_ts"] for st in servers) - proc["started_wall"]
    phase["tail_s"] = proc["started_wall"] + proc["wall_s"] - max(st["last_response_ts"] for st in servers)
    rates(phase, cfg, tag)
    log(
        f"    requests per stand-in {phase['split']}, at most {[st['max_in_flight'] for st in servers]} in "
        f"flight; exec to first request {phase['startup_s']:.2f} s, last response to exit "
        f"{phase['tail_s']:.2f} s"
    )
    shutil.rmtree(out, ignore_errors=True)
    return phase


def bench(cfg: argparse.Namespace, tmp: Path) -> tuple[list[Row], dict[str, Any]]:
    n, k, reps = cfg.videos, cfg.replicas, cfg.reps
    sources = clips(cfg.cache_dir, "small", 4, duration=2.0, size=(160, 120), fps=10)
    source = copy_corpus(sources, tmp / "videos", n)
    rels = sorted(p.relative_to(source).as_posix() for p in source.rglob("*.mp4"))
    capacity = cfg.slots / cfg.latency
    log(
        f"{n} videos (2 s, 160x120); {k} replicas; every stand-in {cfg.slots} slots x {cfg.latency} s "
        f"= {capacity:.0f} req/s; vidcap --concurrency {cfg.concurrency} (per replica); best of {reps}"
    )
    runs: dict[str, list[dict[str, Any]]] = {"single": [], "replicas": []}
    for rep in range(reps):
        runs["single"].append(measure(cfg, tmp, source, rels, 1, f"1-replica-rep{rep}"))
        runs["replicas"].append(measure(cfg, tmp, source, rels, k, f"{k}-replicas-rep{rep}"))
    one, many = (max(runs[key], key=lambda r: r["videos_s"]) for key in runs)
    rows = [
        ratio_row(f"videos/s: {k} replicas vs {k} x 1 replica", many["videos_s"], k * one["videos_s"], GOAL),
        ratio_row("  1 replica vs the stand-in's S/L", one["videos_s"], capacity),
        ratio_row(f"  {k} replicas vs {k} x S/L", many["videos_s"], k * capacity),
        ratio_row(
            "  run summary's span (no process start-up)",
            many["videos_s_run_spans"],
            k * one["videos_s_run_spans"],
        ),
        ratio_row("  first to last caption (steady)", many["videos_s_steady"], k * one["videos_s_steady"]),
        ratio_row("  exec to first request, s", many["startup_s"], one["startup_s"], digits=2),
        ratio_row("  last response to exit, s", many["tail_s"], one["tail_s"], digits=2),
        records_row(n, many, one),
        Row(
            "requests per stand-in",
            "/".join(map(str, many["split"])),
            str(one["split"][0]),
            "",
            "all > 0",
            True,  # check() raised otherwise, or when a video was requested twice
            {"vidcap": many["split"], "baseline": one["split"]},
        ),
        ratio_row(
            "GPU busy share (mean over stand-ins)",
            100 * sum(many["busy_share"]) / k,
            100 * one["busy_share"][0],
            unit="%",
        ),
        *(
            ratio_row(f"  stand-in {i}", 100 * share, 100 * one["busy_share"][0], unit="%")
            for i, share in enumerate(many["busy_share"])
        ),
        *cpu_rows(many, one, "vidcap event loop, share of a core"),
    ]
    details = {
        "videos": n,
        "replicas": k,
        "slots": cfg.slots,
        "latency": cfg.latency,
        "concurrency": cfg.concurrency,
        "capacity_per_server": capacity,
        "runs": runs,
    }
    return rows, details


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(p, "about 25 s")
    p.add_argument("--replicas", type=int, default=3, help="N replicas (default 3)")
    cfg = p.parse_args(argv)
    if cfg.replicas < 2:
        p.error("--replicas must be at least 2")
    notes = (
        f"vidcap column: one `vidcap caption` with {cfg.replicas} --server, each a stand-in (S={cfg.slots}, "
        f"L={cfg.latency} s);\n1 replica: the same run with one --server. videos/s from process start to "
        "exit."
    )
    return run_bench(cfg, bench, "1 replica", notes)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything was stopped and removed")
        sys.exit(130)
