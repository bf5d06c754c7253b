"""The parts of the job lifecycle that need no cluster: records, endpoint files, preset choice, and the
endpoint section of a profile."""

from __future__ import annotations

import json

import pytest

from vidcap import jobs, jobstate, remote
from vidcap.config import parse
from vidcap.errors import ConfigError, UsageError


def record(job_id: str, profile: str = "cluster", submitted: str = "2026-11-24T10:00:00+00:00"):
    return jobstate.JobRecord(
        id=job_id,
        profile=profile,
        executor="slurm",
        preset="qwen3-omni",
        model="qwen3-omni",
        name="vidcap-qwen3-omni",
        job_dir=f"vidcap/jobs/{job_id}",
        log=f"vidcap/jobs/{job_id}.log",
        submitted=submitted,
    )


def test_records_are_private_sorted_and_filtered_by_profile() -> None:
    jobstate.save_record(record("12", submitted="2026-11-24T10:00:02+00:00"))
    jobstate.save_record(record("11", submitted="2026-11-24T10:00:01+00:00"))
    jobstate.save_record(record("13", profile="other"))
    (jobstate.records_dir() / "junk.json").write_text("{not json")
    assert [r.id for r in jobstate.load_records("cluster")] == ["11", "12"]
    assert {r.id for r in jobstate.load_records()} == {"11", "12", "13"}
    assert jobstate.find_record("13").profile == "other"  # type: ignore[union-attr]
    assert jobstate.find_record("99") is None
    for path in jobstate.records_dir().glob("1*.json"):
        assert path.stat().st_mode & 0o777 == 0o600


def test_endpoint_files_are_parsed_and_foreign_ones_ignored() -> None:
    text = json.dumps(
        {"node": "gpu7", "vllm_port": 4001, "files_port": 4002, "model": "m", "started": "t", "job_id": "5"}
    )
    ep = jobs.parse_endpoint("5", "w/jobs/5", text.encode())
    assert ep is not None and (ep.node, ep.vllm_port, ep.files_port, ep.model) == ("gpu7", 4001, 4002, "m")
    assert ep.secrets_path == "w/jobs/5/secrets.json"
    assert "secrets_path" not in ep.to_dict() and "secrets_path" not in repr(ep)
    assert jobs.parse_endpoint("5", "w", b"{}") is None
    assert jobs.parse_endpoint("5", "w", b"not json") is None


def test_the_preset_is_chosen_by_name_then_by_model_else_plain_vllm_serve() -> None:
    cfg = parse({"profiles": {"a": {"server": {"model": "Qwen/Qwen3-VL-8B-Instruct"}}}})
    assert jobs.choose_preset(cfg, cfg.profile("a")).name == "qwen3-vl-8b"
    cfg = parse({"profiles": {"a": {"server": {"preset": "qwen2.5-omni-7b"}}}})
    assert jobs.choose_preset(cfg, cfg.profile("a")).model == "Qwen/Qwen2.5-Omni-7B"
    cfg = parse({"profiles": {"a": {"server": {"model": "org/other", "max_model_len": 8192}}}})
    custom = jobs.choose_preset(cfg, cfg.profile("a"))
    assert (custom.name, custom.model, custom.vllm_args, custom.max_model_len) == (
        "custom",
        "org/other",
        (),
        8192,
    )
    cfg = parse({"profiles": {"a": {"server": {"preset": "nope"}}}})
    with pytest.raises(ConfigError, match="no preset 'nope'"):
        jobs.choose_preset(cfg, cfg.profile("a"))
    cfg = parse(
        {
            "presets": {"mine": {"model": "org/m", "max_model_len": 4096}},
            "profiles": {"a": {"server": {"preset": "mine"}}},
        }
    )
    assert jobs.choose_preset(cfg, cfg.profile("a")).model == "org/m"


