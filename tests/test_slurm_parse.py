"""Parsing Slurm's answers (literal inputs)."""

from __future__ import annotations

import pytest

from vidcap import slurm_parse
from vidcap.slurm_parse import JobState, JobStatus, parse_sacct, parse_sbatch, parse_squeue


@pytest.mark.parametrize(
    ("out", "job"), [("123\n", "123"), ("456;cluster\n", "456"), ("Submitted\n789\n", "789")]
)
def test_sbatch(out: str, job: str) -> None:
    assert parse_sbatch(out) == job


@pytest.mark.parametrize("out", ["", "sbatch: error: Batch job submission failed: Invalid generic resource"])
def test_sbatch_error(out: str) -> None:
    with pytest.raises(ValueError):
        parse_sbatch(out)


def test_squeue_pending_with_reason_and_estimate() -> None:
    st = parse_squeue("41|PENDING|Resources||2026-11-24T10:00:00|0:00\n", "41")
    assert st is not None and st.state is JobState.PENDING and not st.state.finished
    assert st.describe() == "PENDING (Resources), est. start 2026-11-24T10:00:00"


def test_squeue_running_and_absent() -> None:
    st = parse_squeue("7|RUNNING|None|gpu042|2026-11-24T09:00:00|1:02\n", "7")
    assert st is not None and st.describe() == "RUNNING on gpu042"
    assert parse_squeue("", "7") is None
    assert parse_squeue("8|RUNNING|None|n|x|1:00\n", "7") is None


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("COMPLETED", JobState.COMPLETED),
        ("CANCELLED by 0", JobState.CANCELLED),
        ("FAILED", JobState.FAILED),
        ("OUT_OF_MEMORY", JobState.OUT_OF_MEMORY),
        ("weird", JobState.UNKNOWN),
    ],
)
def test_sacct_states(state: str, expected: JobState) -> None:
    st = parse_sacct(f"9|{state}|None|n1|2026-11-24T09:00:00|00:01:00|0:0\n", "9")
    assert st is not None and st.state is expected
    # an unknown word is not taken as the end of the job: wait's timeout bounds it instead
    assert st.state.finished == (expected is not JobState.UNKNOWN)


def test_an_array_is_summed_up_from_its_tasks() -> None:
    squeue = (
        "123_0|RUNNING|None|n1|2026-01-01T00:00:00|1:00\n"
        "123_1|PENDING|Resources|||0:00\n"
        "1234_5|RUNNING|None|n2||0:01\n"
    )
    tasks = slurm_parse.array_tasks(squeue, "123", 6)
    assert [t.job_id for t in tasks] == ["123_0", "123_1"]  # not 1234_5
    whole = slurm_parse.array_status("123", tasks)
    assert whole.job_id == "123" and whole.state is JobState.RUNNING and whole.reason == "0/2 tasks completed"
    sacct = "123_0|COMPLETED|None|n1|x|1:00|0:0\n123_1|CANCELLED by 0|None|n1|x|0:30|0:15\n"
    whole = slurm_parse.array_status("123", slurm_parse.array_tasks(sacct, "123", 7))
    assert whole.state is JobState.CANCELLED and whole.state.finished
    done = slurm_parse.array_status(
        "9", [JobStatus("9_0", JobState.COMPLETED), JobStatus("9_1", JobState.COMPLETED)]
    )
    assert done.state is JobState.COMPLETED and done.reason == "2/2 tasks completed"
    one = slurm_parse.array_status("7", [JobStatus("7_3", JobState.FAILED, exit_code="1:0")])
    assert (one.job_id, one.state, one.exit_code) == ("7", JobState.FAILED, "1:0")
