"""On-cluster captioning end to end, through the CLI: `job submit --caption DIR --shards N` on a real
single-node Slurm reached through a real sshd, the vLLM stand-in as each task's server; `job status`,
`job wait --done`, `job resubmit --failed`; then `vidcap sync` (real rsync) brings the records home."""

from __future__ import annotations

import collections
import filecmp
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobsite import BIN, STANDIN, Site, records

from slurm import SlurmCluster
from vidcap import config, oncluster
from vidcap.discovery import shard_of
from vidcap.errors import UsageError
from vidcap.slurm_parse import JobState, JobStatus

pytestmark = pytest.mark.timeout(420)

TAG = "qwen3-omni"  # the default model's tag: the cluster out dir is captions_dir/qwen3-omni


def cluster_captions(site: Site, tmp_path: Path) -> Path:
    root = tmp_path / "cluster captions"
    site.set("paths", captions_dir=str(root))
    return root / TAG


def wait_done(site: Site, job: str, timeout: float = 240) -> tuple[int, dict]:
    res = site.cli("job", "wait", job, "--done", "--timeout", str(timeout), "--poll", "1", "--json")
    assert res.stdout.strip(), res.stderr
    return res.returncode, json.loads(res.stdout)


def test_sharded_caption_job_then_sync_brings_identical_records_home(site: Site, tmp_path: Path) -> None:
    out = cluster_captions(site, tmp_path)
    job = site.submit("--caption", f"cluster:{site.videos}", "--shards", "3")
    assert job.isdigit()
    res = site.cli("job", "wait", job, "--timeout", "5")
    assert res.returncode == 2 and f"vidcap job wait {job} --done" in res.stderr

    code, doc = wait_done(site, job)
    assert code == 1, doc  # every shard finished; the corpus's bad files failed (exit 1, not 3)
    assert [s["shard"] for s in doc["shards"]] == [0, 1, 2]
    assert [s["task"] for s in doc["shards"]] == [f"{job}_{i}" for i in range(3)]
    assert doc["failed"] == [] and all(s["run_complete"] for s in doc["shards"])
    got = records(out)
    assert set(got) == site.good
    # each record was written by the task of its own shard, and each task's summary counts its share
    for rel, rec in got.items():
        assert rec.server.job_id == f"{job}_{shard_of(rel, 3)}"
        assert rec.server.url is not None and rec.server.url.startswith("http://127.0.0.1:")
    for s in doc["shards"]:
        share = [r for r in site.good if shard_of(r, 3) == s["shard"]]
        assert s["counts"]["done"] == len(share)
        assert s["total"] is not None and s["total"] >= len(share)

    listed = {r["id"]: r for r in json.loads(site.cli("job", "list", "--json").stdout)}
    assert listed[job]["reason"].endswith("/3 tasks completed")  # the array summed up from its tasks
    status = site.cli("job", "status", job)
    assert status.returncode == 0, status.stderr
    assert f"{job}_2" in status.stdout and "captioned" in status.stdout

    home = tmp_path / "home"
    res = site.cli("sync", "--to", str(home), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["files"] > len(site.good)  # records + run summaries + failure ledgers
    local = home / TAG
    assert set(records(local)) == site.good
    for rel in site.good:
        a, b = out / f"{rel}.json", local / f"{rel}.json"
        assert filecmp.cmp(a, b, shallow=False), rel
    again = site.cli("sync", "--to", str(home), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["files"] == 0

    report = site.cli("report", str(local), "--json", "--remote")
    assert report.returncode == 0, report.stderr
    doc = json.loads(report.stdout)
    assert doc["records"] == len(site.good)
    remote = doc["remote"]  # counted against the caption job's directory, which the records are relative to
    assert remote["cluster_records"] == len(site.good) and remote["not_synced"] == 0
    assert remote["uncaptioned"] == remote["cluster_failures"] > 0  # the corpus's bad files, failed there
    assert not set(remote["uncaptioned_paths"]) & site.good


def test_a_killed_shard_is_resubmitted_and_finished_videos_are_not_sent_again(
    site: Site, slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    out = cluster_captions(site, tmp_path)
    requests = tmp_path / "requests.jsonl"
    site.set("server", command=[*STANDIN, "--latency", "1.0", "--log-file", str(requests)])
    site.set("caption", concurrency=1)
    per_shard = collections.Counter(shard_of(r, 3) for r in site.good)
    victim, count = per_shard.most_common(1)[0]
    assert count >= 3  # enough to be caught mid-run

    job = site.submit("--caption", str(site.videos), "--shards", "3")
    task = f"{job}_{victim}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        mine = [r for r in records(out) if shard_of(r, 3) == victim]
        if mine:
            break
        time.sleep(0.2)
    assert mine, f"shard {victim} wrote nothing: {site.cli('job', 'status', job).stdout}"
    slurm_cluster.run("scancel", task)

    code, doc = wait_done(site, job)
    assert code == 3, doc  # a shard did not finish
    assert doc["failed"] == [victim]
    killed = doc["shards"][victim]
    assert killed["task"] == task and killed["state"] == "CANCELLED"
    finished = set(records(out))
    share = {r for r in site.good if shard_of(r, 3) == victim}
    assert {r for r in finished if shard_of(r, 3) == victim} < share
    lines_before = len(requests.read_text().splitlines())

    res = site.cli("job", "resubmit", job, "--failed", "--json")
    assert res.returncode == 0, res.stderr
    again = json.loads(res.stdout)
    assert again["shards"] == [victim] and again["id"] not in (None, job)
    site.submitted.append(again["id"])

    code, doc = wait_done(site, job)  # the original id follows its resubmitted shard
    assert code == 1, doc  # complete now; only the corpus's bad files failed
    assert doc["failed"] == []
    assert doc["shards"][victim]["task"] == f"{again['id']}_{victim}"
    assert set(records(out)) == site.good

    asked = [json.loads(line)["video"] for line in requests.read_text().splitlines()]
    after = collections.Counter(asked[lines_before:])
    for rel in finished:
        assert after[str(site.videos / rel)] == 0, f"{rel} was finished before the resubmit, and sent again"
    for rel in site.good - finished:  # (the run's audio check may ask about one of them twice)
        assert after[str(site.videos / rel)] >= 1, rel
    # only the victim's shard ran again
    assert {shard_of(os.path.relpath(v, site.videos), 3) for v in after} == {victim}

    # nothing left to resubmit, or to cancel
    res = site.cli("job", "resubmit", job, "--failed", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["id"] is None
    res = site.cli("job", "cancel", job)
    assert res.returncode == 0 and "nothing left to cancel" in res.stderr


def test_cancel_stops_every_shard(site: Site, slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    cluster_captions(site, tmp_path)
    site.set("server", command=[*STANDIN, "--latency", "2.0"])
    site.set("caption", concurrency=1)
    job = site.submit("--caption", str(site.videos), "--shards", "2")
    deadline = time.monotonic() + 120
    running: list[dict] = []
    while time.monotonic() < deadline and len(running) < 2:  # both runs under way (their summaries exist)
        time.sleep(0.5)
        shards = json.loads(site.cli("job", "status", job, "--json").stdout)["shards"]
        running = [s for s in shards if s["counts"] is not None and s["run_finished"] is None]
    assert len(running) == 2, site.cli("job", "status", job).stdout
    res = site.cli("job", "cancel", job)
    assert res.returncode == 0 and f"cancelled job {job}" in res.stderr, res.stderr
    code, doc = wait_done(site, job, timeout=60)
    assert code == 3 and doc["failed"] == [0, 1]
    assert {s["state"] for s in doc["shards"]} == {"CANCELLED"}
    # Each run had a summary on disk from its start: on SIGTERM it writes the final one, but the test
    # Slurm's KillWait is 2 s (SIGKILL then), too short on a loaded machine; a killed run's summary says
    # how far it got, with finished null. Either way the shard is resubmittable, as asserted above.
    assert all(s["counts"] is not None for s in doc["shards"]), doc


def test_local_caption_job_ends_when_captioning_ends(
    site: Site, slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    out = cluster_captions(site, tmp_path)
    site.sections["ssh"] = {}
    site.set("server", command=[*STANDIN])
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    res = site.cli("job", "submit", "--local", "--caption", str(site.videos), "--shards", "2", env=env)
    assert res.returncode == 2 and "--shards needs Slurm" in res.stderr
    res = site.cli("job", "submit", "--local", "--caption", str(site.videos), "--json", env=env)
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)["id"]
    res = site.cli("job", "wait", job, "--done", "--local", "--timeout", "120", "--poll", "0.5", "--json")
    assert res.returncode == 1, res.stderr  # the bad files
    assert set(records(out)) == site.good
    assert slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.strip() == ""


def test_a_caption_path_outside_videos_dir_fails_the_job_clearly(site: Site, tmp_path: Path) -> None:
    cluster_captions(site, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    job = site.submit("--caption", str(elsewhere))
    code, doc = wait_done(site, job, timeout=120)
    assert code == 3 and doc["failed"] == [0]
    log = site.cli("job", "logs", job).stdout
    assert "is not under videos_dir" in log


# -- the script part, without Slurm --------------------------------------------------------------------


def test_caption_script_carries_hostile_settings_byte_exact(tmp_path: Path) -> None:
    prompt = "Say \"hi\" & 'bye' $(touch /tmp/pwned) `x` \\n\n%s %% done"
    cfg = config.parse(
        {"profiles": {"c": {"ssh": {"host": "login"}, "caption": {"prompt": prompt, "fps": 1.5}}}}
    )
    conf = oncluster.caption_config(cfg, cfg.profile("c"))
    text = oncluster.script("videos/a b", "/abs/o'ut", 3, False, conf)
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    # run just the line that writes the config: the JSON arrives intact
    line = next(x for x in text.splitlines() if x.startswith("printf"))
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    subprocess.run(["bash", "-c", line], env={"JOB_DIR": str(job_dir)}, check=True)
    written = json.loads((job_dir / "caption.json").read_text())
    assert written == conf
    loaded = config.parse(written).profile()
    assert loaded.caption.prompt == prompt and loaded.caption.fps == 1.5
    assert loaded.caption.media == "file" and loaded.caption.out is None
    assert '--shard "${SLURM_ARRAY_TASK_ID:?' in text and '/3"' in text
    assert 'exit "$rc"' in text
    assert "stay up" in oncluster.script("v", "o", 1, True, conf) and "--shard" not in oncluster.script(
        "v", "o", 1, True, conf
    )


def test_caption_path_and_out_dir() -> None:
    cfg = config.parse({"profiles": {"c": {"ssh": {"host": "x"}}, "d": {}}, "default_profile": "c"})
    assert oncluster.caption_path(cfg, "c", "c:~/data/v/") == "data/v"
    assert oncluster.caption_path(cfg, "c", "/abs/v") == "/abs/v"
    with pytest.raises(UsageError, match=r"profile 'd'"):
        oncluster.caption_path(cfg, "c", "d:/x")
    assert oncluster.cluster_out_dir(cfg, cfg.profile("c")) == "vidcap/captions/qwen3-omni"
    with pytest.raises(UsageError, match="needs a directory"):
        oncluster.caption_path(cfg, "c", "c:")


def test_a_task_slurm_forgot_ends_as_its_run_summary_says() -> None:
    unknown = JobStatus("5_1", JobState.UNKNOWN, reason="neither squeue nor sacct knows this job")
    done = oncluster._known(unknown, {"finished": "2026-11-24T10:00:00", "exit_code": 1})
    assert done.state is JobState.COMPLETED
    killed = oncluster._known(unknown, {"finished": "2026-11-24T10:00:00", "exit_code": 130})
    assert killed.state is JobState.FAILED
    assert oncluster._known(unknown, {"finished": None}).state is JobState.UNKNOWN
    running = JobStatus("5_1", JobState.RUNNING)
    assert oncluster._known(running, {"finished": "x", "exit_code": 0}) is running


def test_json_documents_survive_a_damaged_file() -> None:
    good = json.dumps({"run_id": "a", "server": {"job_id": "1_0"}}, indent=2)
    text = good + "\n{ not json\n" + good.replace('"a"', '"b"')
    assert [d["run_id"] for d in oncluster._json_documents(text)] == ["a", "b"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