def test_a_half_written_endpoint_section_is_a_usage_error() -> None:
    cfg = parse({"profiles": {"a": {"ssh": {"host": "h"}, "endpoint": {"node": "gpu1"}}}})
    with pytest.raises(UsageError, match="incomplete"):
        remote.locate(object(), cfg, "a")
    cfg = parse(
        {
            "profiles": {
                "a": {
                    "ssh": {"host": "h"},
                    "endpoint": {"node": "gpu1", "vllm_port": 1, "files_port": 2, "secrets_file": "s.json"},
                }
            }
        }
    )
    located = remote.locate(object(), cfg, "a")  # named by hand: no cluster query at all
    assert [t.spec() for t in located.targets] == ["vllm=8000:gpu1:1", "files=8080:gpu1:2"]
    assert located.secrets_path == "s.json" and located.job_id is None


def test_a_preset_without_audio_turns_auto_audio_off_and_names_the_output(tmp_path) -> None:
    from vidcap import options

    cfg = parse({"profiles": {"local": {"server": {"preset": "qwen3-vl-8b"}}}})
    resolved = options.resolve(cfg, options.Settings(source=str(tmp_path), server="http://127.0.0.1:1/v1"))
    assert resolved.job.audio == "off"
    assert resolved.job.out.name == "qwen3-vl"
    forced = options.resolve(cfg, options.Settings(source=str(tmp_path), server="http://x:1/v1", audio="on"))
    assert forced.job.audio == "on"  # what the user asks for explicitly is kept
    omni = options.resolve(parse({}), options.Settings(source=str(tmp_path), server="http://x:1/v1"))
    assert (omni.job.audio, omni.job.out.name) == ("auto", "qwen3-omni")


def test_error_messages_keep_square_brackets(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    vidcap = str(Path(sys.executable).parent / "vidcap")
    missing = tmp_path / "videos [sender] [::1]"
    res = subprocess.run([vidcap, "caption", str(missing)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert f"source {missing} is not a directory" in res.stderr


class _Cluster:
    """Just enough of an Executor for discovery: running jobs and their endpoint files."""

    kind = "slurm"

    def __init__(self, endpoints: dict[str, dict]) -> None:
        self.endpoints = endpoints

    def running_ids(self) -> list[str]:
        return list(self.endpoints)

    def statuses(self, recs: list) -> dict:
        from vidcap.slurm_parse import JobState, JobStatus

        return {r.id: JobStatus(r.id, JobState.RUNNING) for r in recs}

    def read(self, path: str) -> bytes | None:
        job_id = path.split("/")[-2]
        data = self.endpoints.get(job_id)
        return None if data is None else json.dumps(data).encode()


def _ep(job_id: str, started: str, model: str = "qwen3-omni") -> dict:
    return {
        "node": "n1",
        "vllm_port": 1,
        "files_port": 2,
        "model": model,
        "started": started,
        "job_id": job_id,
    }


def test_replicas_are_the_newest_array_s_ready_tasks() -> None:
    from vidcap import jobs
    from vidcap.config import Profile

    profile = Profile()
    cluster = _Cluster(
        {
            "7": _ep("7", "2026-11-24T09:00:00"),
            "9_0": _ep("9_0", "2026-11-24T10:00:01"),
            "9_1": _ep("9_1", "2026-11-24T10:00:00"),
            "9_2": _ep("9_2", "2026-11-24T10:00:02", model="other"),
        }
    )
    found = jobs.discover_replicas(cluster, profile, None, "qwen3-omni")  # type: ignore[arg-type]
    assert [ep.job_id for ep in found] == ["9_0", "9_1"]  # siblings serving the same model
    assert [ep.job_id for ep in jobs.discover_replicas(cluster, profile, "9", None)] == ["9_0", "9_1", "9_2"]
    assert [ep.job_id for ep in jobs.discover_replicas(cluster, profile, "7", None)] == ["7"]
    del cluster.endpoints["9_0"], cluster.endpoints["9_1"], cluster.endpoints["9_2"]
    assert [ep.job_id for ep in jobs.discover_replicas(cluster, profile, None, "qwen3-omni")] == ["7"]
