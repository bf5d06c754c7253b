"""vidcap benchmarks (DESIGN.md §6): client overhead, saturation, resume, inline media preparation.

Run from the repository root::

    .venv/bin/python tests/bench/bench.py [--quick] [--only NAME[,NAME]] [--json-out F]

NAME is one of overhead, saturation, resume, inline. The stand-in for vLLM always runs in its own process
(``python -m tests.standin.server``) so that it never shares the GIL with the client being measured.
Fixture clips and the resume tree (100,000 videos + records; 20,000 with --quick) are cached under
--cache-dir (default /tmp/vidcap-bench-cache) and reused; everything else is removed at the end.
See tests/bench/README.md for what each number means and the latest results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import forkserver, get_context
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
for _p in (str(REPO), str(REPO / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchtable import Row, finish, print_table, ratio_row  # noqa: E402

from vidcap import captioner, media  # noqa: E402
from vidcap.client import Endpoint, server_info  # noqa: E402
from vidcap.config import config_hash  # noqa: E402

SECTIONS = ("overhead", "saturation", "resume", "inline")
PROMPT = "Describe this video in detail. Write one paragraph."
CONCURRENCY = 64
SAMPLE_FPS = 2.0
FIXED_MTIME = 1_700_000_000.25  # every resume placeholder gets this mtime, so one record template fits all


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the stand-in in its own process ---------------------------------------------------------------


class Server:
    def __init__(self, args: list[str], tmp: Path) -> None:
        from tests.standin.server import run_subprocess

        self.proc, self.url = run_subprocess(args, tmp)

    def stats(self) -> dict[str, Any]:
        import httpx

        return httpx.get(self.url + "/stats", timeout=30).json()

    def stop(self) -> None:
        from tests.standin.server import stop_subprocess

        stop_subprocess(self.proc)


@contextmanager
def standin(tmp: Path, media_root: Path, *extra: str) -> Iterator[Server]:
    server = Server(["--allowed-local-media-path", str(media_root), "--seed", "1", *extra], tmp)
    try:
        yield server
    finally:
        server.stop()


# ---- fixtures --------------------------------------------------------------------------------------


def clips(cache: Path, name: str, count: int, **spec: Any) -> list[Path]:
    """``count`` distinct small videos made with tests/videos.py, cached (they are deterministic)."""
    import videos

    folder = cache / "clips" / name
    folder.mkdir(parents=True, exist_ok=True)
    patterns = ("testsrc2", "smptebars", "testsrc", "rgbtestsrc", "pal75bars", "yuvtestsrc")
    out = []
    for i in range(count):
        path = folder / f"clip{i}.mp4"
        if not path.exists():
            videos.make_video(path, pattern=patterns[i % len(patterns)], tone_hz=300 + 50 * i, **spec)
        out.append(path)
    return out


def copy_corpus(sources: list[Path], root: Path, n: int, per_dir: int = 100) -> Path:
    """``n`` distinct files (real copies, own size and mtime) cycling over ``sources``, ``per_dir`` a dir."""
    for i in range(n):
        dest = root / f"d{i // per_dir:03d}" / f"v{i:05d}.mp4"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources[i % len(sources)], dest)
    return root


# ---- 1. client overhead ----------------------------------------------------------------------------


def _probe_no_audio(path: str) -> media.Probe:
    return media.probe(path, audio=False)


async def raw_loop(
    source: Path,
    out: Path,
    base_url: str,
    model: str,
    concurrency: int,
    stamps: list[float],
    shared: bool = False,
    probe: bool = False,
) -> int:
    """The minimal client: list the files, one chat request each with a file:// URL, one JSON file each.

    ``shared``: one httpx client (pool of ``concurrency`` connections) for all workers; the default is one
    client of one connection per worker, which avoids httpcore 1.x's pool scans (see README). Appends the
    time of each finished caption to ``stamps``. ``probe``: also probe each video first with decord in a
    process pool of the same size as vidcap's (duration gives num_frames, as a correct client needs).
    """
    import httpx

    files = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".mp4")]
    it = iter(files)
    n_clients = 1 if shared else concurrency
    limits = httpx.Limits(max_connections=concurrency // n_clients, max_keepalive_connections=concurrency)
    tls = ssl.create_default_context()  # one context: each client would otherwise load the CA store (~15 ms)
    clients = [
        httpx.AsyncClient(base_url=base_url, limits=limits, timeout=600, verify=tls) for _ in range(n_clients)
    ]

    pool = media.MediaPool() if probe else None

    async def worker(client: httpx.AsyncClient) -> None:
        for path in it:
            video_kwargs: dict[str, Any] = {"fps": SAMPLE_FPS}
            if pool is not None:
                info = await pool.run(_probe_no_audio, path)
                video_kwargs["num_frames"] = media.frame_count(info.duration_s, SAMPLE_FPS)
            body = {
                "model": model,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "video_url", "video_url": {"url": "file://" + path}},
                            {"type": "text", "text": PROMPT},
                        ],
                    }
                ],
                "max_tokens": 1024,
                "media_io_kwargs": {"video": video_kwargs},
            }
            resp = await client.post("/v1/chat/completions", json=body)
            resp.raise_for_status()
            caption = resp.json()["choices"][0]["message"]["content"]
            rel = os.path.relpath(path, source)
            dest = out / (rel + ".json")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "w", encoding="utf-8") as fh:
                fh.write(json.dumps({"path": rel, "caption": caption}))
            stamps.append(time.perf_counter())

    try:
        await asyncio.gather(*(worker(clients[i % n_clients]) for i in range(concurrency)))
    finally:
        for client in clients:
            await client.aclose()
        if pool is not None:
            pool.shutdown()
    return len(stamps)


def run_vidcap(source: Path, out: Path, url: str, stamps: list[float] | None = None, **kw: Any) -> Any:
    """One captioner.run, as the CLI does it (its own decode pool); ``stamps`` gets each caption's time."""
    job = captioner.CaptionJob(source=source, out=out, prompt=PROMPT, media="file", **kw)

    def sink(event: captioner.Event) -> None:
        if stamps is not None and event.kind == "done":
            stamps.append(time.perf_counter())

    summary = asyncio.run(captioner.run(job, Endpoint(url + "/v1"), sink))
    if summary.counts.failed or summary.aborted:
        raise RuntimeError(f"vidcap run failed: {summary.model_dump_json()}")
    return summary


