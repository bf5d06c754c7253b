"""The output contract: the caption record (schema vidcap.caption/1), the failure line, the run summary."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA = "vidcap.caption/1"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class VideoInfo(_Record):
    path: str = Field(description="Path relative to the captioned directory, '/'-separated.")
    size: int
    mtime: float
    duration_s: float
    fps: float
    width: int
    height: int
    has_audio: bool | None = Field(description="None when audio was not probed (--audio off).")
    vfr: bool = False


class ServerInfo(_Record):
    url: str | None = None
    vllm_version: str | None = None
    job_id: str | None = None


class PromptInfo(_Record):
    text: str
    sha256: str


class Params(_Record):
    sampling: dict[str, Any]
    fps: float
    max_pixels: int
    audio: bool = Field(description="Whether audio was sent to the model for this video.")
    audio_verified: bool | None = Field(None, description="Whether the server was seen to use audio.")
    window: float | None = Field(description="Window length in seconds; None when one request sufficed.")
    overlap: float
    media: Literal["file", "http", "inline"]


class Usage(_Record):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
        )


class Segment(_Record):
    start_s: float
    end_s: float
    caption: str
    finish_reason: str | None
    usage: Usage


class Timing(_Record):
    started: str
    finished: str
    latency_s: float
    attempts: int


class CaptionRecord(_Record):
    # Resume reads config_hash and video first; keeping them at the top keeps that cheap to eyeball too.
    schema_: Literal["vidcap.caption/1"] = Field(SCHEMA, alias="schema")
    config_hash: str
    video: VideoInfo
    model: str
    server: ServerInfo
    prompt: PromptInfo
    params: Params
    caption: str
    segments: list[Segment] | None = None
    usage: Usage
    finish_reason: str | None
    timing: Timing
    vidcap_version: str

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2) + "\n"


class Failure(_Record):
    ts: str
    run_id: str
    path: str
    error: str = Field(description="Stable error class, e.g. corrupt, not_video, truncated, http_400.")
    message: str
    attempts: int
    retryable: bool

    def to_line(self) -> str:
        return self.model_dump_json() + "\n"


class Counts(_Record):
    seen: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    retried_requests: int = 0
    requests: int = 0


class RunSummary(_Record):
    schema_: Literal["vidcap.run/1"] = Field("vidcap.run/1", alias="schema")
    run_id: str
    source: str
    out: str
    model: str
    server: ServerInfo
    config_hash: str
    shard: str | None
    limit: int | None
    total: int | None = Field(
        None, description="Videos this run looks at, once the listing has counted them."
    )
    started: str
    finished: str | None = Field(
        None,
        description="None while the run goes on (the file is rewritten as it runs) or when it was killed.",
    )
    wall_s: float = 0.0
    counts: Counts = Field(default_factory=Counts)
    usage: Usage = Field(default_factory=Usage)
    audio_verified: bool | None = None
    interrupted: bool = False
    aborted: str | None = Field(None, description="Why the run stopped early, when it did.")
    exit_code: int | None = None
    vidcap_version: str

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2) + "\n"
