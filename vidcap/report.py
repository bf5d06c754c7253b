"""What an output directory holds: records, current failures, tokens, latency, throughput."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from vidcap.store import META, TMP_SUFFIX, OutputDir
from vidcap.sync import PARTIAL_DIR


@dataclass
class Report:
    out: str
    records: int = 0
    truncated_records: int = 0
    windowed: int = 0
    with_audio: int = 0
    audio_unverified: int = 0
    models: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: dict[str, float] = field(default_factory=dict)
    video_hours: float = 0.0
    failures: int = 0
    failures_by_class: dict[str, int] = field(default_factory=dict)
    failed_paths: list[dict[str, Any]] = field(default_factory=list)
    runs: int = 0
    running_or_killed: int = 0  # summaries without "finished": a run still going, or one that was killed
    last_run: dict[str, Any] | None = None
    throughput_videos_per_s: float | None = None
    temp_files: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentiles(values: list[float], points: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    out = {}
    for p in points:
        k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
        out[f"p{p}"] = round(ordered[k], 3)
    out["max"] = round(ordered[-1], 3)
    return out


def build(out: Path, failed_limit: int = 50) -> Report:
    """Scan ``out``. Latencies are the one list held in memory (8 bytes a record)."""
    report = Report(out=str(out))
    latencies: list[float] = []
    models: Counter[str] = Counter()
    present: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(out):
        if Path(dirpath) == out and META in dirnames:
            dirnames.remove(META)
        # rsync's --partial-dir (vidcap sync) in any directory it writes to: half-transferred records
        # sit there under their real names and must not count.
        if PARTIAL_DIR in dirnames:
            dirnames.remove(PARTIAL_DIR)
        for name in filenames:
            if name.endswith(TMP_SUFFIX):
                report.temp_files += 1
                continue
            if not name.endswith(".json"):
                continue
            path = Path(dirpath) / name
            try:
                data = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue
            if not isinstance(data, dict) or data.get("schema") != "vidcap.caption/1":
                continue
            report.records += 1
            present.add(data["video"]["path"])
            models[data.get("model", "?")] += 1
            usage = data.get("usage") or {}
            report.prompt_tokens += usage.get("prompt_tokens", 0)
            report.completion_tokens += usage.get("completion_tokens", 0)
            latencies.append(data["timing"]["latency_s"])
            report.video_hours += data["video"]["duration_s"] / 3600
            report.windowed += bool(data.get("segments"))
            params = data.get("params") or {}
            report.with_audio += bool(params.get("audio"))
            report.audio_unverified += params.get("audio_verified") is False
            report.truncated_records += data.get("finish_reason") == "length"
    report.models = dict(models)
    report.latency_s = percentiles(latencies)
    report.video_hours = round(report.video_hours, 3)
    _failures(OutputDir(out), present, report, failed_limit)
    _runs(OutputDir(out), report)
    return report


def _failures(store: OutputDir, present: set[str], report: Report, limit: int) -> None:
    """Current failures: the latest line per path over every ledger (unsharded and per shard), for paths
    that still have no record. Latest is by ``ts`` (ISO UTC strings sort as times); on a tie the line
    read later wins (ledgers in name order, lines in file order)."""
    latest: dict[str, dict[str, Any]] = {}
    for ledger in store.failure_ledgers():
        try:
            with open(ledger, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        item = json.loads(line)
                        path, ts = item["path"], str(item.get("ts", ""))
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn or foreign line; the rest of the ledger still counts
                    if path not in latest or ts >= str(latest[path].get("ts", "")):
                        latest[path] = item
        except OSError:
            continue
    current = [v for k, v in latest.items() if k not in present]
    report.failures = len(current)
    report.failures_by_class = dict(Counter(v.get("error", "?") for v in current))
    report.failed_paths = [
        {k: v.get(k) for k in ("path", "error", "message", "attempts", "retryable")} for v in current[:limit]
    ]


def _runs(store: OutputDir, report: Report) -> None:
    """Run summaries. One without ``finished`` is a run still going (summaries are rewritten as a run
    goes on) or one that was killed: counted, but left out of the throughput, whose wall time it does
    not know for sure."""
    files = sorted(store.runs_dir.glob("*.json")) if store.runs_dir.is_dir() else []
    report.runs = len(files)
    done = 0.0
    spans: list[tuple[float, float]] = []
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        report.last_run = data
        if data.get("finished") is None:
            report.running_or_killed += 1
            continue
        done += (data.get("counts") or {}).get("done", 0)
        span = _span(data)
        if span is not None:
            spans.append(span)
    wall = busy_seconds(spans)
    if wall > 0:
        report.throughput_videos_per_s = round(done / wall, 3)


def _span(run: dict[str, Any]) -> tuple[float, float] | None:
    """(start, end) in epoch seconds: from ``finished`` back by ``wall_s``."""
    try:
        end = datetime.fromisoformat(str(run["finished"])).timestamp()
        return end - float(run.get("wall_s") or 0.0), end
    except (KeyError, ValueError, TypeError):
        return None


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the spans: shards running side by side count once, not N times."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total