def _rates(n: int, t0: float, t1: float, stamps: list[float]) -> dict[str, float]:
    """End to end (start of the call to its return) and steady (first to last caption) captions/s."""
    return {
        "wall_s": t1 - t0,
        "end_to_end": n / (t1 - t0),
        "steady": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan"),
        "first_caption_s": stamps[0] - t0 if stamps else float("nan"),
    }


def bench_overhead(cfg: argparse.Namespace, tmp: Path, cache: Path) -> tuple[list[Row], dict[str, Any]]:
    n, reps = (400, 1) if cfg.quick else (1000, 2)
    root = tmp / "overhead"
    source = copy_corpus(clips(cache, "small", 4, duration=2.0, size=(160, 120), fps=10), root / "v", n)
    log(f"overhead: {n} videos (2 s, 160x120, with audio), concurrency {CONCURRENCY}, best of {reps}")
    rows, detail = [], {}
    counter = 0
    variants = ("raw", "raw+probe", "vidcap-audio-off", "vidcap-audio-on")
    for decode in ("none", "full"):
        best: dict[str, dict[str, float]] = {v: {} for v in variants}
        for rep in range(reps):
            for variant in variants:
                counter += 1
                out = root / f"out{counter}"
                stamps: list[float] = []
                # A fresh server per run: cold decode cache (decode full) and clean stats.
                with standin(tmp, root, "--decode", decode) as server:
                    if variant.startswith("raw"):
                        model = asyncio.run(server_info(Endpoint(server.url + "/v1"))).models[0]
                        t0 = time.perf_counter()
                        asyncio.run(
                            raw_loop(
                                source,
                                out,
                                server.url,
                                model,
                                CONCURRENCY,
                                stamps,
                                probe=variant == "raw+probe",
                            )
                        )
                        t1 = time.perf_counter()
                    else:
                        audio = "on" if variant.endswith("on") else "off"
                        t0 = time.perf_counter()
                        run_vidcap(source, out, server.url, stamps, audio=audio, concurrency=CONCURRENCY)
                        t1 = time.perf_counter()
                    stats = server.stats()
                if len(stamps) != n:
                    raise RuntimeError(f"{variant}: captioned {len(stamps)} of {n}")
                rates = _rates(n, t0, t1, stamps)
                rates.update(server_completed=stats["completed"], server_max_in_flight=stats["max_in_flight"])
                detail[f"{decode}/{variant}/{rep}"] = rates
                log(
                    f"  decode {decode:<4} {variant:<17} rep {rep}: {rates['wall_s']:5.2f} s, "
                    f"{rates['end_to_end']:6.1f}/s end to end, {rates['steady']:6.1f}/s steady, "
                    f"first caption after {rates['first_caption_s']:.2f} s"
                )
                for key in ("end_to_end", "steady"):
                    best[variant][key] = max(best[variant].get(key, 0.0), rates[key])
                shutil.rmtree(out, ignore_errors=True)
        raw = best["raw"]
        rows += [
            ratio_row(
                f"captions/s decode {decode}, audio off",
                best["vidcap-audio-off"]["steady"],
                raw["steady"],
                0.8,
            ),
            ratio_row(
                "  same, vs raw loop + the same probe",
                best["vidcap-audio-off"]["steady"],
                best["raw+probe"]["steady"],
                0.8,
            ),
            ratio_row(
                "  same, end to end (incl. start-up)",
                best["vidcap-audio-off"]["end_to_end"],
                raw["end_to_end"],
                None,
            ),
            ratio_row(
                f"captions/s decode {decode}, audio on*",
                best["vidcap-audio-on"]["steady"],
                raw["steady"],
                None,
            ),
        ]
    return rows, {"videos": n, "repetitions": reps, "runs": detail}


