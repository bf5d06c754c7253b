"""The `site` fixture for tests of jobs: a config with one profile, 'cluster', reaching the test Slurm
(tests/slurm.py) through the test sshd (``slurm_sshd``), the vLLM stand-in as the job's server command;
the jobs a test submitted are cancelled at its end. A pytest plugin (conftest.py's pytest_plugins)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import videos
from sshd import SSHServer

from slurm import FINAL_STATES, SlurmCluster, SlurmError, kill_local_job
from vidcap.records import CaptionRecord

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VIDCAP = str(BIN / "vidcap")
PIXELS = 160 * 128
STANDIN = [sys.executable, "-m", "tests.standin.server", "--video-max-pixels", str(PIXELS)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)  # JSON strings, numbers, booleans and lists are valid TOML


@dataclass
class Site:
    """A config for one profile, 'cluster', and the jobs the test submitted (cancelled at the end)."""

    path: Path
    work: Path
    videos: Path
    sections: dict[str, dict[str, Any]]
    good: set[str]  # the corpus's videos that should get a caption
    submitted: list[str] = field(default_factory=list)

    def write(self) -> None:
        lines = ['default_profile = "cluster"']
        for name, values in self.sections.items():
            lines.append(f"[profiles.cluster.{name}]")
            lines += [f"{k} = {toml(v)}" for k, v in values.items() if v is not None]
        self.path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def set(self, section: str, **values: Any) -> None:
        self.sections.setdefault(section, {}).update(values)
        self.write()

    def cli(
        self, *args: str, timeout: float = 240, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [VIDCAP, *args, "--config", str(self.path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
        if args[:2] == ("job", "submit") and res.returncode == 0:
            out = res.stdout.strip()
            self.submitted.append(json.loads(out)["id"] if "--json" in args else out.splitlines()[-1])
        return res

    def submit(self, *args: str) -> str:
        res = self.cli("job", "submit", "--json", *args)
        assert res.returncode == 0, res.stderr
        return str(json.loads(res.stdout)["id"])

    def endpoint(self, job: str) -> dict[str, Any]:
        return json.loads((self.work / "jobs" / job / "endpoint.json").read_text())


@pytest.fixture
def site(
    slurm_sshd: SSHServer, slurm_cluster: SlurmCluster, corpus: videos.Corpus, tmp_path: Path
) -> Iterator[Site]:
    slurm_sshd.reset()
    work = tmp_path / "work"
    s = Site(
        path=tmp_path / "vidcap.toml",
        work=work,
        videos=corpus.root,
        good={str(p) for p in corpus.good},
        sections={
            "ssh": {k: v for k, v in slurm_sshd.ssh_config().model_dump().items() if v is not None},
            "paths": {"videos_dir": str(corpus.root), "work_dir": str(work)},
            "job": {
                "gres": "",
                "cpus": 1,
                "mem": "1G",
                "time": "00:15:00",
                "setup": [f'export PATH="{BIN}:$PATH"'],
                "env": {"PYTHONPATH": str(REPO), "VIDCAP_READY_TIMEOUT": "90"},
            },
            "server": {
                "served_name": "qwen3-omni",
                "command": STANDIN,
                "local_vllm_port": free_port(),
                "local_files_port": free_port(),
            },
            "caption": {"max_pixels": PIXELS, "concurrency": 4, "server_wait": 60.0},
        },
    )
    s.write()
    try:
        yield s
    finally:
        s.cli("tunnel", "down")
        for job in s.submitted:
            if job.startswith("local-"):
                kill_local_job(job)
            else:
                slurm_cluster.run("scancel", job, check=False)
        for job in (j for j in s.submitted if not j.startswith("local-")):
            with contextlib.suppress(SlurmError):
                slurm_cluster.wait_state(job, FINAL_STATES, timeout=30)


def records(out: Path) -> dict[str, CaptionRecord]:
    found = {}
    for path in out.rglob("*.json") if out.exists() else []:
        if "_vidcap" not in path.relative_to(out).parts:
            rec = CaptionRecord.model_validate_json(path.read_text(encoding="utf-8"))
            found[rec.video.path] = rec
    return found
