"""`vidcap doctor` against the real parts: sshd as the login node of a real Slurm (slurm_sshd), a changed
host key, a local job serving the stand-in; the pure parsers with literal Slurm output."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sshd import venv_bin

from slurm import kill_local_job
from vidcap import __version__, doctor, slurm_parse
from vidcap.config import parse
from vidcap.doctor import Check
from vidcap.slurm_parse import Gres, NodeGroup

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
VIDCAP = str(Path(sys.executable).parent / "vidcap")
HOSTILE = "dir 'q' \"d\" $(touch pwned) %x"
# Setup lines as a user writes them: activate the environment (here: this venv), and some noise.
SETUP = [
    f'export PATH="{venv_bin()}:$PATH"',
    "echo \"setup says: it's $(echo fine)\"; echo 'to stderr' >&2",
]


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)  # JSON strings, numbers, booleans and lists of them are valid TOML


def write_config(path: Path, profiles: dict[str, dict[str, dict[str, Any]]], default: str) -> Path:
    lines = [f"default_profile = {toml_value(default)}"]
    for name, tables in profiles.items():
        for table, values in tables.items():
            lines.append(f"[profiles.{name}.{table}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cluster_profile(sshd: Any, work: Path, **job: Any) -> dict[str, dict[str, Any]]:
    ssh = sshd.ssh_config().model_dump()
    videos = work.parent / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    return {
        "ssh": ssh,
        "paths": {"work_dir": str(work), "videos_dir": str(videos), "captions_dir": str(work / "captions")},
        "job": {"partition": "debug", "gres": "gpu:h100:1", "setup": SETUP, **job},
    }


def by_name(rows: list[Check] | list[dict[str, Any]]) -> dict[str, Any]:
    return {(r.name if isinstance(r, Check) else r["name"]): r for r in rows}


def statuses(rows: list[Check]) -> dict[str, str]:
    return {r.name: r.status for r in rows}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path / f"work {HOSTILE}"


# -- a cluster profile, end to end ------------------------------------------------------------------------


def test_a_good_cluster_profile_through_the_cli(slurm_sshd: Any, work: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "vidcap.toml", {"hpc": cluster_profile(slurm_sshd, work)}, "hpc")
    done = subprocess.run(
        [VIDCAP, "doctor", "--json", "--config", str(cfg)], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 1, done.stderr  # vLLM is not installed here: the one failing row
    rows = json.loads(done.stdout)
    assert [r["name"] for r in rows] == list(doctor.ROWS)
    assert all(set(r) == {"name", "status", "detail", "fix"} for r in rows)
    assert all(r["fix"] for r in rows if r["status"] in ("fail", "warn"))
    got = by_name(rows)
    assert {k: r["status"] for k, r in got.items()} == {
        "config": "ok",
        "ssh": "ok",
        "vidcap": "ok",
        "vllm": "fail",
        "paths": "ok",
        "partition": "ok",
        "gpu": "warn",
        "jobs": "warn",
        "tunnel": "warn",
        "server": "skip",
    }
    assert str(cfg) in got["config"]["detail"]
    assert f"vidcap {__version__} at {venv_bin()}/vidcap" in got["vidcap"]["detail"]
    assert "the GPU nodes may differ" in got["vidcap"]["detail"]
    assert "cannot import vllm" in got["vllm"]["detail"]
    assert got["vllm"]["fix"].startswith("install vLLM in the environment your job.setup lines activate")
    assert got["partition"]["detail"].startswith("debug (job.partition): up")
    assert "gpunode-never-up (1 down" in got["gpu"]["detail"]
    assert "sinfo -R -p debug" in got["gpu"]["fix"]
    assert got["jobs"]["fix"] == "vidcap job submit -p hpc && vidcap job wait -p hpc"
    assert got["tunnel"]["fix"] == "vidcap tunnel up -p hpc"
    assert got["server"]["detail"] == "no running job"

    table = subprocess.run(
        [VIDCAP, "doctor", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert table.returncode == 1
    lines = [line for line in table.stdout.splitlines() if "│" in line]
    vllm = next(line for line in lines if line.startswith("│ vllm"))
    assert "fail" in vllm and "install vLLM in the environment your job.setup lines activate" in vllm


def test_the_partition_and_the_gpus_the_profile_asks_for(slurm_sshd: Any, work: Path, tmp_path: Path) -> None:
    cases = {
        "nopart": {"partition": "no-such-partition"},
        "default": {"partition": None},
        "othergpu": {"gres": "gpu:a100:1"},
        "toomany": {"gres": "gpu:h100:9"},
        "nogpu": {"gres": ""},
    }
    profiles = {name: cluster_profile(slurm_sshd, work, **job) for name, job in cases.items()}
    parsed = parse(
        {
            "default_profile": "nopart",
            "profiles": {
                n: {k: {a: b for a, b in v.items() if b is not None} for k, v in p.items()}
                for n, p in profiles.items()
            },
        }
    )
    with ThreadPoolExecutor(len(cases)) as pool:  # independent logins: at once, to keep the test short
        found = pool.map(lambda name: by_name(doctor.run_checks(parsed, name, None)), cases)
        got = dict(zip(cases, found, strict=True))

    part = got["nopart"]["partition"]
    assert part.status == "fail" and "'no-such-partition' is not a partition" in part.detail
    assert part.fix.endswith("one of: debug* (* = the default)")
    assert got["nopart"]["gpu"].status == "skip"

    assert got["default"]["partition"].status == "ok"
    assert got["default"]["partition"].detail.startswith(
        "debug (the cluster's default; job.partition is not set)"
    )
    assert got["default"]["gpu"].status == "warn"

    other = got["othergpu"]["gpu"]
    assert other.status == "fail" and "no node in debug offers gpu:a100:1" in other.detail
    assert "gpu:h100:8 on 1 down" in other.detail and "(e.g. gpu:h100:1)" in other.fix
    assert got["toomany"]["gpu"].status == "fail"
    assert got["nogpu"]["gpu"].status == "warn" and "asks for no GPU" in got["nogpu"]["gpu"].detail
    for rows in got.values():  # the rest of the report is the same whatever the Slurm rows say
        assert (rows["config"].status, rows["ssh"].status, rows["vidcap"].status) == ("ok", "ok", "ok")


# -- SSH ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["changed", "unknown"])
def test_a_host_key_that_is_not_known_fails_ssh_and_skips_the_cluster_rows(
    sshd_server: Any, work: Path, tmp_path: Path, case: str
) -> None:
    cfg = write_config(tmp_path / "vidcap.toml", {"hpc": cluster_profile(sshd_server, work)}, "hpc")
    if case == "changed":
        sshd_server.rotate_host_key()
    else:
        sshd_server.known_hosts.write_text("")
    rows = doctor.diagnose(cfg, None)
    got = by_name(rows)
    ssh = got["ssh"]
    assert ssh.status == "fail"
    assert ssh.fix.startswith("check the fingerprint with your admins, then ")
    if case == "changed":
        assert "CHANGED" in ssh.detail and "ssh-keygen -R" in ssh.fix
    else:
        assert "accept_new_host_key = true under [profiles.hpc.ssh]" in ssh.fix
    for name in ("vidcap", "vllm", "partition", "gpu", "jobs", "server"):
        assert (got[name].status, got[name].detail) == ("skip", "no SSH")
    assert got["config"].status == "ok" and got["tunnel"].status == "warn"


def test_a_login_node_that_does_not_answer(sshd_server: Any, work: Path, tmp_path: Path) -> None:
    profile = cluster_profile(sshd_server, work)
    sshd_server.stop()
    cfg = write_config(tmp_path / "vidcap.toml", {"hpc": profile}, "hpc")
    ssh = by_name(doctor.diagnose(cfg, "hpc"))["ssh"]
    assert ssh.status == "fail" and f"127.0.0.1:{sshd_server.port}" in ssh.detail
    assert f"ssh -p {sshd_server.port}" in ssh.fix


# -- config ---------------------------------------------------------------------------------------------


def test_config_problems_are_rows_too(tmp_path: Path) -> None:
    rows = doctor.diagnose(tmp_path / "missing.toml", None)
    assert statuses(rows) == {"config": "fail", **{n: "skip" for n in doctor.ROWS[1:]}}
    assert "does not exist" in rows[0].detail

    cfg = write_config(tmp_path / "vidcap.toml", {"here": {"job": {"env": {"JOB_DIR": "x"}}}}, "here")
    assert doctor.diagnose(cfg, "nope")[0].fix == "use -p with one of: here"
    rows = doctor.diagnose(cfg, None)
    config = by_name(rows)["config"]
    assert config.status == "fail" and "job.env: JOB_DIR is set by the job script itself" in config.detail
    assert by_name(rows)["jobs"].status == "warn"  # the other rows still ran


def test_a_setup_line_that_fails_is_reported_as_the_job_would_stop_there(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "vidcap.toml",
        {"here": {"job": {"setup": ["echo starting", "module load no-such-module-xyz"]}}},
        "here",
    )
    got = by_name(doctor.diagnose(cfg, None))
    for name in ("vidcap", "vllm"):
        assert got[name].status == "fail"
        assert "the job.setup lines failed on this machine (exit 127)" in got[name].detail
        assert "module" in got[name].detail


# -- the local executor ---------------------------------------------------------------------------------


def local_profile(work: Path, videos: Path) -> dict[str, dict[str, Any]]:
    return {
        "paths": {"work_dir": str(work), "videos_dir": str(videos)},
        "job": {"setup": [*SETUP, f"export PYTHONPATH={json.dumps(str(REPO))}"]},
        "server": {
            "command": [sys.executable, "-m", "tests.standin.server"],
            "served_name": "qwen3-omni",
            "local_vllm_port": 1,
        },
    }


def test_a_local_profile_skips_the_slurm_rows(work: Path, tmp_path: Path) -> None:
    (tmp_path / "videos").mkdir()
    cfg = write_config(tmp_path / "vidcap.toml", {"box": local_profile(work, tmp_path / "videos")}, "box")
    got = by_name(doctor.diagnose(cfg, None))
    assert {n: got[n].status for n in ("ssh", "partition", "tunnel", "server")} == {
        "ssh": "skip",
        "partition": "skip",
        "tunnel": "skip",
        "server": "skip",
    }
    assert got["vidcap"].status == "ok" and "on this machine" in got["vidcap"].detail
    assert got["vllm"].status == "ok" and f"server.command runs {sys.executable}" in got["vllm"].detail
    assert got["gpu"].status == ("fail" if shutil.which("nvidia-smi") is None else got["gpu"].status)
    assert got["jobs"].fix == "vidcap job submit -p box --local && vidcap job wait -p box --local"


@pytest.fixture
def local_job(work: Path, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A local job serving the stand-in; cancelled and its processes gone afterwards."""
    (tmp_path / "videos").mkdir()
    cfg = write_config(tmp_path / "vidcap.toml", {"box": local_profile(work, tmp_path / "videos")}, "box")
    env = {**os.environ, "VIDCAP_READY_TIMEOUT": "60"}
    done = subprocess.run(
        [VIDCAP, "job", "submit", "--local", "--json", "--config", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)["record"]
    try:
        wait = subprocess.run(
            [VIDCAP, "job", "wait", "--local", "--timeout", "60", "--poll", "0.2", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert wait.returncode == 0, wait.stderr + (work / "jobs" / f"{record['id']}.log").read_text()
        yield cfg, record["id"]
    finally:
        subprocess.run(
            [VIDCAP, "job", "cancel", "--local", "--config", str(cfg)], capture_output=True, timeout=30
        )
        pid = int(record["pid"])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        kill_local_job(record["id"])  # whatever the cancel left: the servers run in their own groups


def test_a_running_local_job_and_its_server(local_job: tuple[Path, str]) -> None:
    cfg, job_id = local_job
    got = by_name(doctor.diagnose(cfg, None))
    assert got["jobs"].status == "ok"
    assert got["jobs"].detail.startswith(
        f"1 running vidcap job(s) for this profile: {job_id} (qwen3-omni on "
    )
    server = got["server"]
    assert server.status == "ok" and server.detail.startswith(
        f"job {job_id}: /health 200 and /v1/models lists"
    )
    secrets = json.loads(next(Path(cfg.parent).rglob("secrets.json")).read_text())
    report = json.dumps([r.to_dict() for r in got.values()])
    assert secrets["api_key"] not in report and secrets["files_token"] not in report


# -- pure parts -----------------------------------------------------------------------------------------


def test_gres_is_parsed_as_slurm_writes_it() -> None:
    assert slurm_parse.parse_gres("gpu:h100:8(S:0-1),shard:4") == (
        Gres("gpu", "h100", 8),
        Gres("shard", None, 4),
    )
    assert slurm_parse.parse_gres("gpu:4(S:0,1)") == (Gres("gpu", None, 4),)
    assert slurm_parse.parse_gres("gpu") == (Gres("gpu", None, 1),)
    assert slurm_parse.parse_gres("gpu:a100-sxm4-80gb") == (Gres("gpu", "a100-sxm4-80gb", 1),)
    assert slurm_parse.parse_gres("mps:2K") == (Gres("mps", None, 2048),)
    assert slurm_parse.parse_gres("(null)") == ()
    for bad in ("gpu:a:b:1", ":1", "gpu::1"):
        with pytest.raises(ValueError):
            slurm_parse.parse_gres(bad)


def test_sinfo_lines_and_what_a_node_can_hold() -> None:
    text = (
        "gpu*|up|gpu:h100:8(S:0-1)|3|mix|g[01-03]\n"
        "gpu*|up|gpu:h100:8(S:0-1)|1|drain*|g04\n"
        "cpu|down|(null)|10|idle~|c[01-10]\n"
        "garbage line\n"
    )
    groups = slurm_parse.parse_sinfo(text)
    assert groups[0] == NodeGroup("gpu", True, "up", (Gres("gpu", "h100", 8),), 3, "mix", "g[01-03]")
    assert [g.usable for g in groups] == [True, False, True]
    assert slurm_parse.offers(groups[0].gres, slurm_parse.parse_gres("gpu:H100:2"))
    assert slurm_parse.offers(groups[0].gres, slurm_parse.parse_gres("gpu:8"))
    assert not slurm_parse.offers(groups[0].gres, slurm_parse.parse_gres("gpu:h100:9"))
    assert not slurm_parse.offers(groups[2].gres, slurm_parse.parse_gres("gpu:1"))


def test_probe_lines_survive_setup_noise_and_stdin_readers() -> None:
    profile = parse(
        {"profiles": {"p": {"job": {"setup": ["printf 'no newline'", "cat >/dev/null", *SETUP]}}}}
    ).profile("p")
    done = subprocess.run(
        ["bash", "-c", doctor._RUN_STDIN],
        input=doctor.probe_script(profile).encode(),
        capture_output=True,
        timeout=60,
    )
    probes = doctor.parse_probes(done.stdout)
    assert probes["vidcap"] == doctor.Probe(0, f"vidcap {__version__}")
    assert probes["vidcap_path"] == doctor.Probe(0, f"{venv_bin()}/vidcap")
    assert probes["vllm"].rc == 1 and "No module named 'vllm'" in probes["vllm"].out


# -- a Slurm job through the login node -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_running_slurm_job_its_server_and_the_tunnel(
    slurm_sshd: Any, slurm_cluster: Any, work: Path, tmp_path: Path
) -> None:
    (tmp_path / "videos").mkdir()
    profile = cluster_profile(slurm_sshd, work, gres="", cpus=1, mem="1G")
    profile["paths"]["videos_dir"] = str(tmp_path / "videos")
    profile["job"]["setup"] = [*SETUP, f"export PYTHONPATH={json.dumps(str(REPO))}"]
    profile["server"] = {
        "command": [sys.executable, "-m", "tests.standin.server"],
        "served_name": "qwen3-omni",
        "local_vllm_port": free_port(),
        "local_files_port": free_port(),
    }
    cfg = write_config(tmp_path / "vidcap.toml", {"hpc": profile}, "hpc")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [VIDCAP, *args, "--config", str(cfg)], capture_output=True, text=True, timeout=90
        )

    submitted = cli("job", "submit", "--json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    try:
        wait = cli("job", "wait", "--timeout", "60", "--poll", "0.3")
        assert wait.returncode == 0, wait.stderr
        got = by_name(doctor.diagnose(cfg, None))
        assert got["jobs"].status == "ok" and f"{job_id} (qwen3-omni on " in got["jobs"].detail
        assert got["server"].status == "ok" and got["server"].detail.startswith(f"job {job_id}: /health 200")
        assert got["tunnel"].status == "warn"
        up = cli("tunnel", "up")
        assert up.returncode == 0, up.stderr
        tunnel = by_name(doctor.diagnose(cfg, None))["tunnel"]
        assert tunnel.status == "ok" and tunnel.detail.endswith("every forward answers")
    finally:
        cli("tunnel", "down")
        cli("job", "cancel", job_id)
        slurm_cluster.wait_state(job_id, "CANCELLED", timeout=30)


def test_a_cluster_vidcap_without_the_guard_is_named_too_old() -> None:
    """An old vidcap passes --version but has no vidcap-guard: the job would fail at start; doctor says so."""
    profile = parse({"profiles": {"p": {}}}).profile("p")
    lines = [
        f"{doctor._MARK} vidcap_path 0 /opt/old/bin/vidcap",
        f"{doctor._MARK} vidcap 0 vidcap {__version__}",
        f"{doctor._MARK} guard 1 ",
        f"{doctor._MARK} python 0 /usr/bin/python3",
        f"{doctor._MARK} vllm 0 0.11.0",
        f"{doctor._MARK} server 0 /opt/bin/vllm",
    ]
    rows = doctor.environment_rows(profile, "p", "\n".join(lines).encode(), b"", 0, "on the login node")
    vidcap_row = next(r for r in rows if r.name == "vidcap")
    assert vidcap_row.status == "fail" and "no vidcap-guard" in vidcap_row.detail
    assert "upgrade" in vidcap_row.fix
    good = [line.replace("guard 1 ", "guard 0 /opt/old/bin/vidcap-guard") for line in lines]
    rows = doctor.environment_rows(profile, "p", "\n".join(good).encode(), b"", 0, "on the login node")
    assert next(r for r in rows if r.name == "vidcap").status == "ok"


def test_the_paths_row_names_a_missing_videos_dir(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    paths = {"videos_dir": str(videos), "captions_dir": str(tmp_path / "new" / "captions")}
    profile = parse({"profiles": {"p": {"paths": {**paths, "work_dir": str(tmp_path / "w")}}}}).profile("p")
    row = doctor._paths_row(profile, "p", "on this machine", None)
    assert row.status == "fail" and str(videos) in row.detail and "paths.videos_dir" in (row.fix or "")
    videos.mkdir()
    row = doctor._paths_row(profile, "p", "on this machine", None)
    assert row.status == "ok" and "captions_dir" in row.detail  # not there yet, but creatable
    assert not (tmp_path / "new").exists()  # the check creates nothing
