"""Parsing Slurm's answers (literal inputs)."""

from __future__ import annotations

import pytest

from vidcap.slurm_parse import JobState, parse_sacct, parse_sbatch, parse_squeue


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
