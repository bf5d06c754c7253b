"""The real single-node Slurm the job tests run against (tests/slurm.py): jobs are real processes, squeue,
scancel, arrays, two jobs at once, a GPU job that can never start, and sacct's final states."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from slurm import SlurmCluster, SlurmError, pids_with_env

pytestmark = pytest.mark.timeout(120)


def wait_for(predicate, timeout: float = 20, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_job_is_a_real_process_seen_by_squeue_and_cancelled(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    job = slurm_cluster.submit(
        f"#!/bin/bash\necho $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}\nexec sleep 300\n"
    )
    assert job.isdigit()
    assert slurm_cluster.wait_state(job, "RUNNING", timeout=15) == "RUNNING"
    started = time.monotonic() - t0
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the job's pid file"))

    # a real process: `sleep`, whose parent is slurmstepd
    assert comm(pid) == "sleep"
    assert comm(ppid(pid)).startswith("slurmstepd")
    queue = slurm_cluster.run("squeue", "-h", "-j", job, "-o", "%i|%T|%N|%P|%u").stdout.strip()
    assert queue == f"{job}|RUNNING|{slurm_cluster.node}|{slurm_cluster.partition}|root"

    slurm_cluster.cancel(job)
    assert slurm_cluster.wait_state(job, "CANCELLED", timeout=15) == "CANCELLED"
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=10, what="the job's process to end")
    assert slurm_cluster.squeue(job, "%T|%r") == "CANCELLED|None"
    print(f"submit -> RUNNING in {started:.2f} s; cluster start-up {slurm_cluster.timings}")


def test_output_file_and_job_environment(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "out dir" / "job-%j.out"
    out.parent.mkdir()
    script = '#!/bin/bash\necho "id=$SLURM_JOB_ID node=$SLURMD_NODENAME user=$(id -un) cwd=$PWD"\n'
    job = slurm_cluster.submit(script, f"--output={out}", f"--chdir={tmp_path}", "--job-name=envcheck")
    assert slurm_cluster.wait_state(job, "COMPLETED", timeout=20) == "COMPLETED"
    text = Path(str(out).replace("%j", job)).read_text()
    assert text == f"id={job} node={slurm_cluster.node} user=root cwd={tmp_path}\n"


def test_array_job_runs_every_task(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = f"#!/bin/bash\necho $SLURM_ARRAY_JOB_ID > {tmp_path}/task-$SLURM_ARRAY_TASK_ID\n"
    job = slurm_cluster.submit(script, "--array=0-2", f"--output={tmp_path}/%A_%a.out")
    for task in range(3):
        assert slurm_cluster.wait_state(f"{job}_{task}", "COMPLETED", timeout=20) == "COMPLETED"
    assert sorted(p.name for p in tmp_path.glob("task-*")) == ["task-0", "task-1", "task-2"]
    assert {p.read_text() for p in tmp_path.glob("task-*")} == {f"{job}\n"}

    def sacct_tasks() -> list[str] | None:
        out = slurm_cluster.run("sacct", "-X", "-P", "-n", "-j", job, "-o", "JobID,State").stdout
        return out.split() if out.count("COMPLETED") == 3 else None

    lines = wait_for(sacct_tasks, what="sacct to list the 3 tasks")
    assert sorted(lines) == [f"{job}_0|COMPLETED", f"{job}_1|COMPLETED", f"{job}_2|COMPLETED"]


def test_two_jobs_run_at_once(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    if slurm_cluster.cpus < 2:
        pytest.skip("one CPU: jobs run one at a time")
    # each job waits for the other's marker: both finish only if they run at the same time
    script = (
        f"#!/bin/bash\ntouch {tmp_path}/$1\n"
        f"for i in $(seq 200); do [[ -e {tmp_path}/$2 ]] && exit 0; sleep 0.05; done\nexit 1\n"
    )
    first = slurm_cluster.submit(script, "--cpus-per-task=1", "--mem=100M", script_args=["a", "b"])
    second = slurm_cluster.submit(script, "--cpus-per-task=1", "--mem=100M", script_args=["b", "a"])
    assert slurm_cluster.wait_state(first, "COMPLETED", timeout=20) == "COMPLETED"
    assert slurm_cluster.wait_state(second, "COMPLETED", timeout=20) == "COMPLETED"


def test_impossible_gpu_jobs_stay_pending_with_a_reason(slurm_cluster: SlurmCluster) -> None:
    requests = [
        ["--gres=gpu:h100:1"],
        ["--gres=gpu:1"],
        # what a real vLLM job asks for: more CPUs and memory than this node has
        ["--gres=gpu:h100:1", "--cpus-per-task=16", "--mem=200G", "--time=01:00:00"],
    ]
    jobs = [slurm_cluster.submit("#!/bin/bash\ntrue\n", *args) for args in requests]
    time.sleep(2)  # a few scheduler and backfill passes (sched_interval=1, bf_interval=1)
    reason = f"ReqNodeNotAvail, UnavailableNodes:{slurm_cluster.gpu_node}"
    assert [(slurm_cluster.state(j), slurm_cluster.reason(j)) for j in jobs] == [("PENDING", reason)] * 3
    with pytest.raises(SlurmError, match=r"job \d+ is PENDING \(ReqNodeNotAvail, UnavailableNodes:"):
        slurm_cluster.wait_state(jobs[0], "RUNNING", timeout=0.5)
    for job in jobs:
        slurm_cluster.cancel(job)
    assert [slurm_cluster.wait_state(j, "CANCELLED", timeout=10) for j in jobs] == ["CANCELLED"] * 3


@pytest.mark.parametrize(
    ("gres", "message"),
    [
        (
            "gpu:a100:1",
            "sbatch: error: Batch job submission failed: Requested node configuration is not available",
        ),
        (
            "gpu:h100:9",
            "sbatch: error: Batch job submission failed: Requested node configuration is not available",
        ),
        ("tpu:1", "sbatch: error: Invalid generic resource (gres) specification"),
    ],
)
def test_gres_no_node_could_ever_have_is_rejected_at_submit(
    slurm_cluster: SlurmCluster, gres: str, message: str
) -> None:
    with pytest.raises(SlurmError) as info:
        slurm_cluster.submit("#!/bin/bash\ntrue\n", f"--gres={gres}")
    assert message in str(info.value)


def test_sacct_reports_final_states(slurm_cluster: SlurmCluster) -> None:
    done = slurm_cluster.submit("#!/bin/bash\ntrue\n")
    failed = slurm_cluster.submit("#!/bin/bash\nexit 3\n")
    cancelled = slurm_cluster.submit("#!/bin/bash\nsleep 300\n")
    slurm_cluster.wait_state(cancelled, "RUNNING", timeout=15)
    slurm_cluster.cancel(cancelled)
    expected = {done: ("COMPLETED", "0:0"), failed: ("FAILED", "3:0"), cancelled: ("CANCELLED by 0", "0:0")}

    def records() -> dict[str, tuple[str, str]] | None:
        found = {job: slurm_cluster.sacct(job) for job in expected}
        got = {job: (r["State"], r["ExitCode"]) for job, r in found.items() if r}
        return got if got == expected else None

    wait_for(records, timeout=20, what=f"sacct to report {expected}")
    assert [slurm_cluster.state(job) for job in expected] == ["COMPLETED", "FAILED", "CANCELLED"]
    # the plain command, as vidcap runs it once a job has left the queue
    plain = slurm_cluster.run("sacct", "-X", "-P", "-n", "-j", failed, "-o", "JobID,State,ExitCode").stdout
    assert plain == f"{failed}|FAILED|3:0\n"


def test_sinfo_shows_the_node_and_the_gpu_gres(slurm_cluster: SlurmCluster) -> None:
    lines = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N|%P|%G|%c|%t").stdout.split()
    assert f"{slurm_cluster.node}|{slurm_cluster.partition}*|(null)|{slurm_cluster.cpus}|idle" in lines or (
        f"{slurm_cluster.node}|{slurm_cluster.partition}*|(null)|{slurm_cluster.cpus}|mix" in lines
    )
    # "down*": the never-up node has also stopped answering, which slurmctld notices after a while
    gpu = f"{slurm_cluster.gpu_node}|{slurm_cluster.partition}*|gpu:h100:8|64|down"
    assert gpu in lines or gpu + "*" in lines


def test_a_second_cluster_starts_beside_and_stops_without_strays(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    other = SlurmCluster(tmp_path / "other", cluster_name="vidcapother")
    other.start()
    try:
        assert not set(other.ports.values()) & set(slurm_cluster.ports.values())
        job = other.submit(f"#!/bin/bash\necho $$ > {tmp_path}/pid\nexec sleep 300\n")
        other.wait_state(job, "RUNNING", timeout=15)
        pid = int(wait_for(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text().strip()))
        daemons = [p.pid for p in other._procs.values()]
    finally:
        other.stop()
    assert [p for p in [pid, *daemons] if alive(p)] == []
    assert pids_with_env(f"SLURM_CONF={other.conf_path}".encode()) == []
    # the session's cluster did not notice
    job = slurm_cluster.submit("#!/bin/bash\ntrue\n")
    assert slurm_cluster.wait_state(job, "COMPLETED", timeout=15) == "COMPLETED"


def alive(pid: int) -> bool:
    """Running (not a zombie waiting for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
