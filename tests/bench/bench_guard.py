"""Throughput through vidcap's guard (vidcap/guard.py) against the same requests sent to the stand-in
directly: requests/s and MB/s, at zero latency, so the guard's own cost shows as plainly as it can.

Run from the repository root::

    .venv/bin/python tests/bench/bench_guard.py [--quick] [--json-out F]

The stand-in (``python -m tests.standin.server --api-key ...``) and the guard (``python -m vidcap.guard``)
each run in their own process; the measuring client runs in this one, on asyncio with hand-written
HTTP/1.1 over keep-alive connections (httpx would be the bottleneck long before either server). Every
request carries the API key and must get the expected status. The workloads:

- ``GET /v1/models`` on 1 connection, one request after another, and on 16 connections at once: the
  fixed cost per request (parse and check the head, one more hop each way).
- ``POST /v1/chat/completions``, a short text-only chat, on 16 connections: the stand-in's own work
  per request is larger, which is closer to what vidcap sends.
- uploads: ``POST /v1/upload`` with a 64 MB body (32 MB with --quick) on 1 and on 4 connections. The
  stand-in reads every body byte before it answers 404, like vLLM reads a request with an inline video.

Direct and guarded runs alternate, each several seconds long, after a warm-up; the table shows the best
round and the JSON file has every round. The guard's CPU time (from /proc) is shown per 1,000 requests
and per GB. MB is 10^6 bytes. Nothing here is a pass/fail goal: the numbers are information.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
for _p in (str(REPO), str(REPO / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchtable import Row, finish, print_table, ratio_row  # noqa: E402

HOST = "127.0.0.1"
KEY = "bench-key-0123456789abcdef0123"
MODEL = "Qwen/Qwen3-Omni-30B-A3B-Instruct"
MB = 1_000_000
PIECE = 1 << 20
_LENGTH = re.compile(rb"(?i)\r\ncontent-length:[ \t]*(\d+)")
_TICK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench-guard {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


# ---- the two servers -----------------------------------------------------------------------------------


def start_standin(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    from tests.standin.server import run_subprocess

    proc, url = run_subprocess(["--api-key", KEY, "--decode", "none"], tmp)
    return proc, int(url.rsplit(":", 1)[1])


def start_guard(tmp: Path, upstream: int) -> tuple[subprocess.Popen[bytes], int]:
    port_file = tmp / "guard.port"
    args = ["--port", "0", "--port-file", str(port_file), "--upstream", f"{HOST}:{upstream}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vidcap.guard", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "guard.stderr").open("wb"),
    )
    deadline = time.monotonic() + 15
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the guard did not start: {(tmp / 'guard.stderr').read_text()[-2000:]}")
        time.sleep(0.02)
    return proc, int(port_file.read_text())


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- the client ------------------------------------------------------------------------------------------


def head(method: str, path: str, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", f"Authorization: Bearer {KEY}"]
    if length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _connection(
    port: int, request: bytes, body: bytes, status: int, until: Callable[[int], bool]
) -> tuple[int, int]:
    """Send ``request`` + ``body`` again and again on one connection; (requests, body bytes) sent."""
    reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
    done = sent = 0
    view = memoryview(body)
    try:
        while not until(done):
            writer.write(request)
            for at in range(0, len(view), PIECE):
                writer.write(view[at : at + PIECE])
                await writer.drain()
            await writer.drain()
            got = await reader.readuntil(b"\r\n\r\n")
            if int(got[9:12]) != status:
                raise RuntimeError(f"expected {status}, got {got[:200]!r}")
            m = _LENGTH.search(got)
            await reader.readexactly(int(m.group(1)) if m else 0)
            done += 1
            sent += len(body)
    finally:
        writer.close()
    return done, sent


async def _run(port: int, conns: int, request: bytes, body: bytes, status: int, until: Callable) -> tuple:
    started = time.perf_counter()
    results = await asyncio.gather(*(_connection(port, request, body, status, until) for _ in range(conns)))
    return sum(r[0] for r in results), sum(r[1] for r in results), time.perf_counter() - started


def measure(port: int, work: dict[str, Any], seconds: float) -> dict[str, float]:
    """One round of one workload against one port: requests/s, MB/s."""
    if work["count"]:
        per_conn = work["count"] // work["conns"]

        def until(done: int) -> bool:
            return done >= per_conn

    else:
        deadline = time.perf_counter() + seconds

        def until(done: int) -> bool:
            return time.perf_counter() >= deadline

    n, sent, elapsed = asyncio.run(
        _run(port, work["conns"], work["request"], work["body"], work["status"], until)
    )
    return {"requests": n, "seconds": elapsed, "req_s": n / elapsed, "mb_s": sent / MB / elapsed}


def workloads(quick: bool) -> tuple[list[dict[str, Any]], bytes]:
    chat = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "Describe the video."}], "max_tokens": 16}
    ).encode()
    size = (32 if quick else 64) * MB
    upload = os.urandom(size)
    return [
        {"name": "GET /v1/models, 1 connection", "conns": 1, "count": 0, "unit": "req_s"},
        {"name": "GET /v1/models, 16 connections", "conns": 16, "count": 0, "unit": "req_s"},
        {"name": "POST chat (text), 16 connections", "conns": 16, "count": 0, "unit": "req_s", "chat": chat},
        {"name": f"upload {size // MB} MB bodies, 1 connection", "conns": 1, "count": 8, "unit": "mb_s"},
        {"name": f"upload {size // MB} MB bodies, 4 connections", "conns": 4, "count": 8, "unit": "mb_s"},
    ], upload


def bench(cfg: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> tuple[list[Row], dict]:
    standin, direct = start_standin(tmp)
    stack.callback(stop, standin)
    guard, guarded = start_guard(tmp, direct)
    stack.callback(stop, guard)
    log(f"stand-in on {direct}, guard on {guarded} (pids {standin.pid}, {guard.pid})")
    works, upload = workloads(cfg.quick)
    for w in works:
        if "chat" in w:
            w.update(request=head("POST", "/v1/chat/completions", len(w["chat"])), body=w["chat"], status=200)
        elif w["unit"] == "mb_s":
            w.update(request=head("POST", "/v1/upload", len(upload)), body=upload, status=404)
        else:
            w.update(request=head("GET", "/v1/models"), body=b"", status=200)
    seconds, rounds = (2.0, 2) if cfg.quick else (4.0, 3)
    rows: list[Row] = []
    details: dict[str, Any] = {"rounds": {}}
    for w in works:
        measure(direct, {**w, "count": w["count"] and w["conns"]}, 0.5)  # warm-up
        measure(guarded, {**w, "count": w["count"] and w["conns"]}, 0.5)
        runs: dict[str, list[dict[str, float]]] = {"direct": [], "guard": []}
        cpu = {"seconds": 0.0, "requests": 0, "bytes": 0}
        for _ in range(rounds):
            runs["direct"].append(measure(direct, w, seconds))
            before = proc_cpu(guard.pid)
            got = measure(guarded, w, seconds)
            cpu["seconds"] += proc_cpu(guard.pid) - before
            cpu["requests"] += int(got["requests"])
            cpu["bytes"] += int(got["mb_s"] * got["seconds"] * MB)
            runs["guard"].append(got)
        unit = w["unit"]
        best = {side: max(r[unit] for r in rs) for side, rs in runs.items()}
        label = "req/s" if unit == "req_s" else "MB/s"
        rows.append(ratio_row(f"{label} {w['name']}", best["guard"], best["direct"]))
        if unit == "req_s":
            per = 1000 * cpu["seconds"] / max(cpu["requests"], 1)
            rows.append(ratio_row("  guard CPU s per 1,000 requests", per, None, digits=3))
        else:
            per = cpu["seconds"] / max(cpu["bytes"] / 1e9, 1e-9)
            rows.append(ratio_row("  guard CPU s per GB", per, None, digits=2))
        details["rounds"][w["name"]] = runs
        log(f"{w['name']}: direct {best['direct']:.1f}, guard {best['guard']:.1f} {label}")
    if guard.poll() is not None or standin.poll() is not None:
        raise RuntimeError("a server died during the bench")
    return rows, details


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 s per workload (full: 3 of 4 s)")
    p.add_argument("--json-out", type=Path, help="write the results as JSON here")
    cfg = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind like Ctrl-C: the cleanup runs
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"note: load average is {load:.1f} before starting; other work on this machine skews the numbers")
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="vidcap-bench-guard-"))
    try:
        with contextlib.ExitStack() as stack:
            rows, details = bench(cfg, tmp, stack)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows, baseline="direct")
    print("vidcap column: through the guard; direct: the same requests to the stand-in's own port.")
    finish(
        rows,
        details,
        quick=cfg.quick,
        total=time.perf_counter() - started,
        load_before=load,
        load_after=os.getloadavg()[0],
        json_out=cfg.json_out,
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything was stopped and removed")
        sys.exit(130)
