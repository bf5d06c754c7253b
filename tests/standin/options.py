"""The stand-in's options: one dataclass shared by the CLI flags and ``StandIn(**options)``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import tokens

DEFAULT_MODEL = "Qwen/Qwen3-Omni-30B-A3B-Instruct"
INJECTED_STATUSES = (429, 500, 502, 503, 504)


@dataclass
class Options:
    host: str = "127.0.0.1"
    port: int = 0
    port_file: str | None = None
    uds: str | None = None
    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    api_key: str | None = None
    api_key_file: str | None = None
    max_model_len: int = 32768
    allowed_local_media_path: str | None = None
    video_max_pixels: int = tokens.DEFAULT_VIDEO_MAX_PIXELS
    limit_video: int = 1
    limit_audio: int = 1
    limit_image: int = 0
    latency: float = 0.0
    latency_jitter: float = 0.0
    slots: int = 0
    error_rate: float = 0.0
    drop_rate: float = 0.0
    seed: int | None = None
    decode: str = "full"
    log_file: str | None = None
    drop_audio: bool = False
    keep_alive_timeout: float = 5.0
    fetch_timeout: float = 10.0
    decode_workers: int = 0
    healthy: bool = True

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        for name in ("error_rate", "drop_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        for name in ("latency", "latency_jitter", "keep_alive_timeout", "fetch_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("slots", "limit_video", "limit_audio", "limit_image", "decode_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("max_model_len", "video_max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.decode not in ("full", "none"):
            raise ValueError(f"decode must be 'full' or 'none', got {self.decode!r}")
        if self.api_key and self.api_key_file:
            raise ValueError("give api_key or api_key_file, not both")
        if self.allowed_local_media_path is not None and not Path(self.allowed_local_media_path).is_dir():
            raise ValueError(f"allowed_local_media_path {self.allowed_local_media_path!r} is not a directory")

    def effective_api_key(self) -> str | None:
        if self.api_key_file:
            return Path(self.api_key_file).read_text().strip() or None
        return self.api_key or None

    def allowed_root(self) -> Path | None:
        if self.allowed_local_media_path is None:
            return None
        return Path(self.allowed_local_media_path).resolve()

    def limits(self) -> dict[str, int]:
        return {"video": self.limit_video, "audio": self.limit_audio, "image": self.limit_image}


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(Options))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.standin.server",
        description="Test stand-in for a vLLM OpenAI-compatible server serving Qwen3-Omni.",
    )
    d = Options()
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="0 picks a free port")
    p.add_argument("--port-file", help="write the bound port here (atomically) once listening (TCP only)")
    p.add_argument(
        "--uds",
        help="listen on this unix socket path instead; --host, --port and --port-file are ignored. Like "
        "vLLM, an existing file there is an error (EADDRINUSE), and the socket file stays when it exits",
    )
    p.add_argument("--model", default=d.model)
    p.add_argument("--served-model-name")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (else $VLLM_API_KEY)")
    p.add_argument("--api-key-file", help="read the API key from this file")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--allowed-local-media-path", help="directory file:// media must be under")
    p.add_argument("--video-max-pixels", type=int, default=d.video_max_pixels)
    p.add_argument("--limit-video", type=int, default=d.limit_video)
    p.add_argument("--limit-audio", type=int, default=d.limit_audio)
    p.add_argument("--limit-image", type=int, default=d.limit_image)
    p.add_argument(
        "--limit-mm-per-prompt",
        type=json.loads,
        metavar="JSON",
        help='vLLM style, e.g. \'{"video": 1, "audio": 1}\'; overrides --limit-*',
    )
    p.add_argument("--latency", type=float, default=d.latency, help="seconds per chat request, in a slot")
    p.add_argument(
        "--latency-jitter",
        type=float,
        default=d.latency_jitter,
        help="latency varies uniformly by +- this many seconds",
    )
    p.add_argument(
        "--slots",
        "--max-num-seqs",
        dest="slots",
        type=int,
        default=d.slots,
        help="concurrent chat requests; more wait in FIFO order (0 = unlimited)",
    )
    p.add_argument(
        "--error-rate",
        type=float,
        default=d.error_rate,
        help="fraction of chat requests answered at once with 429/500/502/503/504",
    )
    p.add_argument(
        "--drop-rate",
        type=float,
        default=d.drop_rate,
        help="fraction of chat requests whose connection is closed without an answer",
    )
    p.add_argument("--seed", type=int, help="seed of all randomness")
    p.add_argument(
        "--decode",
        choices=("full", "none"),
        default=d.decode,
        help="none: check requests and count tokens without decoding media",
    )
    p.add_argument("--log-file", help="append one JSON line per chat request")
    p.add_argument("--drop-audio", action="store_true", help="accept audio but ignore it, like vLLM might")
    p.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=d.keep_alive_timeout,
        help="close idle connections after this many seconds, like uvicorn (0 = never)",
    )
    p.add_argument("--fetch-timeout", type=float, default=d.fetch_timeout)
    p.add_argument("--decode-workers", type=int, default=d.decode_workers, help="0 = automatic")
    return p


def from_args(argv: list[str] | None = None) -> Options:
    """Options from a command line; exits with argparse's message on unknown or bad flags."""
    p = parser()
    ns = vars(p.parse_args(argv))
    mm = ns.pop("limit_mm_per_prompt")
    if mm is not None:
        if not isinstance(mm, dict) or not all(isinstance(v, int) for v in mm.values()):
            p.error('--limit-mm-per-prompt wants a JSON object of integers, e.g. {"video": 1}')
        for kind in ("video", "audio", "image"):
            if kind in mm:
                ns[f"limit_{kind}"] = mm[kind]
    if not ns["api_key"] and not ns["api_key_file"] and os.environ.get("VLLM_API_KEY"):
        ns["api_key"] = os.environ["VLLM_API_KEY"]
    options = Options(**ns)
    try:
        options.validate()
        options.effective_api_key()
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    return options
