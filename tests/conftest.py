"""Shared fixtures: an isolated VIDCAP_HOME for every test, and the video corpus built once."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import videos

pytest_plugins = ["sshd", "slurm", "jobsite"]  # real sshd and Slurm; `site` (tests/jobsite.py)


@pytest.fixture(autouse=True)
def _vidcap_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tests never touch the real home: every state and config path goes under a temp dir."""
    home = tmp_path_factory.mktemp("vidcap-home")
    monkeypatch.setenv("VIDCAP_HOME", str(home))
    monkeypatch.delenv("VIDCAP_API_KEY", raising=False)
    return home


@pytest.fixture(scope="session")
def corpus_template(tmp_path_factory: pytest.TempPathFactory) -> videos.Corpus:
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is required for the video fixtures (apt-get install ffmpeg)")
    return videos.build_corpus(tmp_path_factory.mktemp("corpus-template") / "videos", long=False)


@pytest.fixture
def corpus(corpus_template: videos.Corpus, tmp_path: Path) -> videos.Corpus:
    """A private copy of the corpus (symlinks kept as links) so that tests may change it."""
    root = tmp_path / "videos with 'quotes' $(x)"
    shutil.copytree(corpus_template.root, root, symlinks=True)
    return videos.Corpus(**{**corpus_template.__dict__, "root": root})


def require_integration(what: str) -> None:
    """Skip loudly locally; in CI (VIDCAP_REQUIRE_INTEGRATION=1) a missing part is a failure."""
    if os.environ.get("VIDCAP_REQUIRE_INTEGRATION") == "1":
        pytest.fail(f"{what} is required in CI but missing")
    pytest.skip(f"SKIPPED LOUDLY: {what} is missing on this machine")