# ---- 2. saturation ---------------------------------------------------------------------------------


def bench_saturation(cfg: argparse.Namespace, tmp: Path, cache: Path) -> tuple[list[Row], dict[str, Any]]:
    slots, latency = 16, 0.25
    seconds = 5.0 if cfg.quick else 10.0
    capacity = slots / latency
    n = int(capacity * seconds)
    root = tmp / "saturation"
    source = copy_corpus(clips(cache, "small", 4, duration=2.0, size=(160, 120), fps=10), root / "v", n)
    # vidcap's default concurrency, then (full run only) exactly as many requests in flight as slots.
    concurrencies = [CONCURRENCY] if cfg.quick else [CONCURRENCY, slots]
    rows, detail = [], {}
    for conc in concurrencies:
        log(
            f"saturation: {n} videos, {slots} slots x {latency} s (capacity {capacity:.0f} req/s), "
            f"concurrency {conc}, stand-in --decode full"
        )
        args = ("--slots", str(slots), "--latency", str(latency), "--decode", "full")
        with standin(tmp, root, *args) as server:
            t0 = time.perf_counter()
            summary = run_vidcap(source, root / f"out{conc}", server.url, audio="off", concurrency=conc)
            wall = time.perf_counter() - t0
            st = server.stats()
        if summary.counts.done != n:
            raise RuntimeError(f"saturation: captioned {summary.counts.done} of {n}")
        span = st["last_response_ts"] - st["first_request_ts"]
        share = st["busy_slot_seconds"] / (slots * span)
        achieved = st["completed"] / span
        log(
            f"  busy {st['busy_slot_seconds']:.2f} slot-s over {span:.2f} s: {share:.2%}; "
            f"{achieved:.1f} req/s; run wall {wall:.2f} s"
        )
        goal = 0.97 if conc == CONCURRENCY else None
        rows += [
            Row(
                f"saturation: busy share, concurrency {conc}",
                f"{share:.1%}",
                "100%",
                f"{share:.3f}",
                ">= 0.97" if goal else "(info)",
                share >= 0.97 if goal else None,
                {"vidcap": share, "baseline": 1.0, "ratio": share, "goal": goal},
            ),
            ratio_row(f"  req/s vs capacity S/L = {slots}/{latency}", achieved, capacity, None),
        ]
        if conc == CONCURRENCY:
            rows.append(ratio_row("  videos/s incl. start-up and tail", n / wall, capacity, None))
        detail[f"concurrency {conc}"] = {
            "wall_s": wall,
            "share": share,
            "req_per_s": achieved,
            "stats": _trim(st),
        }
    return rows, {"videos": n, "slots": slots, "latency": latency, "runs": detail}


def _trim(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if k != "by_video"}


# ---- 3. resume -------------------------------------------------------------------------------------


