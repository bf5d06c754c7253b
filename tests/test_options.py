"""Profile + command-line options -> CaptionJob and Endpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from vidcap import config, options
from vidcap.errors import UsageError


def cfg(**caption: object) -> config.Config:
    return config.parse({"profiles": {"local": {"caption": caption}}})


def test_defaults_come_from_the_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = options.resolve(cfg(concurrency=7, media="inline"), options.Settings(source=str(tmp_path)))
    job, endpoint = r.job, r.endpoint
    assert job.concurrency == 7 and job.media == "inline"
    assert job.out == (tmp_path / "captions" / "qwen3-omni").resolve()
    assert endpoint.base_url == "http://127.0.0.1:8000/v1"
    assert endpoint.api_key is None


def test_flags_override_the_profile(tmp_path: Path) -> None:
    s = options.Settings(
        source=str(tmp_path),
        concurrency=3,
        media="file",
        audio="off",
        shard="1/4",
        server="http://h:9000",
        out=tmp_path / "o",
        window=30.0,
    )
    r = options.resolve(cfg(concurrency=7, media="inline"), s)
    job, endpoint = r.job, r.endpoint
    assert (job.concurrency, job.media, job.audio, job.shard, job.window) == (3, "file", "off", (1, 4), 30.0)
    assert endpoint.base_url == "http://h:9000/v1"


def test_prompt_from_file_and_api_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "p.txt").write_text("  Say what happens.\n")
    (tmp_path / "key").write_text("sk-secret\n")
    s = options.Settings(source=str(tmp_path), prompt=f"@{tmp_path / 'p.txt'}", api_key_file=tmp_path / "key")
    r = options.resolve(cfg(), s)
    job, endpoint = r.job, r.endpoint
    assert job.prompt == "Say what happens."
    assert endpoint.api_key == "sk-secret"
    assert "sk-secret" not in repr(endpoint)
    monkeypatch.setenv("VIDCAP_API_KEY", "from-env")
    assert options.resolve(cfg(), options.Settings(source=str(tmp_path))).endpoint.api_key == "from-env"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"media": "pigeon"}, "--media"),
        ({"audio": "loud"}, "--audio"),
        ({"shard": "4/4"}, "--shard"),
        ({"prompt": "@/nonexistent/prompt"}, "prompt file"),
        ({"prompt": "   "}, "empty"),
        ({"media": "http"}, "cluster source"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path: Path, settings: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        options.resolve(cfg(), options.Settings(source=str(tmp_path), **settings))  # type: ignore[arg-type]


def test_remote_source_is_recognised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    c = config.parse({"profiles": {"cluster": {"ssh": {"host": "login"}}}, "default_profile": "cluster"})
    resolved = options.resolve(c, options.Settings(source="cluster:datasets/videos"))
    assert resolved.remote == ("cluster", "datasets/videos") and resolved.endpoint is None
    assert resolved.job.source == "cluster:datasets/videos"
    # a local directory whose name has a colon is still local
    (tmp_path / "cluster:x").mkdir()
    job = options.resolve(c, options.Settings(source="cluster:x")).job
    assert job.source == (tmp_path / "cluster:x").resolve()
