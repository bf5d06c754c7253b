"""config.toml as pydantic models, the lookup order, and friendly validation errors.

Lookup: ``--config PATH`` (TOML; JSON when it ends in .json), then ``./vidcap.toml``, then
``<user config dir>/config.toml``; with none of them the embedded defaults apply (one profile, ``local``,
with no host). ``VIDCAP_HOME`` moves the user config and state dirs under one root, which is how tests
keep away from the real home.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vidcap.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_MODEL = "Qwen/Qwen3-Omni-30B-A3B-Instruct"
DEFAULT_PROMPT = (
    "Describe this video in detail: the setting, the people and objects, what happens in order, "
    "any text on screen, and what can be heard (speech, music, sounds). Write one paragraph."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SSHConfig(_Strict):
    host: str | None = Field(None, description="Login node; none means the local executor (no SSH).")
    user: str | None = None
    port: int = 22
    identity_file: str | None = None
    backend: Literal["sshtunnel", "openssh"] = "sshtunnel"
    jump: str | None = Field(None, description="ProxyJump host, e.g. user@bastion:22.")
    accept_new_host_key: bool = Field(False, description="Like StrictHostKeyChecking=accept-new.")
    known_hosts: str = Field("~/.ssh/known_hosts", description="Host keys are verified against this file.")
    config_file: str | None = Field(
        "~/.ssh/config", description="OpenSSH client config to read; none = ignore."
    )
    keepalive: int = Field(15, ge=0, description="Seconds between SSH keepalives; 0 = off.")
    connect_timeout: float = Field(15.0, gt=0)


class PathsConfig(_Strict):
    videos_dir: str = "datasets/videos"
    captions_dir: str = "vidcap/captions"
    work_dir: str = "vidcap"


class JobConfig(_Strict):
    partition: str | None = None
    gres: str | None = Field("gpu:1", description="Generic resources (--gres); empty = none.")
    time: str = "04:00:00"
    cpus: int = 16
    mem: str = "128G"
    setup: list[str] = Field(default_factory=list, description="Shell lines run before the server starts.")
    env: dict[str, str] = Field(default_factory=dict)


class ServerConfig(_Strict):
    model: str = DEFAULT_MODEL
    preset: str | None = Field(
        None, description="Model preset the job serves (presets.toml or [presets.NAME]); default: by model."
    )
    command: list[str] | None = Field(
        None, description="Replaces `vllm serve MODEL <preset args>` in the job (another launcher, tests)."
    )
    served_name: str | None = Field(None, description="Name the server answers to; default: model.")
    vllm_args: list[str] = Field(default_factory=list)
    url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")
    max_model_len: int = Field(32768, description="Used when the server does not report it.")
    local_vllm_port: int = 8000
    local_files_port: int = 8080


class SamplingConfig(_Strict):
    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int | None = None
    repetition_penalty: float | None = 1.05
    seed: int | None = 0
    max_tokens: int = 1024


class CaptionConfig(_Strict):
    prompt: str = DEFAULT_PROMPT
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    fps: float = Field(2.0, gt=0, le=30)
    max_pixels: int = Field(640 * 360, ge=32 * 32)
    window: float | None = Field(None, description="Force windows of this many seconds; none = planned.")
    overlap: float = Field(2.0, ge=0)
    concurrency: int = Field(64, ge=1, le=4096)
    media: Literal["file", "http", "inline"] = "file"
    audio: Literal["auto", "on", "off"] = "auto"
    extensions: list[str] = Field(
        default_factory=lambda: [".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts"]
    )
    out: str | None = Field(None, description="Output root; default captions/<model tag>.")
    request_timeout: float = Field(600.0, gt=0)
    max_attempts: int = Field(6, ge=1)
    retry_max_seconds: float = Field(900.0, gt=0, description="Give up retrying one request after this.")
    server_wait: float = Field(900.0, ge=0, description="How long to wait for a server that went away.")
    lock_wait: float = Field(
        0.0, ge=0, description="Wait this long for another run to release the output dir (0: fail at once)."
    )
    progress_interval: float = Field(
        10.0, ge=0, description="Rewrite the run summary this often while a run goes on (0: start and end)."
    )


class EndpointConfig(_Strict):
    """Where the GPU node's servers are, for servers vidcap did not start (its jobs find their own)."""

    node: str | None = Field(None, description="Host the login node reaches the servers at.")
    vllm_port: int | None = None
    files_port: int | None = None
    secrets_file: str | None = Field(
        None,
        description="Cluster path of a 0600 JSON file {api_key, files_token}; read over SSH, never logged.",
    )


