"""Scale-out of shards: N `vidcap caption --shard i/N` processes at once, each against its own bounded
stand-in, all writing one output dir, against one unsharded `vidcap caption` run on one such stand-in.

Run from the repository root::

    .venv/bin/python tests/bench/bench_shards.py [--quick] [--shards N] [--json-out F]

Each stand-in is a "GPU" that is latency-bound, not CPU-bound: ``--slots S --latency L --decode none``
answers at most S requests at a time, each after sleeping L seconds, so its capacity is S/L requests/s
whatever the 2 cores are doing. Every vidcap is the real CLI (``.venv/bin/vidcap caption DIR --server URL
--out OUT --json --concurrency C --audio off --media file``) in its own process, as a Slurm array task
runs it. The videos are M copies of four small clips (bench.py's cache), with their own names and mtimes.

- baseline: one unsharded run over the M videos against one stand-in: videos/s from its process start
  to its exit.
- shards: N runs ``--shard i/N`` started together, shard i against stand-in i, all into one OUT:
  aggregate videos/s = M / (first start to last exit). The goal is aggregate >= 0.9 x N x baseline.

Every run is checked, and the bench fails (exit 2, with the reason) unless each video has exactly one
record in OUT naming it, each stand-in answered exactly the videos of its shard (no video captioned
twice), there is no failure, and every run left exactly one finished run summary. See
tests/bench/README.md for what each row means and the latest results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
for _p in (str(REPO), str(REPO / "tests"), str(REPO / "tests" / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench import Server, clips, copy_corpus, standin  # noqa: E402
from benchtable import Row, finish, print_table, ratio_row  # noqa: E402

from vidcap.discovery import shard_of  # noqa: E402

VIDCAP = REPO / ".venv" / "bin" / "vidcap"
GOAL = 0.9
_TICK = os.sysconf("SC_CLK_TCK")
LOG_NAME = "bench-shards"  # bench_replicas.py, which imports this module, sets its own


def log(msg: str) -> None:
    print(f"[{LOG_NAME} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchFailure(RuntimeError):
    """A correctness check failed: the numbers mean nothing."""


# ---- CPU accounting ------------------------------------------------------------------------------------


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat (iowait counts as idle)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class TreeCPU:
    """The CPU of the processes below some roots (vidcap's forkserver and decode workers), polled from /proc
    every ``interval`` s: wait4 on vidcap does not see them, since vidcap never waits for the workers. What
    a process uses after its last poll is missed; the decode workers idle by then."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.roots: list[int] = []
        self.seen: dict[int, tuple[int, float]] = {}  # pid -> (root, last CPU seen)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, roots: list[int]) -> None:
        self.roots = roots
        self._thread.start()

    def _poll(self) -> None:
        parents: dict[int, tuple[int, float]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    fields = Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()
                except OSError:
                    continue
                parents[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
        for root in self.roots:
            stack = [pid for pid, (ppid, _) in parents.items() if ppid == root]
            while stack:
                pid = stack.pop()
                self.seen[pid] = (root, parents[pid][1])
                stack += [c for c, (ppid, _) in parents.items() if ppid == pid]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def stop(self) -> dict[int, float]:
        """CPU seconds of each root's descendants."""
        self._stop.set()
        self._thread.join()
        total = dict.fromkeys(self.roots, 0.0)
        for root, cpu in self.seen.values():
            total[root] += cpu
        return total


# ---- one phase: K vidcap processes, each against its own stand-in ----------------------------------------


class Launch:
    """One `vidcap caption` process; a thread waits for it, so its exit time and rusage are exact."""

    def __init__(self, argv: list[str], env: dict[str, str], tmp: Path, tag: str) -> None:
        self.stdout_path, self.stderr_path = tmp / f"{tag}.stdout", tmp / f"{tag}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.started, self.started_wall = time.perf_counter(), time.time()
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
        self.ended = 0.0
        self.cpu = 0.0
        self.rc: int | None = None
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.ended = time.perf_counter()
        self.proc.returncode = self.rc = os.waitstatus_to_exitcode(status)
        # The CLI, plus the children it reaped: its forkserver and resource tracker, about 0.01 s each,
        # which TreeCPU counts as well. The decode workers are only in TreeCPU.
        self.cpu = usage.ru_utime + usage.ru_stime

    def join(self) -> None:
        self._thread.join()

    def kill(self) -> None:
        # os.kill, not Popen.terminate: that one polls, i.e. would reap beside the waiting thread.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.rc is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, sig)
                self._thread.join(10)
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        text = self.stdout_path.read_text()
        try:
            return json.loads(text)
        except ValueError:
            raise BenchFailure(
                f"vidcap exited {self.rc} without a JSON summary; stderr:\n"
                + self.stderr_path.read_text(errors="replace")[-2000:]
            ) from None


def vidcap_env(tmp: Path) -> dict[str, str]:
    """The CLI with no user config (VIDCAP_HOME: built-in defaults) and no job or key from outside."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIDCAP_JOB_KEY", "VIDCAP_API_KEY")}
    home = tmp / "vidcap-home"
    home.mkdir(exist_ok=True)
    env["VIDCAP_HOME"] = str(home)
    return env


def caption_argv(cfg: argparse.Namespace, source: Path, urls: list[str], out: Path) -> list[str]:
    """`vidcap caption` of ``source`` into ``out`` against the stand-ins at ``urls`` (one --server each)."""
    argv = [str(VIDCAP), "caption", str(source)]
    for url in urls:
        argv += ["--server", url + "/v1"]
    options = ["--json", "--concurrency", str(cfg.concurrency), "--audio", "off", "--media", "file"]
    return [*argv, "--out", str(out), *options]


def run_phase(
    cfg: argparse.Namespace, tmp: Path, source: Path, out: Path, shards: int, which: list[int], tag: str
) -> dict[str, Any]:
    """The runs of shards ``which`` of ``shards`` (1: one unsharded run), started together, each against a
    fresh stand-in of its own; the times, CPU, run summaries and stand-in stats of the whole phase."""

    def argvs(urls: list[str]) -> list[list[str]]:
        return [
            caption_argv(cfg, source, [url], out) + (["--shard", f"{i}/{shards}"] if shards > 1 else [])
            for i, url in zip(which, urls, strict=True)
        ]

    return run_processes(cfg, tmp, source, len(which), argvs, tag)


def run_processes(
    cfg: argparse.Namespace,
    tmp: Path,
    source: Path,
    nservers: int,
    argvs: Callable[[list[str]], list[list[str]]],
    tag: str,
) -> dict[str, Any]:
    """Start ``nservers`` fresh bounded stand-ins, then the vidcap processes ``argvs(their URLs)`` names, all
    at once; the times, CPU, run summaries and stand-in stats (``by_video`` apart) of the whole phase."""
    env = vidcap_env(tmp)
    with contextlib.ExitStack() as stack:
        servers: list[Server] = [
            stack.enter_context(
                standin(
                    tmp,
                    source,
                    "--decode",
                    "none",
                    "--slots",
                    str(cfg.slots),
                    "--latency",
                    str(cfg.latency),
                )
            )
            for _ in range(nservers)
        ]
        server_cpu0 = [proc_cpu(s.proc.pid) for s in servers]
        launches: list[Launch] = []
        stack.callback(lambda: [launch.kill() for launch in launches])  # on error or Ctrl-C: none stays
        load0 = os.getloadavg()[0]
        busy0, total0 = machine_cpu()
        for i, argv in enumerate(argvs([s.url for s in servers])):
            launches.append(Launch(argv, env, tmp, f"{tag}-{i}"))
        tree = TreeCPU()
        tree.start([launch.proc.pid for launch in launches])
        stack.callback(tree.stop)
        for launch in launches:
            launch.join()
        below = tree.stop()
        busy1, total1 = machine_cpu()
        load1 = os.getloadavg()[0]
        server_cpu = [proc_cpu(s.proc.pid) - c for s, c in zip(servers, server_cpu0, strict=True)]
        stats = [s.stats() for s in servers]
    first, last = min(x.started for x in launches), max(x.ended for x in launches)
    for launch in launches:
        if launch.rc != 0:
            raise BenchFailure(
                f"{tag}: vidcap exited {launch.rc}; stderr:\n"
                + launch.stderr_path.read_text(errors="replace")[-2000:]
            )
    return {
        "wall_s": last - first,
        "urls": [s.url + "/v1" for s in servers],
        "processes": [
            {
                "start_s": x.started - first,
                "started_wall": x.started_wall,
                "wall_s": x.ended - x.started,
                "cpu_s": x.cpu,
                "workers_cpu_s": below[x.proc.pid],
                "summary": x.summary(),
            }
            for x in launches
        ],
        "machine_busy": (busy1 - busy0) / max(total1 - total0, 1),
        "load_before": load0,
        "load_after": load1,
        "server_cpu_s": server_cpu,
        "servers": [{k: v for k, v in st.items() if k != "by_video"} for st in stats],
        "by_video": [st["by_video"] for st in stats],  # measure() drops it after the checks
    }


# ---- the checks ------------------------------------------------------------------------------------------


def iso_ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def shard_sizes(rels: list[str], shards: int) -> list[int]:
    """Videos in each shard, split as vidcap splits them (by path hash)."""
    sizes = [0] * shards
    for rel in rels:
        sizes[shard_of(rel, shards) if shards > 1 else 0] += 1
    return sizes


def scan_records(out: Path, expected: set[str], tag: str) -> dict[str, dict[str, Any]]:
    """The records in OUT by video; BenchFailure unless there is exactly one per ``expected`` video, naming
    it and with a caption, no other file (a temp file left behind) and no line in a failure ledger."""
    records: dict[str, dict[str, Any]] = {}
    bad: list[str] = []
    for dirpath, dirnames, filenames in os.walk(out):
        if Path(dirpath) == out:
            dirnames[:] = [d for d in dirnames if d != "_vidcap"]
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(out).as_posix()
            if not rel.endswith(".json") or name.startswith("."):
                bad.append(rel)  # a temp file left behind, or something vidcap should not write
                continue
            rel = rel[: -len(".json")]
            data = records[rel] = json.loads(path.read_text())
            if data["video"]["path"] != rel or not data["caption"]:
                bad.append(f"{rel} (names {data['video']['path']!r}, caption {len(data['caption'])} chars)")
    missing, extra = sorted(expected - set(records)), sorted(set(records) - expected)
    if bad or missing or extra or len(records) != len(expected):
        raise BenchFailure(
            f"{tag}: {len(records)} records for {len(expected)} videos; "
            f"missing {missing[:5]} ({len(missing)}), unexpected {extra[:5]} ({len(extra)}), "
            f"bad {bad[:5]} ({len(bad)})"
        )
    ledgers = [p for p in (out / "_vidcap").glob("failures*.jsonl") if p.stat().st_size]
    if ledgers:
        raise BenchFailure(f"{tag}: failures recorded in {[p.name for p in ledgers]}")
    return records


def run_summaries(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "_vidcap" / "runs").glob("*.json"))]


def check(phase: dict[str, Any], out: Path, rels: list[str], shards: int, which: list[int]) -> dict[str, Any]:
    """Raise BenchFailure unless OUT holds exactly one record per video of shards ``which`` and nothing else
    went wrong; returns what the checks counted (shard sizes, summaries per shard, caption times)."""
    tag = f"shards {which} of {shards}" if shards > 1 else "1 run"
    expected = {rel for rel in rels if shards == 1 or shard_of(rel, shards) in which}
    records = scan_records(out, expected, tag)
    finished = [iso_ts(data["timing"]["finished"]) for data in records.values()]
    # Exactly once at the servers too: each stand-in answered its shard's videos, one request each.
    sizes = [shard_sizes(rels, shards)[i] for i in which]
    summaries = run_summaries(out)
    per_shard: dict[str, int] = {}
    for s in summaries:
        per_shard[s["shard"] or "-"] = per_shard.get(s["shard"] or "-", 0) + 1
    names = [f"{i}/{shards}" for i in which] if shards > 1 else ["-"]
    if sorted(per_shard) != sorted(names) or any(n != 1 for n in per_shard.values()):
        raise BenchFailure(f"{tag}: run summaries per shard {per_shard}, expected one for each of {names}")
    for i, (proc, st) in enumerate(zip(phase["processes"], phase["servers"], strict=True)):
        counts = proc["summary"]["counts"]
        on_disk = next(s for s in summaries if s["run_id"] == proc["summary"]["run_id"])
        if (
            counts["done"] != sizes[i]
            or counts["failed"]
            or st["completed"] != sizes[i]
            or st["requests"] != sizes[i]
            or on_disk["finished"] is None
            or on_disk["counts"]["done"] != sizes[i]
        ):
            raise BenchFailure(
                f"{tag}: run {i} captioned {counts['done']} (failed {counts['failed']}), its stand-in "
                f"answered {st['completed']} of {st['requests']} requests, its summary on disk says "
                f"{on_disk['counts']['done']} (finished {on_disk['finished']}); expected {sizes[i]}"
            )
    spans = [(iso_ts(s["started"]), iso_ts(s["finished"])) for s in summaries]
    return {
        "records": len(records),
        "shard_sizes": sizes,
        "summaries_per_shard": per_shard,
        "run_span_s": max(b for _, b in spans) - min(a for a, _ in spans),
        "caption_span_s": max(finished) - min(finished),
    }


# ---- the bench -------------------------------------------------------------------------------------------


def busy_share(st: dict[str, Any], slots: int) -> float:
    span = (st["last_response_ts"] or 0) - (st["first_request_ts"] or 0)
    return st["busy_slot_seconds"] / (slots * span) if span > 0 else float("nan")


def measure(
    cfg: argparse.Namespace, tmp: Path, source: Path, rels: list[str], shards: int, which: list[int], tag: str
) -> dict[str, Any]:
    out = tmp / f"out-{tag}"
    phase = run_phase(cfg, tmp, source, out, shards, which, tag)
    phase.update(check(phase, out, rels, shards, which))
    del phase["by_video"]
    rates(phase, cfg, tag)
    shutil.rmtree(out, ignore_errors=True)
    return phase


def rates(phase: dict[str, Any], cfg: argparse.Namespace, tag: str) -> None:
    """Add to a checked phase its rates (videos/s), busy shares and CPU figures, and log them."""
    n = phase["records"]
    phase["videos_s"] = n / phase["wall_s"]
    phase["videos_s_run_spans"] = n / phase["run_span_s"]
    phase["videos_s_steady"] = (n - 1) / phase["caption_span_s"]
    phase["busy_share"] = [busy_share(st, cfg.slots) for st in phase["servers"]]
    cpu = sum(p["cpu_s"] + p["workers_cpu_s"] for p in phase["processes"])
    phase["client_cpu_ms_per_video"] = 1000 * cpu / n
    phase["loop_core_share"] = max(p["cpu_s"] / p["wall_s"] for p in phase["processes"])
    walls = ", ".join(f"{p['wall_s']:.2f}" for p in phase["processes"])
    log(
        f"  {tag}: {n} videos in {phase['wall_s']:5.2f} s, {phase['videos_s']:6.1f} videos/s "
        f"(run spans {phase['videos_s_run_spans']:.1f}, steady {phase['videos_s_steady']:.1f}); "
        f"runs {walls} s; machine CPU "
        f"{100 * phase['machine_busy']:.0f}% busy, load {phase['load_before']:.1f} -> "
        f"{phase['load_after']:.1f}; client {phase['client_cpu_ms_per_video']:.2f} ms CPU/video; "
        f"GPU busy {', '.join(f'{100 * b:.0f}%' for b in phase['busy_share'])}"
    )


def records_row(n: int, many: dict[str, Any], one: dict[str, Any]) -> Row:
    """The one-record-per-video check as a table row (check() has raised when it failed)."""
    return Row(
        f"records: one per video, {n} videos",
        str(many["records"]),
        str(one["records"]),
        "",
        f"== {n}",
        True,
        {"vidcap": many["records"], "baseline": one["records"], "goal": n},
    )


def cpu_rows(many: dict[str, Any], one: dict[str, Any], loop_label: str) -> list[Row]:
    """The client-side CPU rows: per video, the event loop, the whole machine (many vs one)."""
    return [
        ratio_row(
            "client CPU ms per video",
            many["client_cpu_ms_per_video"],
            one["client_cpu_ms_per_video"],
            digits=2,
        ),
        ratio_row(loop_label, 100 * many["loop_core_share"], 100 * one["loop_core_share"], unit="%"),
        ratio_row(
            f"machine CPU busy, all {os.cpu_count()} cores",
            100 * many["machine_busy"],
            100 * one["machine_busy"],
            unit="%",
        ),
    ]


def bench(cfg: argparse.Namespace, tmp: Path) -> tuple[list[Row], dict[str, Any]]:
    n, shards, reps = cfg.videos, cfg.shards, cfg.reps
    sources = clips(cfg.cache_dir, "small", 4, duration=2.0, size=(160, 120), fps=10)
    source = copy_corpus(sources, tmp / "videos", n)
    rels = sorted(p.relative_to(source).as_posix() for p in source.rglob("*.mp4"))
    sizes = shard_sizes(rels, shards)
    largest = sizes.index(max(sizes))
    capacity = cfg.slots / cfg.latency
    log(
        f"{n} videos (2 s, 160x120), shards of {sizes}; every stand-in {cfg.slots} slots x {cfg.latency} s "
        f"= {capacity:.0f} req/s; vidcap --concurrency {cfg.concurrency}; best of {reps}"
    )
    runs: dict[str, list[dict[str, Any]]] = {"single": [], "shards": [], "largest_alone": []}
    for rep in range(reps):
        runs["single"].append(measure(cfg, tmp, source, rels, 1, [0], f"1-run-rep{rep}"))
        runs["shards"].append(
            measure(cfg, tmp, source, rels, shards, list(range(shards)), f"shards-rep{rep}")
        )
        runs["largest_alone"].append(
            measure(cfg, tmp, source, rels, shards, [largest], f"shard-{largest}-alone-rep{rep}")
        )
    one, many, alone = (max(runs[k], key=lambda r: r["videos_s"]) for k in runs)
    mean = n / shards
    beside = max(sizes[largest] / r["processes"][largest]["wall_s"] for r in runs["shards"])
    rows = [
        ratio_row(
            f"videos/s: {shards} shards vs {shards} x 1 run", many["videos_s"], shards * one["videos_s"], GOAL
        ),
        ratio_row("  1 run vs the stand-in's S/L", one["videos_s"], capacity),
        ratio_row(f"  {shards} shards vs {shards} x S/L", many["videos_s"], shards * capacity),
        ratio_row("  largest shard vs mean (hash split), videos", max(sizes), mean, digits=0),
        ratio_row(
            "  same, goal scaled by mean/largest shard",
            many["videos_s"],
            shards * one["videos_s"] * mean / max(sizes),
        ),
        ratio_row("  largest shard's videos/s, beside the others vs alone", beside, alone["videos_s"]),
        ratio_row(
            "  run summaries' spans (no process start-up)",
            many["videos_s_run_spans"],
            shards * one["videos_s_run_spans"],
        ),
        ratio_row(
            "  first to last caption (steady)",
            many["videos_s_steady"],
            shards * one["videos_s_steady"],
        ),
        records_row(n, many, one),
        Row(
            "run summaries per shard",
            "/".join(str(many["summaries_per_shard"][f"{i}/{shards}"]) for i in range(shards)),
            str(one["summaries_per_shard"]["-"]),
            "",
            "== 1 each",
            True,
            {"vidcap": many["summaries_per_shard"], "baseline": one["summaries_per_shard"]},
        ),
        ratio_row(
            "GPU busy share (mean over stand-ins)",
            100 * sum(many["busy_share"]) / shards,
            100 * sum(one["busy_share"]),
            unit="%",
        ),
        *cpu_rows(many, one, "busiest vidcap event loop, share of a core"),
    ]
    details = {
        "videos": n,
        "shards": shards,
        "shard_sizes": sizes,
        "slots": cfg.slots,
        "latency": cfg.latency,
        "concurrency": cfg.concurrency,
        "capacity_per_server": capacity,
        "progress_interval_row": "not measured: 1-3 summary rewrites per run at caption.progress_interval=10",
        "runs": runs,
    }
    return rows, details


def common_args(p: argparse.ArgumentParser, quick: str) -> None:
    """The options bench_shards.py and bench_replicas.py share."""
    p.add_argument("--quick", action="store_true", help=f"300 videos, 1 repetition: {quick}")
    p.add_argument("--videos", type=int, help="M videos (default 900; 300 with --quick)")
    p.add_argument("--slots", type=int, default=16, help="S: each stand-in's concurrent requests (16)")
    p.add_argument("--latency", type=float, default=0.5, help="L: seconds per request (0.5)")
    p.add_argument("--concurrency", type=int, default=32, help="vidcap --concurrency of every run (32)")
    p.add_argument("--reps", type=int, help="repetitions, best of (default 2; 1 with --quick)")
    p.add_argument("--json-out", type=Path, help="write the results as JSON here")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "vidcap-bench-cache")


def run_bench(
    cfg: argparse.Namespace,
    bench_fn: Callable[[argparse.Namespace, Path], tuple[list[Row], dict[str, Any]]],
    baseline: str,
    notes: str,
) -> int:
    """Run ``bench_fn`` in a temp dir removed afterwards (also on Ctrl-C or SIGTERM), print its table, the
    notes and the closing line; exit status 2 when a check failed, 1 when a goal was missed."""
    cfg.videos = cfg.videos or (300 if cfg.quick else 900)
    cfg.reps = cfg.reps or (1 if cfg.quick else 2)
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind like Ctrl-C: the cleanup runs
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"note: load average is {load:.1f} before starting; other work on this machine skews the numbers")
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f"vidcap-{LOG_NAME}-"))
    try:
        rows, details = bench_fn(cfg, tmp)
    except BenchFailure as exc:
        log(f"FAILED: {exc}")
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows, baseline=baseline)
    print(notes)
    finish(
        rows,
        details,
        quick=cfg.quick,
        total=time.perf_counter() - started,
        load_before=load,
        load_after=os.getloadavg()[0],
        json_out=cfg.json_out,
    )
    return 0 if all(r.ok is not False for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(p, "about 20 s")
    p.add_argument("--shards", type=int, default=3, help="N shards (default 3)")
    cfg = p.parse_args(argv)
    if cfg.shards < 2:
        p.error("--shards must be at least 2")
    notes = (
        f"vidcap column: {cfg.shards} `vidcap caption --shard i/{cfg.shards}` processes, each against its "
        f"own stand-in (S={cfg.slots}, L={cfg.latency} s),\none output dir; 1 run: one unsharded "
        "`vidcap caption` against one such stand-in. videos/s from process start to exit.\n"
        "Not measured: the cost of the live run-summary rewrites (caption.progress_interval, default 10 s:\n"
        "1 to 3 rewrites per run here)."
    )
    return run_bench(cfg, bench, "1 run", notes)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything was stopped and removed")
        sys.exit(130)