def _record_template(chash: str, model: str) -> str:
    """A record as vidcap writes it, with @PATH@ in place of the (JSON-quoted) relative path."""
    from vidcap import __version__, chat
    from vidcap.config import SamplingConfig
    from vidcap.records import CaptionRecord, Params, PromptInfo, ServerInfo, Timing, Usage, VideoInfo

    rec = CaptionRecord(
        config_hash=chash,
        video=VideoInfo(
            path="@PATH@",
            size=PLACEHOLDER_SIZE,
            mtime=FIXED_MTIME,
            duration_s=2.0,
            fps=10.0,
            width=160,
            height=120,
            has_audio=None,
            vfr=False,
        ),
        model=model,
        server=ServerInfo(url="http://127.0.0.1:8000/v1", vllm_version="0.0.0-standin"),
        prompt=PromptInfo(text=PROMPT, sha256="0" * 64),
        params=Params(
            sampling=chat.sampling_params(SamplingConfig()),
            fps=SAMPLE_FPS,
            max_pixels=640 * 360,
            audio=False,
            window=None,
            overlap=2.0,
            media="file",
        ),
        caption="A 2.0-second clip, 4 frames at 160x120, mean colour (120,130,110). " * 6,
        usage=Usage(prompt_tokens=123, completion_tokens=140),
        finish_reason="stop",
        timing=Timing(
            started="2025-01-01T00:00:00.000+00:00",
            finished="2025-01-01T00:00:01.000+00:00",
            latency_s=1.0,
            attempts=1,
        ),
        vidcap_version=__version__,
    )
    return rec.to_json().replace('"@PATH@"', "@PATH@")


PLACEHOLDER = b"\x00\x00\x00\x18ftypisom-placeholder"  # never opened: its record is up to date
PLACEHOLDER_SIZE = len(PLACEHOLDER)


def resume_tree(cache: Path, n: int, chash: str, model: str) -> tuple[Path, Path]:
    """``n`` placeholder videos and their up-to-date records (1000 a directory), cached across runs."""
    base = cache / f"resume-{n}"
    videos, out = base / "videos", base / "out"
    marker = base / "ready.json"
    state = json.loads(marker.read_text()) if marker.exists() else {}
    per_dir = 1000
    if not state.get("videos"):
        log(f"resume: creating {n} placeholder videos in {videos} (once; cached)")
        shutil.rmtree(base, ignore_errors=True)
        for i in range(n):
            path = videos / f"d{i // per_dir:03d}" / f"v{i % per_dir:04d}.mp4"
            if i % per_dir == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(PLACEHOLDER)
            os.utime(path, (FIXED_MTIME, FIXED_MTIME))
        state = {"videos": n}
        base.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(state))
    if state.get("config_hash") != chash:
        log(f"resume: writing {n} records for config hash {chash} (once per hash; cached)")
        shutil.rmtree(out, ignore_errors=True)
        template = _record_template(chash, model)
        for i in range(n):
            rel = f"d{i // per_dir:03d}/v{i % per_dir:04d}.mp4"
            path = out / (rel + ".json")
            if i % per_dir == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(template.replace("@PATH@", json.dumps(rel)))
        state["config_hash"] = chash
        marker.write_text(json.dumps(state))
    return videos, out


def resume_child(spec: str) -> int:
    """Entry point of the measured process: one captioner.run over the cached tree, result on stdout."""
    args = json.loads(spec)
    job = captioner.CaptionJob(
        source=Path(args["source"]),
        out=Path(args["out"]),
        prompt=PROMPT,
        audio=args["audio"],
        concurrency=CONCURRENCY,
    )
    t0 = time.perf_counter()
    summary = asyncio.run(captioner.run(job, Endpoint(args["url"] + "/v1")))
    wall = time.perf_counter() - t0
    print(json.dumps({"run_s": wall, "counts": summary.counts.model_dump(), "aborted": summary.aborted}))
    return 0


