"""What both benchmark scripts print: the result rows, the table, the closing line and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Row:
    metric: str
    vidcap: str
    baseline: str
    ratio: str
    goal: str
    ok: bool | None  # None: informative, no goal
    values: dict[str, Any]


def ratio_row(
    metric: str, mine: float, base: float | None, goal: float | None = None, unit: str = "", digits: int = 1
) -> Row:
    """A measured value beside its baseline (None: a reference value with nothing to compare)."""
    if base is None:
        return Row(metric, f"{mine:.{digits}f}{unit}", "", "", "(info)", None, {"vidcap": mine})
    ratio = mine / base if base else float("nan")
    return Row(
        metric,
        f"{mine:.{digits}f}{unit}",
        f"{base:.{digits}f}{unit}",
        f"{ratio:.2f}",
        f">= {goal:.2f}" if goal is not None else "(info)",
        None if goal is None else ratio >= goal,
        {"vidcap": mine, "baseline": base, "ratio": ratio, "goal": goal},
    )


def print_table(rows: list[Row], baseline: str = "baseline") -> None:
    w = max(30, *(len(r.metric) for r in rows)) + 2
    print()
    print(f"{'metric':<{w}}{'vidcap':>12}{baseline:>12}{'ratio':>8}   {'goal':<10} result")
    print("-" * (w + 12 + 12 + 8 + 3 + 10 + 7))
    for r in rows:
        verdict = {True: "ok", False: "MISS", None: ""}[r.ok]
        print(f"{r.metric:<{w}}{r.vidcap:>12}{r.baseline:>12}{r.ratio:>8}   {r.goal:<10} {verdict}")
    print()


def git_state() -> dict[str, str]:
    """Commit and local changes of the code measured (read-only git commands)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD").strip(), "changed": git("status", "--porcelain", "vidcap")}


def finish(
    rows: list[Row],
    details: dict[str, Any],
    *,
    quick: bool,
    total: float,
    load_before: float,
    load_after: float,
    json_out: Path | None,
) -> None:
    """The closing line (machine, code, load) and, when asked, the JSON file of the whole run."""
    git = git_state()
    dirty = " + local changes" if git["changed"].strip() else ""
    print(
        f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"vidcap at {git['commit'][:10] or '?'}{dirty}; load average {load_before:.1f} before, "
        f"{load_after:.1f} after; {'quick' if quick else 'full'} run took {total:.0f} s"
    )
    if json_out:
        data = {
            "quick": quick,
            "cores": os.cpu_count(),
            "total_s": total,
            "load_before": load_before,
            "load_after": load_after,
            "git": git,
            "rows": [asdict(r) for r in rows],
            "details": details,
        }
        json_out.write_text(json.dumps(data, indent=2) + "\n")
