"""config.toml: lookup order, strict keys with suggestions, model tags, the example file."""

from __future__ import annotations

from pathlib import Path

import pytest

from vidcap import config
from vidcap.errors import ConfigError


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg, path = config.load()
    assert path is None
    assert cfg.profile().caption.concurrency == 64
    assert cfg.profile().server.model == config.DEFAULT_MODEL


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    user = config.user_config_dir() / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text('default_profile = "u"\n[profiles.u]\n')
    assert config.load()[1] == user
    Path("vidcap.toml").write_text('default_profile = "h"\n[profiles.h]\n')
    assert config.load()[0].default_profile == "h"
    explicit = tmp_path / "x.toml"
    explicit.write_text('default_profile = "x"\n[profiles.x]\n')
    assert config.load(explicit)[0].default_profile == "x"
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.toml")


def test_unknown_key_names_path_and_suggests() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse({"profiles": {"gpu": {"caption": {"concurency": 8}}}}, source="c.toml")
    msg = str(info.value)
    assert "profiles.gpu.caption.concurency" in msg
    assert "profiles.gpu.caption.concurrency" in msg


def test_wrong_type_is_clear() -> None:
    with pytest.raises(ConfigError, match=r"profiles\.a\.caption\.fps"):
        config.parse({"profiles": {"a": {"caption": {"fps": "fast"}}}})


def test_bad_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("profiles = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)


def test_example_config_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(config.example_text())
    cfg, _ = config.load(path)
    assert set(cfg.profiles) == {"cluster", "local"}


def test_unknown_profile() -> None:
    with pytest.raises(ConfigError, match="no profile named 'nope'"):
        config.Config().profile("nope")


@pytest.mark.parametrize(
    ("model", "tag"),
    [
        ("Qwen/Qwen3-Omni-30B-A3B-Instruct", "qwen3-omni"),
        ("Qwen/Qwen3-VL-8B-Instruct", "qwen3-vl"),
        ("Qwen/Qwen2.5-Omni-7B", "qwen2.5-omni"),
    ],
)
def test_model_tag(model: str, tag: str) -> None:
    assert config.model_tag(model) == tag


def test_config_hash_is_stable_and_sensitive() -> None:
    a = config.config_hash({"a": 1, "b": [1, 2]})
    assert a == config.config_hash({"b": [1, 2], "a": 1})
    assert a != config.config_hash({"a": 2, "b": [1, 2]})