def bench_resume(cfg: argparse.Namespace, tmp: Path, cache: Path) -> tuple[list[Row], dict[str, Any]]:
    n = 20_000 if cfg.quick else 100_000
    audio = "off"
    media_root = tmp / "resume-media"
    media_root.mkdir()
    # The stand-in's media root does not matter: nothing may be sent.
    with standin(tmp, media_root, "--decode", "none") as server:
        info = asyncio.run(server_info(Endpoint(server.url + "/v1")))
        model, max_len = info.models[0], info.max_model_len or 32768
        job = captioner.CaptionJob(source=media_root, out=media_root, prompt=PROMPT, audio=audio)
        chash = config_hash(captioner.hash_payload(job, model, max_len))
        source, out = resume_tree(cache, n, chash, model)
        log(f"resume: captioner.run over {n} up-to-date records (own process)")
        spec = json.dumps({"source": str(source), "out": str(out), "url": server.url, "audio": audio})
        stderr_path = tmp / "resume-child.stderr"
        t0 = time.perf_counter()
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--resume-child", spec],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
            assert proc.stdout is not None
            text = proc.stdout.read().decode()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        proc_wall = time.perf_counter() - t0
        st = server.stats()
    for summary in (out / "_vidcap" / "runs").glob("*.json"):
        summary.unlink()  # keep the cached tree as it was
    if proc.returncode != 0:
        raise RuntimeError(f"resume child exited {proc.returncode}: {stderr_path.read_text()[-2000:]}")
    result = json.loads(text.strip().splitlines()[-1])
    counts = result["counts"]
    if counts["skipped"] != n or counts["done"] or counts["failed"]:
        raise RuntimeError(f"resume: expected {n} skipped, got {counts}")
    rss_mb = usage.ru_maxrss / 1024
    run_s = result["run_s"]
    log(
        f"  run {run_s:.2f} s (process {proc_wall:.2f} s), peak RSS {rss_mb:.0f} MB, "
        f"chat requests {st['requests']}"
    )
    label = f"resume {n // 1000}k"
    rows = [
        Row(
            f"{label}: captioner.run wall s",
            f"{run_s:.2f}",
            "",
            "",
            "<= 10",
            run_s <= 10,
            {"vidcap": run_s, "goal": 10},
        ),
        Row(
            f"{label}: whole process wall s",
            f"{proc_wall:.2f}",
            "",
            "",
            "(info)",
            None,
            {"vidcap": proc_wall},
        ),
        Row(
            f"{label}: peak RSS MB",
            f"{rss_mb:.0f}",
            "",
            "",
            "<= 300",
            rss_mb <= 300,
            {"vidcap": rss_mb, "goal": 300},
        ),
        Row(
            f"{label}: chat requests sent",
            str(st["requests"]),
            "",
            "",
            "== 0",
            st["requests"] == 0,
            {"vidcap": st["requests"], "goal": 0},
        ),
    ]
    return rows, {
        "records": n,
        "run_s": run_s,
        "process_s": proc_wall,
        "peak_rss_mb": rss_mb,
        "counts": counts,
        "requests": st["requests"],
    }


# ---- 4. inline media preparation -------------------------------------------------------------------


def decode_only(path: str, width: int, height: int, indices: list[int], threads: int) -> tuple[int, int, int]:
    """The baseline: decord decodes the same frames at the same size; no JPEG, no base64, no audio."""
    import decord

    vr = decord.VideoReader(path, width=width, height=height, num_threads=threads)
    batch = vr.get_batch(indices).asnumpy()
    return batch.shape[0], batch.shape[2], batch.shape[1]


def _indices(path: str, probe: media.Probe, max_pixels: int) -> tuple[int, int, list[int]]:
    """Frame indices and size exactly as media.encode_inline picks them."""
    import decord
    import numpy as np

    width, height = media.fit_size(probe.width, probe.height, max_pixels)
    vr = decord.VideoReader(path, width=width, height=height)
    frames = len(vr)
    starts = np.asarray(vr.get_frame_timestamp(np.arange(frames)), dtype=np.float64).reshape(frames, 2)[:, 0]
    times = media.sample_times(0.0, probe.duration_s, SAMPLE_FPS)
    idx = np.clip(np.searchsorted(starts, times, side="right") - 1, 0, frames - 1)
    return width, height, [int(i) for i in idx]


