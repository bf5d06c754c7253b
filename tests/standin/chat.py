"""Chat request validation and the deterministic reply text. Pure: no I/O, no clock, no randomness.

Validation follows vLLM's order and wording where the client could care: body shape, then the model
name (404), then message parts (unknown type 400), then per-prompt media limits, then sampling params.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .media import Audio, Picture, Video

# Fields vLLM's ChatCompletionRequest understands that the stand-in accepts without comment.
KNOWN_FIELDS = frozenset(
    {
        "model",
        "messages",
        "media_io_kwargs",
        "mm_processor_kwargs",
        "chat_template_kwargs",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "stream",
        "n",
        "stop",
        "user",
        "logprobs",
        "top_logprobs",
        "skip_special_tokens",
        "ignore_eos",
        "min_tokens",
        "request_id",
        "priority",
    }
)
PART_KINDS = {"video_url": "video", "audio_url": "audio", "image_url": "image", "input_audio": "audio"}


class ApiError(Exception):
    """A request answered with ``status`` and vLLM's error body carrying ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad(message: str) -> ApiError:
    return ApiError(400, message)


@dataclass(frozen=True, slots=True)
class MediaRef:
    kind: str  # "video" | "audio" | "image"
    url: str


@dataclass(slots=True)
class ChatRequest:
    texts: list[str]  # every text item of every message, for token counting
    prompt: str  # the user's text, which the reply quotes
    media: list[MediaRef]
    max_tokens: int | None
    num_frames: int | None
    fps: float | None
    unknown_fields: list[str] = field(default_factory=list)

    def first(self, kind: str) -> MediaRef | None:
        return next((m for m in self.media if m.kind == kind), None)


def parse_chat(body: Any, *, served_model_name: str, limits: dict[str, int]) -> ChatRequest:
    """Validate a chat completion body like vLLM; raises ``ApiError``."""
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.")
    if body.get("stream"):
        raise bad("streaming not supported by the stand-in")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of messages.")
    if model is not None and model != served_model_name:
        raise ApiError(404, f"The model `{model}` does not exist.")

    texts: list[str] = []
    user_texts: list[str] = []
    media: list[MediaRef] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string 'role'.")
        content = message.get("content")
        is_user = message["role"] == "user"
        if content is None:
            continue
        if isinstance(content, str):
            texts.append(content)
            if is_user:
                user_texts.append(content)
            continue
        if not isinstance(content, list):
            raise bad(f"messages[{i}].content must be a string or a list of content parts.")
        for j, part in enumerate(content):
            text, ref = _part(part, f"messages[{i}].content[{j}]")
            if text is not None:
                texts.append(text)
                if is_user:
                    user_texts.append(text)
            if ref is not None:
                media.append(ref)

    for kind in ("image", "video", "audio"):
        count = sum(1 for m in media if m.kind == kind)
        limit = limits.get(kind, 0)
        if count > limit:
            raise bad(f"At most {limit} {kind}(s) may be provided in one prompt.")

    num_frames, fps = _video_kwargs(body.get("media_io_kwargs"))
    _check_sampling(body)
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        if not _is_int(max_tokens):
            raise bad(f"max_tokens must be an integer, got {max_tokens!r}.")
        if max_tokens < 1:
            raise bad(f"max_tokens must be at least 1, got {max_tokens}.")
    unknown = sorted(k for k in body if k not in KNOWN_FIELDS)
    return ChatRequest(texts, "\n".join(user_texts), media, max_tokens, num_frames, fps, unknown)


def _part(part: Any, where: str) -> tuple[str | None, MediaRef | None]:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise bad(f"{where} must be an object with a string 'type'.")
    kind = part["type"]
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise bad(f"{where}: a text part needs a string 'text'.")
        return text, None
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise bad(f"{where}: an input_audio part needs {{'data': base64, 'format': 'wav'}}.")
        return None, MediaRef("audio", f"data:audio/{audio.get('format') or 'wav'};base64,{audio['data']}")
    if kind not in PART_KINDS:
        raise bad(f"Unknown part type: {kind}")
    spec = part.get(kind)
    url = spec.get("url") if isinstance(spec, dict) else None
    if not isinstance(url, str) or not url:
        raise bad(f"{where}: a {kind} part needs {{'{kind}': {{'url': ...}}}}.")
    return None, MediaRef(PART_KINDS[kind], url)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _video_kwargs(kwargs: Any) -> tuple[int | None, float | None]:
    if kwargs is None:
        return None, None
    if not isinstance(kwargs, dict):
        raise bad('\'media_io_kwargs\' must be an object like {"video": {"num_frames": 32}}.')
    video = kwargs.get("video")
    if video is None:
        return None, None
    if not isinstance(video, dict):
        raise bad("'media_io_kwargs.video' must be an object.")
    num_frames = video.get("num_frames")
    fps = video.get("fps")
    if num_frames is not None and not (_is_int(num_frames) and (num_frames > 0 or num_frames == -1)):
        raise bad(f"media_io_kwargs.video.num_frames must be a positive integer or -1, got {num_frames!r}.")
    if fps is not None and not (_is_number(fps) and (fps > 0 or fps == -1)):
        raise bad(f"media_io_kwargs.video.fps must be a positive number or -1, got {fps!r}.")
    return num_frames, (float(fps) if fps is not None else None)


def _check_sampling(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise bad(f"the stand-in answers only n=1, got n={n!r}.")
    temperature = body.get("temperature")
    if temperature is not None and not (_is_number(temperature) and temperature >= 0):
        raise bad(f"temperature must be non-negative, got {temperature}.")
    top_p = body.get("top_p")
    if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
        raise bad(f"top_p must be in (0, 1], got {top_p}.")
    top_k = body.get("top_k")
    if top_k is not None and not (_is_int(top_k) and (top_k >= 0 or top_k == -1)):
        raise bad(f"top_k must be 0 (disable), -1 (disable), or at least 1, got {top_k}.")
    penalty = body.get("repetition_penalty")
    if penalty is not None and not (_is_number(penalty) and penalty > 0):
        raise bad(f"repetition_penalty must be greater than zero, got {penalty}.")
    presence = body.get("presence_penalty")
    if presence is not None and not (_is_number(presence) and -2 <= presence <= 2):
        raise bad(f"presence_penalty must be in [-2, 2], got {presence}.")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad(f"seed must be an integer, got {seed!r}.")


def reply_text(prompt: str, video: Video | None, audio: Audio | None, picture: Picture | None) -> str:
    """What the stand-in "generates": a description of the decoded media, so tests can tell that a
    caption came from the real frames and sound, then the start of the prompt."""
    sound = f"sound {audio.duration_s:.1f} s, loudness {audio.rms:.3f}" if audio else ""
    if video is not None:
        r, g, b = video.mean_rgb
        text = (
            f"A {video.duration_s:.1f}-second clip, {video.n_frames} frames at "
            f"{video.width}x{video.height}, mean colour ({r},{g},{b})"
        )
        if sound:
            text += "; " + sound
    elif picture is not None:
        r, g, b = picture.mean_rgb
        text = f"An image at {picture.width}x{picture.height}, mean colour ({r},{g},{b})"
        if sound:
            text += "; " + sound
    elif audio is not None:
        text = f"A {audio.duration_s:.1f}-second sound, loudness {audio.rms:.3f}"
    else:
        # Text-only requests are window-caption merges: echo a digest of every part.
        lines = [line.strip() for line in prompt.splitlines() if line.strip()]
        return f"Merged {len(lines)} parts: " + " | ".join(line[:60] for line in lines)
    return text + ". Prompt: " + prompt[:40]