class Profile(_Strict):
    ssh: SSHConfig = Field(default_factory=SSHConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)
    job: JobConfig = Field(default_factory=JobConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)


class Config(_Strict):
    default_profile: str = "local"
    profiles: dict[str, Profile] = Field(default_factory=lambda: {"local": Profile()})
    presets: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="User model presets, merged by name over the shipped ones."
    )

    def profile(self, name: str | None = None) -> Profile:
        key = name or self.default_profile
        if key not in self.profiles:
            known = ", ".join(sorted(self.profiles)) or "none"
            raise ConfigError(f"no profile named {key!r} (profiles: {known}); see 'vidcap config show'")
        return self.profiles[key]


def home_dir() -> Path | None:
    root = os.environ.get("VIDCAP_HOME")
    return Path(root) if root else None


def user_config_dir() -> Path:
    root = home_dir()
    return root / "config" if root else Path(platformdirs.user_config_dir("vidcap"))


def state_dir() -> Path:
    root = home_dir()
    return root / "state" if root else Path(platformdirs.user_state_dir("vidcap"))


def find_config_file(explicit: Path | None = None) -> Path | None:
    """The file that ``load`` reads, or None when the embedded defaults apply."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"config file {explicit} does not exist; create one with 'vidcap config init'")
        return explicit
    for candidate in (Path("vidcap.toml"), user_config_dir() / "config.toml"):
        if candidate.is_file():
            return candidate
    return None


def load(explicit: Path | None = None) -> tuple[Config, Path | None]:
    path = find_config_file(explicit)
    if path is None:
        return Config(), None
    try:
        text = path.read_text(encoding="utf-8")
        # JSON is what vidcap writes for its own jobs (a profile's caption settings carried to the cluster)
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return parse(data, source=str(path)), path


def parse(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from exc


def _explain(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            hint = _suggest(err["loc"])
            lines.append(f"{source}: unknown key '{loc}'" + (f" (did you mean '{hint}'?)" if hint else ""))
        else:
            lines.append(f"{source}: '{loc}': {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)


def _suggest(loc: tuple[Any, ...]) -> str | None:
    """The closest valid key at the same place, walking the models along the error's path."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        if model is Config and part == "profiles":
            model = "profiles"
            continue
        if model == "profiles":
            model = Profile
            continue
        field = model.model_fields.get(part) if isinstance(model, type) else None
        model = field.annotation if field is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return ".".join([*(str(p) for p in loc[:-1]), match[0]]) if match else None


def model_tag(model: str) -> str:
    """A short folder name for a model: 'Qwen/Qwen3-Omni-30B-A3B-Instruct' -> 'qwen3-omni'."""
    name = model.rstrip("/").split("/")[-1].lower()
    for suffix in ("-instruct", "-thinking", "-captioner"):
        name = name.removesuffix(suffix)
    parts = [p for p in name.split("-") if not (p[:-1].isdigit() and p[-1:] in ("b", "m")) and p != "a3b"]
    return "-".join(parts) or "model"


def config_hash(payload: dict[str, Any]) -> str:
    """Stable hash of everything that changes a caption; the resume key besides the video's size+mtime."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def example_text() -> str:
    """The commented example config shipped with the package (what 'vidcap config init' writes)."""
    return (Path(__file__).with_name("config.example.toml")).read_text(encoding="utf-8")
