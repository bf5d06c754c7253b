"""The chat requests vidcap sends: one video (+ its audio) and the prompt, or a text-only merge."""

from __future__ import annotations

from typing import Any

from vidcap.config import SamplingConfig

MERGE_INSTRUCTION = (
    "Below are captions of consecutive, overlapping time windows of one video, in order. "
    "Write one caption for the whole video that follows the original instruction, without repeating "
    "what the overlaps share and without mentioning windows.\n\nOriginal instruction: {prompt}\n\n{parts}"
)


def sampling_params(sampling: SamplingConfig) -> dict[str, Any]:
    """Sampling fields of the body; None values are left out so the server's defaults apply."""
    return {k: v for k, v in sampling.model_dump().items() if v is not None}


def video_request(
    *,
    model: str,
    prompt: str,
    video_url: str,
    audio_url: str | None,
    fps: float,
    num_frames: int,
    sampling: SamplingConfig,
) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "video_url", "video_url": {"url": video_url}}]
    if audio_url is not None:
        # vLLM ignores use_audio_in_video for Qwen3-Omni (vLLM issue 47788): audio goes as its own item.
        content.append({"type": "audio_url", "audio_url": {"url": audio_url}})
    content.append({"type": "text", "text": prompt})
    body = {"model": model, "messages": [{"role": "user", "content": content}], **sampling_params(sampling)}
    # Both keys, always: a request that sets only one makes vLLM drop the server default of the other.
    body["media_io_kwargs"] = {"video": {"fps": fps, "num_frames": num_frames}}
    return body


def merge_prompt(prompt: str, parts: list[tuple[float, float, str]]) -> str:
    lines = "\n".join(f"[{a:.1f}s-{b:.1f}s] {text.strip()}" for a, b, text in parts)
    return MERGE_INSTRUCTION.format(prompt=prompt, parts=lines)


def merge_request(*, model: str, prompt: str, sampling: SamplingConfig) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **sampling_params(sampling)}
    return body