def bench_inline(cfg: argparse.Namespace, tmp: Path, cache: Path) -> tuple[list[Row], dict[str, Any]]:
    n = 24 if cfg.quick else 40
    reps = 2 if cfg.quick else 3
    workers = os.cpu_count() or 1
    max_pixels = 640 * 360
    sources = clips(cache, "inline", 4, duration=4.0, size=(640, 360), fps=25)
    root = copy_corpus(sources, tmp / "inline", n)
    paths = sorted(str(p) for p in root.rglob("*.mp4"))
    probes = [media.probe(p, audio=True) for p in paths]
    plans = [_indices(p, pr, max_pixels) for p, pr in zip(paths, probes, strict=True)]
    log(
        f"inline: {n} clips of 4 s at 640x360 25 fps, sampled at {SAMPLE_FPS} fps, "
        f"{workers} workers, best of {reps}"
    )

    async def vidcap_pass(pool: media.MediaPool, count: int, audio: bool) -> float:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(
                pool.run(media.encode_inline, p, pr, 0.0, pr.duration_s, SAMPLE_FPS, max_pixels, audio)
                for p, pr in list(zip(paths, probes, strict=True))[:count]
            )
        )
        wall = time.perf_counter() - t0
        for res, (w, h, idx) in zip(results, plans, strict=False):
            assert res.num_frames == len(idx) and (res.width, res.height) == (w, h)
            assert bool(res.audio_url) == audio
        return wall

    def baseline_pass(ex: ProcessPoolExecutor, count: int, threads: int) -> float:
        t0 = time.perf_counter()
        ws, hs, idxs = zip(*plans[:count], strict=True)
        results = list(ex.map(decode_only, paths[:count], ws, hs, idxs, [threads] * count))
        wall = time.perf_counter() - t0
        for (got, w, h), (pw, ph, idx) in zip(results, plans, strict=False):
            assert got == len(idx) and (w, h) == (pw, ph)
        return wall

    pool = media.MediaPool(workers)
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("forkserver"))
    runs: dict[str, list[float]] = {
        "vidcap": [],
        "vidcap-audio-off": [],
        "decode-only": [],
        "decode-only-1-thread": [],
    }
    try:
        asyncio.run(vidcap_pass(pool, 2 * workers, True))  # start and warm the workers
        baseline_pass(ex, 2 * workers, 0)
        for rep in range(reps):
            runs["vidcap"].append(n / asyncio.run(vidcap_pass(pool, n, True)))
            runs["decode-only"].append(n / baseline_pass(ex, n, 0))
            runs["vidcap-audio-off"].append(n / asyncio.run(vidcap_pass(pool, n, False)))
            runs["decode-only-1-thread"].append(n / baseline_pass(ex, n, 1))
            log(f"  rep {rep}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in runs.items()))
    finally:
        pool.shutdown()
        ex.shutdown(wait=True, cancel_futures=True)
    frames = len(plans[0][2])
    best = {k: max(v) for k, v in runs.items()}
    rows = [
        ratio_row(f"inline prep videos/s ({frames} frames+audio)", best["vidcap"], best["decode-only"], 0.7),
        ratio_row("  same, audio off", best["vidcap-audio-off"], best["decode-only"], None),
        ratio_row("  vs decode-only with num_threads=1", best["vidcap"], best["decode-only-1-thread"], None),
    ]
    return rows, {"clips": n, "frames_per_clip": frames, "videos_per_s": runs}


# ---- main ------------------------------------------------------------------------------------------

BENCHES: dict[str, Callable[[argparse.Namespace, Path, Path], tuple[list[Row], dict[str, Any]]]] = {
    "overhead": bench_overhead,
    "saturation": bench_saturation,
    "resume": bench_resume,
    "inline": bench_inline,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes: about a minute")
    p.add_argument("--only", help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--json-out", type=Path, help="write the results as JSON here")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "vidcap-bench-cache")
    p.add_argument("--resume-child", help=argparse.SUPPRESS)
    cfg = p.parse_args(argv)
    if cfg.resume_child:
        return resume_child(cfg.resume_child)
    names = [s.strip() for s in cfg.only.split(",")] if cfg.only else list(SECTIONS)
    unknown = [s for s in names if s not in BENCHES]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    # vidcap's decode pool uses the forkserver start method; start the (per-process) server now so that
    # the first measured run does not pay for it and the repetitions are alike.
    forkserver.ensure_running()
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"note: load average is {load:.1f} before starting; other work on this machine skews the numbers")
    started = time.perf_counter()
    rows: list[Row] = []
    details: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="vidcap-bench-"))
    try:
        for name in names:
            t0 = time.perf_counter()
            section_rows, details[name] = BENCHES[name](cfg, tmp, cfg.cache_dir)
            details[name]["section_s"] = time.perf_counter() - t0
            rows += section_rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - started
    print_table(rows)
    if any(r.metric.endswith("*") for r in rows):
        print("* audio on: vidcap also decodes the audio track and sends it as WAV, plus one audio check")
        print("  request; the raw loop sends video only, so this row is informative.")
    finish(
        rows,
        details,
        quick=cfg.quick,
        total=total,
        load_before=load,
        load_after=os.getloadavg()[0],
        json_out=cfg.json_out,
    )
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
