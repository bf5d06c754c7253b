"""The server job end to end, through the CLI: real Slurm (tests/slurm.py), reached through a real sshd
(``slurm_sshd`` in tests/sshd.py) whose sessions see the test cluster's SLURM_CONF, with the vLLM stand-in
as the job's server command. Nobody types a node or a port: the endpoint is found from the running job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobsite import BIN, PIXELS, STANDIN, VIDCAP, Site, records

from slurm import SlurmCluster, pids_with_env

pytestmark = pytest.mark.timeout(300)


def job_processes(job: str) -> list[int]:
    """Processes started by this Slurm job (they carry its id in their environment)."""
    return [p for p in pids_with_env(f"SLURM_JOB_ID={job}".encode()) if Path(f"/proc/{p}").exists()]


def test_submit_wait_tunnel_caption_cancel(site: Site, slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = site.submit()
    assert job.isdigit()

    res = site.cli("job", "wait", job, "--timeout", "120", "--poll", "0.5", "--json")
    assert res.returncode == 0, res.stderr
    ready = json.loads(res.stdout)
    assert ready["job_id"] == job and ready["model"] == "qwen3-omni"
    endpoint = site.endpoint(job)
    assert (ready["vllm_port"], ready["files_port"]) == (endpoint["vllm_port"], endpoint["files_port"])
    secrets = site.work / "jobs" / job / "secrets.json"
    assert secrets.stat().st_mode & 0o777 == 0o600
    api_key = json.loads(secrets.read_text())["api_key"]

    status = json.loads(site.cli("job", "status", job, "--json").stdout)
    assert status["state"] == "RUNNING" and status["endpoint"]["vllm_port"] == endpoint["vllm_port"]

    # a second submit reuses the healthy job instead of queueing another
    res = site.cli("job", "submit")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == job and "reusing" in res.stderr

    res = site.cli("tunnel", "up", "--json")
    assert res.returncode == 0, res.stderr
    tunnel = json.loads(res.stdout)
    assert tunnel["job_id"] == job
    assert sorted(tunnel["targets"]) == sorted(
        [
            f"files={site.sections['server']['local_files_port']}:{endpoint['node']}:{endpoint['files_port']}",
            f"vllm={site.sections['server']['local_vllm_port']}:{endpoint['node']}:{endpoint['vllm_port']}",
        ]
    )

    out = tmp_path / "captions"
    res = site.cli("caption", f"cluster:{site.videos}", "--out", str(out), "--json")
    assert res.returncode == 1, res.stderr  # the corpus's bad files fail; every good video is captioned
    assert set(records(out)) == site.good
    summary = json.loads(res.stdout)
    assert summary["counts"]["done"] == len(site.good)
    assert {r.server.job_id for r in records(out).values()} <= {job, None}
    for text in (res.stdout, res.stderr, *(p.read_text() for p in out.rglob("*.json*"))):
        assert api_key not in text

    res = site.cli("job", "list", "--json")
    assert [(r["id"], r["state"]) for r in json.loads(res.stdout)] == [(job, "RUNNING")]

    res = site.cli("job", "cancel", job)
    assert res.returncode == 0, res.stderr
    assert slurm_cluster.wait_state(job, "CANCELLED", timeout=30) == "CANCELLED"
    deadline = time.monotonic() + 30
    while job_processes(job) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job_processes(job) == []
    assert not (site.work / "jobs" / job / "endpoint.json").exists()
    assert not secrets.exists()
    # the tunnel to the cancelled job's servers went down with it
    assert json.loads(site.cli("tunnel", "status", "--json").stdout)[0]["status"] == "down"
    status = json.loads(site.cli("job", "status", job, "--json").stdout)
    assert status["state"] == "CANCELLED" and status["endpoint"] is None
    logs = site.cli("job", "logs", job)
    assert logs.returncode == 0 and f"job {job} on" in logs.stdout and "ready:" in logs.stdout
    assert api_key not in logs.stdout


def test_a_server_that_exits_at_start_fails_wait_fast_with_the_log(site: Site) -> None:
    crash = "import sys; print('boom: CUDA driver version is insufficient', flush=True); sys.exit(7)"
    site.set("server", command=[sys.executable, "-c", crash])
    job = site.submit()
    t0 = time.monotonic()
    res = site.cli("job", "wait", job, "--timeout", "120", "--poll", "0.5")
    took = time.monotonic() - t0
    assert res.returncode == 3, res.stderr
    assert took < 60, f"wait took {took:.0f} s to notice"
    assert f"job {job} ended before it was ready: FAILED" in res.stderr
    assert "boom: CUDA driver version is insufficient" in res.stderr  # the log's tail
    assert "exited with status 7" in res.stderr


def test_a_job_that_cannot_be_scheduled_times_out_naming_the_reason(site: Site) -> None:
    site.set("job", gres="gpu:h100:1")
    job = site.submit()
    res = site.cli("job", "wait", job, "--timeout", "4", "--poll", "0.5")
    assert res.returncode == 3, res.stderr
    assert f"job {job} was not ready after 4 s: PENDING" in res.stderr
    assert "ReqNodeNotAvail" in res.stderr
    status = json.loads(site.cli("job", "status", job, "--json").stdout)
    assert status["state"] == "PENDING" and "ReqNodeNotAvail" in status["reason"]
    assert site.cli("job", "cancel", job).returncode == 0


def test_two_jobs_on_one_node_never_collide_on_ports(site: Site) -> None:
    first = site.submit()
    second = site.submit("--new")
    assert first != second
    for job in (first, second):
        res = site.cli("job", "wait", job, "--timeout", "120", "--poll", "0.5")
        assert res.returncode == 0, res.stderr
    a, b = site.endpoint(first), site.endpoint(second)
    assert a["node"] == b["node"]
    assert len({a["vllm_port"], a["files_port"], b["vllm_port"], b["files_port"]}) == 4
    listed = json.loads(site.cli("job", "list", "--json").stdout)
    assert {r["id"]: r["state"] for r in listed} == {first: "RUNNING", second: "RUNNING"}


def test_a_job_cancelled_mid_caption_stops_the_run_and_a_new_job_completes_it(
    site: Site, slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    requests = tmp_path / "requests.jsonl"
    site.set("server", command=[*STANDIN, "--latency", "0.7", "--log-file", str(requests)])
    site.set("caption", max_pixels=PIXELS, concurrency=2, server_wait=120.0)
    first = site.submit()
    assert site.cli("job", "wait", first, "--timeout", "120", "--poll", "0.5").returncode == 0
    out = tmp_path / "captions"
    proc = subprocess.Popen(
        [
            VIDCAP,
            "caption",
            f"cluster:{site.videos}",
            "--out",
            str(out),
            "--json",
            "--config",
            str(site.path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "VIDCAP_JOB_WATCH_INTERVAL": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while len(records(out)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert len(records(out)) >= 2, proc.stderr.read() if proc.poll() is not None else "no records"
        assert site.cli("job", "cancel", first).returncode == 0
        t0 = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
    stopped_after = time.monotonic() - t0
    assert proc.returncode == 3, stderr
    assert f"job {first} has ended: CANCELLED" in stderr and "rerun" in stderr
    assert stopped_after < 30, f"the run took {stopped_after:.0f} s to stop (server_wait is 120 s)"
    done_first = set(records(out))
    good = site.good
    assert 2 <= len(done_first) < len(good)
    summary = json.loads(stdout)
    assert summary["aborted"] and "CANCELLED" in summary["aborted"]

    lines_before = len(requests.read_text().splitlines())
    second = site.submit()
    assert second != first
    assert site.cli("job", "wait", second, "--timeout", "120", "--poll", "0.5").returncode == 0
    res = site.cli("caption", f"cluster:{site.videos}", "--out", str(out), "--json")
    assert res.returncode == 1, res.stderr  # only the corpus's bad files fail
    assert set(records(out)) == good
    asked_again = {json.loads(line)["video"] for line in requests.read_text().splitlines()[lines_before:]}
    finished = {str(site.videos / p) for p in done_first}
    assert not (asked_again & finished), "videos finished under the first job were sent again"


def test_local_executor_runs_the_same_script_without_slurm(
    site: Site, slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    site.sections["ssh"] = {}
    site.set("server", command=[*STANDIN])
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    res = site.cli("job", "submit", "--local", "--wait", "--timeout", "90", "--json", env=env)
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)["id"]
    assert job.startswith("local-") and json.loads(res.stdout)["endpoint"]["model"] == "qwen3-omni"
    assert slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.strip() == ""  # Slurm was not used
    listed = json.loads(site.cli("job", "list", "--json").stdout)
    assert [(r["id"], r["state"], r["executor"]) for r in listed] == [(job, "RUNNING", "local")]
    # with no --server, caption finds the running local job's port and API key by itself
    out = tmp_path / "captions"
    res = site.cli("caption", str(site.videos), "--out", str(out), "--json")
    assert res.returncode == 1, res.stderr  # the corpus's bad files fail
    assert set(records(out)) == site.good
    assert site.cli("job", "cancel", job).returncode == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = json.loads(site.cli("job", "status", job, "--json").stdout)["state"]
        if state != "RUNNING":
            break
        time.sleep(0.3)
    assert state == "CANCELLED"
    assert not (site.work / "jobs" / job / "endpoint.json").exists()
    assert pids_with_env(f"VIDCAP_LOCAL_JOB_ID={job}".encode()) == []


def test_replicas_share_one_laptop_run(site: Site, slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    site.set("server", command=[*STANDIN, "--latency", "0.3"])
    res = site.cli("job", "submit", "--replicas", "2", "--caption", str(site.videos))
    assert res.returncode == 2 and "--shards" in res.stderr
    job = site.submit("--replicas", "2")
    res = site.cli("job", "wait", job, "--timeout", "120", "--poll", "0.5", "--json")
    assert res.returncode == 0, res.stderr
    ready = json.loads(res.stdout)
    assert sorted(ep["job_id"] for ep in ready) == [f"{job}_0", f"{job}_1"]
    status = json.loads(site.cli("job", "status", job, "--json").stdout)
    assert status["state"] == "RUNNING" and [t["state"] for t in status["tasks"]] == ["RUNNING"] * 2
    assert all(t["endpoint"] for t in status["tasks"])

    # tunnel up forwards to both servers; a run spreads its requests over them
    res = site.cli("tunnel", "up", "--json")
    assert res.returncode == 0, res.stderr
    names = sorted(spec.split("=")[0] for spec in json.loads(res.stdout)["targets"])
    assert names == ["files", "vllm", "vllm1"]
    checks = json.loads(site.cli("tunnel", "status", "--json").stdout)[0]["checks"]
    assert checks == {"vllm": "ok", "vllm1": "ok", "files": "ok"}
    out = tmp_path / "captions"
    res = site.cli("caption", f"cluster:{site.videos}", "--out", str(out), "--json")
    assert res.returncode == 1, res.stderr  # the corpus's bad files
    got = records(out)
    assert set(got) == site.good
    assert len({r.server.url for r in got.values()}) == 2  # both replicas captioned some
    assert {r.server.job_id for r in got.values()} == {f"{job}_0", f"{job}_1"}

    res = site.cli("tunnel", "up")  # still up (idempotent): cancelling the array stops it
    assert res.returncode == 0, res.stderr
    res = site.cli("job", "cancel", job)
    assert res.returncode == 0 and "stopped the tunnel" in res.stderr, res.stderr
    assert slurm_cluster.wait_state(f"{job}_0", "CANCELLED", timeout=30) == "CANCELLED"
