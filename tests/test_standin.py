"""Tests of the vLLM stand-in itself (tests/standin/), against real videos made with ffmpeg."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from standin import StandIn, run_subprocess, stop_subprocess, tokens  # tests/ is on sys.path (conftest)
from standin.accounting import Slots

MODEL = "Qwen/Qwen3-Omni-30B-A3B-Instruct"
PROMPT = "Describe the video in one paragraph."
FFMPEG = shutil.which("ffmpeg")


# ---- fixtures --------------------------------------------------------------------------------------


def _ffmpeg(*args: str) -> None:
    assert FFMPEG, "ffmpeg is needed to make test videos"
    subprocess.run([FFMPEG, "-v", "error", "-y", *args], check=True)


def _wav(path: Path, seconds: float, rate: int = 16000, amplitude: float = 0.5) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (amplitude * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    files = {
        "testsrc": root / "clip 'q' $(x) é.mp4",  # hostile name: must survive the file:// URL
        "red": root / "red.mp4",
        "corrupt": root / "corrupt.mp4",
        "empty": root / "empty.mp4",
        "wav": root / "tone.wav",
    }
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=25",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=44100",
        "-t",
        "3",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        str(files["testsrc"]),
    )
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "color=c=red:size=160x96:rate=10",
        "-t",
        "2",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        str(files["red"]),
    )
    files["corrupt"].write_bytes(files["testsrc"].read_bytes()[:4000])  # no moov atom
    files["empty"].write_bytes(b"")
    _wav(files["wav"], 2.0)
    return files


@pytest.fixture
def server(media: dict[str, Path]) -> Iterator[StandIn]:
    with StandIn(allowed_local_media_path=str(media["red"].parent), seed=7) as s:
        yield s


@pytest.fixture
def client(server: StandIn) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def body(*parts: dict[str, Any], text: str = PROMPT, **extra: Any) -> dict[str, Any]:
    content = [*parts, {"type": "text", "text": text}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def video(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def audio(url: str) -> dict[str, Any]:
    return {"type": "audio_url", "audio_url": {"url": url}}


def frames_kwargs(fps: float | None = None, num_frames: int | None = None) -> dict[str, Any]:
    v: dict[str, Any] = {}
    if fps is not None:
        v["fps"] = fps
    if num_frames is not None:
        v["num_frames"] = num_frames
    return {"media_io_kwargs": {"video": v}}


def chat(c: httpx.Client, payload: dict[str, Any], **kw: Any) -> httpx.Response:
    return c.post("/v1/chat/completions", json=payload, **kw)


def error_message(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    err = r.json()
    assert err["object"] == "error" and err["code"] == status and err["param"] is None
    return err["message"]


# ---- token accounting (pure) ---------------------------------------------------------------------


def test_token_rules_match_qwen3_omni() -> None:
    assert tokens.smart_resize(240, 320) == (256, 320)  # banker's rounding of 7.5 -> 8
    assert tokens.smart_resize(1080, 1920) == (576, 1024)  # scaled under 602112 px
    assert tokens.smart_resize(10, 10) == (32, 32)
    assert tokens.video_tokens(6, 240, 320) == 3 * 80
    assert tokens.video_tokens(5, 240, 320) == 3 * 80  # odd count padded to a pair
    assert tokens.video_tokens(32, 1080, 1920) == 16 * 18 * 32
    assert tokens.frames_to_sample(75, 3.0) == 32  # vLLM's default num_frames
    assert tokens.frames_to_sample(75, 3.0, num_frames=10) == 10
    assert tokens.frames_to_sample(75, 3.0, num_frames=10, fps=2.0) == 6  # the smaller wins
    assert tokens.frames_to_sample(75, 3.0, fps=1.0) == 3
    assert tokens.frames_to_sample(75, 3.0, num_frames=-1) == 75
    assert tokens.frames_to_sample(75, 3.0, num_frames=500) == 75
    assert tokens.frames_to_sample(5, 0.1, fps=1.0) == 1  # never fewer than one
    assert [tokens.audio_tokens(s) for s in (1.0, 2.0, 2.5, 30.0)] == [13, 26, 33, 390]
    assert tokens.text_tokens("abcde") == 2
    assert tokens.prompt_tokens(["abcd", "abcde"], [240, 26]) == 20 + 1 + 2 + 242 + 28
    assert tokens.completion("x" * 30, 5) == ("x" * 20, 5, "length")
    assert tokens.completion("x" * 30, 8) == ("x" * 30, 8, "stop")


def test_context_messages_are_vllms() -> None:
    assert tokens.check_context(100, None, 1000) == (900, None)
    assert tokens.check_context(100, 50, 1000) == (50, None)
    _, msg = tokens.check_context(1200, 10, 1000)
    assert msg == (
        "This model's maximum context length is 1000 tokens. However, your request has 1200 "
        "input tokens. Please reduce the length of the input messages."
    )
    _, msg = tokens.check_context(900, 200, 1000)
    assert msg == (
        "'max_tokens' or 'max_completion_tokens' is too large: 200. This model's maximum context "
        "length is 1000 tokens and your request has 900 input tokens (200 > 1000 - 900)."
    )


# ---- plain endpoints and auth --------------------------------------------------------------------


def test_health_version_models(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.content == b""
    assert client.get("/version").json() == {"version": "0.0.0-standin"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert (card["id"], card["root"], card["owned_by"]) == (MODEL, MODEL, "vllm")
    assert card["max_model_len"] == 32768
    assert client.get("/nope").status_code == 404
    assert client.get("/v1/chat/completions").status_code == 405


def test_served_name_and_model_check(media: dict[str, Path]) -> None:
    with StandIn(served_model_name="omni", max_model_len=4096) as s, httpx.Client(base_url=s.url) as c:
        card = c.get("/v1/models").json()["data"][0]
        assert (card["id"], card["root"], card["max_model_len"]) == ("omni", MODEL, 4096)
        msg = error_message(chat(c, body()), 404)
        assert msg == f"The model `{MODEL}` does not exist."
        ok = chat(c, {**body(), "model": "omni"})
        assert ok.status_code == 200 and ok.json()["model"] == "omni"


def test_api_key(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    with StandIn(api_key_file=str(key_file)) as s, httpx.Client(base_url=s.url) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
        r = chat(c, body(), headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=good).status_code == 200
        assert chat(c, body(), headers=good).status_code == 200
        for path in ("/health", "/version", "/stats"):
            assert c.get(path).status_code == 200
        assert s.stats()["errors"] == {"401": 1}
        s.api_key_file = None
        s.api_key = "other"
        assert c.get("/v1/models", headers={"Authorization": "Bearer other"}).status_code == 200


# ---- video decoding ------------------------------------------------------------------------------


def test_file_video_is_decoded_and_counted(
    client: httpx.Client, server: StandIn, media: dict[str, Path]
) -> None:
    url = media["testsrc"].as_uri()
    assert "%20" in url and "%24" in url  # the hostile name really is percent-encoded
    r = chat(client, body(video(url), **frames_kwargs(fps=2.0, num_frames=10), max_tokens=200))
    assert r.status_code == 200, r.text
    reply = r.json()
    text = reply["choices"][0]["message"]["content"]
    assert text.startswith("A 3.0-second clip, 6 frames at 320x240, mean colour (")
    assert text.endswith(". Prompt: " + PROMPT[:40])
    expected = tokens.prompt_tokens([PROMPT], [tokens.video_tokens(6, 240, 320)])
    assert reply["usage"]["prompt_tokens"] == expected == 20 + 9 + 242
    assert reply["usage"]["completion_tokens"] == tokens.text_tokens(text)
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["total_tokens"] == expected + tokens.text_tokens(text)

    default = chat(client, body(video(url))).json()  # no media_io_kwargs: vLLM's 32 frames
    assert "32 frames at 320x240" in default["choices"][0]["message"]["content"]
    assert default["usage"]["prompt_tokens"] == tokens.prompt_tokens([PROMPT], [16 * 80])

    stats = server.stats()
    assert stats["completed"] == 2 and stats["by_video"] == {str(media["testsrc"]): 2}
    assert stats["prompt_tokens"] == expected + default["usage"]["prompt_tokens"]


def test_caption_depends_on_the_pixels(client: httpx.Client, media: dict[str, Path]) -> None:
    r = chat(client, body(video(media["red"].as_uri()), **frames_kwargs(num_frames=4)))
    text = r.json()["choices"][0]["message"]["content"]
    assert "2.0-second clip, 4 frames at 160x96" in text
    rgb = [int(x) for x in text.split("mean colour (")[1].split(")")[0].split(",")]
    assert rgb[0] > 200 and rgb[1] < 60 and rgb[2] < 60, text


def test_local_path_rules(client: httpx.Client, media: dict[str, Path], tmp_path: Path) -> None:
    outside = tmp_path / "outside.mp4"
    shutil.copy(media["red"], outside)
    msg = error_message(chat(client, body(video(outside.as_uri()))), 400)
    assert "must be a subpath of `--allowed-local-media-path`" in msg
    link = media["red"].parent / "escape.mp4"
    link.symlink_to(outside)
    try:
        msg = error_message(chat(client, body(video(link.as_uri()))), 400)
        assert "must be a subpath" in msg
    finally:
        link.unlink()
    missing = media["red"].parent / "missing.mp4"
    assert "No such file" in error_message(chat(client, body(video(missing.as_uri()))), 400)
    with StandIn() as s, httpx.Client(base_url=s.url) as c:
        msg = error_message(chat(c, body(video(media["red"].as_uri()))), 400)
        assert msg == "Cannot load local files without `--allowed-local-media-path`."


@pytest.mark.parametrize("name", ["corrupt", "empty"])
def test_undecodable_video_is_400(
    client: httpx.Client, server: StandIn, media: dict[str, Path], name: str
) -> None:
    msg = error_message(chat(client, body(video(media[name].as_uri()))), 400)
    assert msg.startswith(f"Failed to load video from {media[name]}")
    assert server.stats()["errors"] == {"400": 1} and server.stats()["completed"] == 0


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return base64.b64encode(buf.getvalue()).decode()


def test_inline_jpeg_frames(client: httpx.Client, server: StandIn, tmp_path: Path) -> None:
    url = "data:video/jpeg;base64," + ",".join(_jpeg((0, 200, 0)) for _ in range(3))
    log = tmp_path / "log.jsonl"
    server.log_file = str(log)
    r = chat(client, body(video(url), **frames_kwargs(fps=2.0)))
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    assert "1.5-second clip, 3 frames at 64x48" in text
    rgb = [int(x) for x in text.split("mean colour (")[1].split(")")[0].split(",")]
    assert abs(rgb[1] - 200) < 8 and rgb[0] < 20 and rgb[2] < 20
    expected = tokens.prompt_tokens([PROMPT], [tokens.video_tokens(3, 48, 64)])
    assert r.json()["usage"]["prompt_tokens"] == expected

    bad = url + "," + base64.b64encode(b"not a jpeg").decode()
    assert "frame 3" in error_message(chat(client, body(video(bad))), 400)
    mixed = "data:video/jpeg;base64," + _jpeg((0, 0, 0)) + "," + _jpeg((0, 0, 0), (32, 32))
    assert "frame 1 is 32x32" in error_message(chat(client, body(video(mixed))), 400)

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["status"] for line in lines] == [200, 400, 400]
    assert lines[0]["video"] == "inline:" + hashlib.sha1(url.encode()).hexdigest()[:12]
    assert lines[0]["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert lines[0]["finish_reason"] == "stop" and lines[0]["latency"] >= 0


def test_http_video_is_fetched(client: httpx.Client, media: dict[str, Path]) -> None:
    handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    files = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(media["red"].parent))
    )
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{files.server_address[1]}"
        r = chat(client, body(video(f"{base}/red.mp4"), **frames_kwargs(num_frames=2)))
        assert "2 frames at 160x96" in r.json()["choices"][0]["message"]["content"]
        assert "Failed to fetch" in error_message(chat(client, body(video(f"{base}/gone.mp4"))), 400)
    finally:
        files.shutdown()
        files.server_close()


# ---- audio ---------------------------------------------------------------------------------------


def test_wav_audio_adds_tokens_unless_dropped(
    client: httpx.Client, server: StandIn, media: dict[str, Path]
) -> None:
    vid = video(media["red"].as_uri())
    kw = frames_kwargs(num_frames=4)
    inline = "data:audio/wav;base64," + base64.b64encode(media["wav"].read_bytes()).decode()
    without = chat(client, body(vid, **kw)).json()
    for url in (inline, media["wav"].as_uri()):
        with_audio = chat(client, body(vid, audio(url), **kw)).json()
        extra = with_audio["usage"]["prompt_tokens"] - without["usage"]["prompt_tokens"]
        assert extra == tokens.audio_tokens(2.0) + tokens.MEDIA_MARKER_TOKENS == 28
        assert "; sound 2.0 s, loudness 0.354" in with_audio["choices"][0]["message"]["content"]

    server.drop_audio = True
    dropped = chat(client, body(vid, audio(inline), **kw)).json()
    assert dropped["usage"]["prompt_tokens"] == without["usage"]["prompt_tokens"]
    assert "sound" not in dropped["choices"][0]["message"]["content"]

    not_wav = "data:audio/wav;base64," + base64.b64encode(b"RIFF....junk").decode()
    assert "Failed to load audio" in error_message(chat(client, body(vid, audio(not_wav))), 400)


# ---- request validation --------------------------------------------------------------------------


def test_media_limits_and_part_types(client: httpx.Client, server: StandIn, media: dict[str, Path]) -> None:
    vid = video(media["red"].as_uri())
    msg = error_message(chat(client, body(vid, vid)), 400)
    assert msg == "At most 1 video(s) may be provided in one prompt."
    wav = audio(media["wav"].as_uri())
    assert "At most 1 audio(s)" in error_message(chat(client, body(wav, wav)), 400)
    img = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + _jpeg((1, 2, 3))}}
    assert "At most 0 image(s)" in error_message(chat(client, body(img)), 400)
    assert "Unknown part type: hologram" in error_message(chat(client, body({"type": "hologram"})), 400)
    assert "streaming not supported" in error_message(chat(client, body(stream=True)), 400)
    assert "Invalid JSON" in error_message(client.post("/v1/chat/completions", content=b"{"), 400)
    assert "top_p" in error_message(chat(client, body(top_p=0)), 400)
    assert server.stats()["completed"] == 0

    server.limit_video = 2
    two = chat(client, body(vid, vid, **frames_kwargs(num_frames=2))).json()
    expected = tokens.prompt_tokens([PROMPT], [tokens.video_tokens(2, 96, 160)] * 2)
    assert two["usage"]["prompt_tokens"] == expected
    ok = chat(
        client,
        body(
            vid,
            temperature=0.7,
            top_p=0.8,
            top_k=20,
            repetition_penalty=1.05,
            seed=1,
            presence_penalty=0.5,
            max_completion_tokens=300,
            something_new=True,
        ),
    )
    assert ok.status_code == 200, ok.text


def test_context_overflow_and_length(media: dict[str, Path]) -> None:
    vid = video(media["testsrc"].as_uri())
    kw = frames_kwargs(num_frames=10)
    prompt = tokens.prompt_tokens([PROMPT], [tokens.video_tokens(10, 240, 320)])
    with (
        StandIn(allowed_local_media_path=str(media["red"].parent), max_model_len=prompt + 50) as s,
        httpx.Client(base_url=s.url) as c,
    ):
        msg = error_message(chat(c, body(vid, **kw, max_tokens=51)), 400)
        assert msg == (
            f"'max_tokens' or 'max_completion_tokens' is too large: 51. This model's maximum "
            f"context length is {prompt + 50} tokens and your request has {prompt} input tokens "
            f"(51 > {prompt + 50} - {prompt})."
        )
        short = chat(c, body(vid, **kw, max_tokens=5)).json()
        choice = short["choices"][0]
        assert choice["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 5
        assert len(choice["message"]["content"]) == 20
        full = chat(c, body(vid, **kw)).json()  # no max_tokens: the rest of the context
        assert full["choices"][0]["finish_reason"] == "stop"
        s.max_model_len = prompt - 1
        msg = error_message(chat(c, body(vid, **kw)), 400)
        assert msg == (
            f"This model's maximum context length is {prompt - 1} tokens. However, your request "
            f"has {prompt} input tokens. Please reduce the length of the input messages."
        )


def test_text_only_merge(client: httpx.Client) -> None:
    text = "Merge these:\n1. a red ball rolls\n\n2. a dog barks at it\n"
    reply = chat(client, body(text=text)).json()
    assert reply["choices"][0]["message"]["content"] == (
        "Merged 3 parts: Merge these: | 1. a red ball rolls | 2. a dog barks at it"
    )
    assert reply["usage"]["prompt_tokens"] == 20 + tokens.text_tokens(text)


def test_decode_none_counts_without_decoding(media: dict[str, Path]) -> None:
    with (
        StandIn(allowed_local_media_path=str(media["red"].parent), decode="none") as s,
        httpx.Client(base_url=s.url) as c,
    ):
        r = chat(c, body(video(media["corrupt"].as_uri()), **frames_kwargs(num_frames=8))).json()
        assert "8 frames at 640x360" in r["choices"][0]["message"]["content"]
        expected = tokens.prompt_tokens([PROMPT], [tokens.video_tokens(8, 360, 640)])
        assert r["usage"]["prompt_tokens"] == expected
        wav = chat(
            c, body(audio("data:audio/wav;base64," + base64.b64encode(media["wav"].read_bytes()).decode()))
        ).json()
        assert wav["usage"]["prompt_tokens"] == tokens.prompt_tokens([PROMPT], [tokens.audio_tokens(2.0)])
        outside = Path("/etc/hostname").as_uri()
        assert "must be a subpath" in error_message(chat(c, body(video(outside))), 400)


# ---- fault injection, slots, connections ---------------------------------------------------------


def test_error_rate_one_gives_only_retryable_errors(client: httpx.Client, server: StandIn) -> None:
    server.error_rate = 1.0
    statuses = []
    for _ in range(25):
        r = chat(client, body())
        statuses.append(r.status_code)
        assert r.json()["type"] in {
            "TooManyRequestsError",
            "InternalServerError",
            "BadGatewayError",
            "ServiceUnavailableError",
            "GatewayTimeoutError",
        }
    assert set(statuses) <= {429, 500, 502, 503, 504} and len(set(statuses)) >= 3
    stats = server.stats()
    assert stats["completed"] == 0 and sum(stats["errors"].values()) == 25 == stats["requests"]
    server.error_rate = 0.0
    assert chat(client, body()).status_code == 200
    with pytest.raises(ValueError, match="error_rate"):
        server.error_rate = 1.5


def test_drop_rate_one_drops_the_connection(client: httpx.Client, server: StandIn) -> None:
    server.drop_rate = 1.0
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        chat(client, body())
    stats = server.stats()
    assert (stats["dropped"], stats["completed"], stats["errors"], stats["requests"]) == (1, 0, {}, 1)
    server.drop_rate = 0.0
    assert chat(client, body()).status_code == 200  # the pool reconnects


async def _concurrent(url: str, n: int, payload: dict[str, Any], connections: int) -> list[int]:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as c:
        rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=payload) for _ in range(n)))
    return [r.status_code for r in rs]


def test_slots_queue_requests_instead_of_refusing(server: StandIn) -> None:
    server.slots, server.latency = 2, 0.2
    started = time.monotonic()
    statuses = asyncio.run(_concurrent(server.url, 6, body(), 6))
    elapsed = time.monotonic() - started
    assert statuses == [200] * 6
    assert 0.6 <= elapsed < 1.5
    stats = server.stats()
    assert stats["max_in_flight"] == 2 and stats["completed"] == 6 and stats["in_flight"] == 0
    assert 1.2 <= stats["busy_slot_seconds"] < 1.5
    assert stats["first_request_ts"] <= stats["last_response_ts"]


async def _keepalive_load(port: int, connections: int, per_connection: int, payload: bytes) -> list[bytes]:
    """Each connection sends its requests one after another on the same socket; returns status lines.
    A bare asyncio client, because httpx's pool is slower than the server at this concurrency."""
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )

    async def one_connection() -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        lines = []
        for _ in range(per_connection):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            lines.append(head.split(b"\r\n")[0])
        writer.close()
        return lines

    results = await asyncio.gather(*(one_connection() for _ in range(connections)))
    return [line for lines in results for line in lines]


def test_slots_are_fifo_and_survive_cancellation() -> None:
    async def scenario() -> list[str]:
        slots = Slots(lambda: 1)
        order: list[str] = []

        async def user(name: str) -> None:
            await slots.acquire()
            order.append(name)
            await asyncio.sleep(0.01)
            slots.release()

        await slots.acquire()  # held by "a"
        waiting = {n: asyncio.create_task(user(n)) for n in "bcde"}
        await asyncio.sleep(0)
        waiting["c"].cancel()  # leaves the queue while waiting
        slots.release()  # "b" is granted the slot...
        waiting["b"].cancel()  # ...but is cancelled before it runs: the slot passes on to "d"
        await asyncio.gather(*waiting.values(), return_exceptions=True)
        assert slots.used == 0 and not slots.waiters
        return order

    assert asyncio.run(scenario()) == ["d", "e"]


def test_hundreds_of_keepalive_connections(server: StandIn) -> None:
    server.latency = 0.05
    lines = asyncio.run(_keepalive_load(server.port, 300, 3, json.dumps(body()).encode()))
    assert lines == [b"HTTP/1.1 200 OK"] * 900
    stats = server.stats()
    assert stats["completed"] == 900 and stats["max_in_flight"] > 100


def test_client_that_leaves_frees_its_slot(server: StandIn) -> None:
    server.slots, server.latency = 1, 1.0
    with httpx.Client(base_url=server.url) as c:
        with pytest.raises(httpx.ReadTimeout):
            chat(c, body(), timeout=0.2)
        time.sleep(0.1)
        started = time.monotonic()
        assert chat(c, body(), timeout=5).status_code == 200
        assert time.monotonic() - started < 1.5  # not queued behind the abandoned request
    stats = server.stats()
    assert (stats["cancelled"], stats["completed"], stats["in_flight"]) == (1, 1, 0)


def test_pause_and_resume_on_the_same_port(server: StandIn, client: httpx.Client) -> None:
    port = server.port
    server.latency = 2.0
    result: dict[str, BaseException] = {}

    def in_flight() -> None:
        try:
            chat(client, body(), timeout=5)
        except httpx.HTTPError as exc:
            result["error"] = exc

    t = threading.Thread(target=in_flight)
    t.start()
    time.sleep(0.3)
    server.pause()
    t.join(5)
    assert isinstance(result.get("error"), httpx.TransportError)
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)
    server.resume()
    server.latency = 0.0
    assert server.port == port
    assert httpx.get(server.url + "/health", timeout=2).status_code == 200
    assert chat(client, body()).status_code == 200
    stats = server.stats()
    assert (stats["cancelled"], stats["completed"]) == (1, 1)


def test_unhealthy_and_stats_reset(client: httpx.Client, server: StandIn) -> None:
    assert chat(client, body()).status_code == 200
    server.healthy = False
    assert client.get("/health").status_code == 503
    assert client.post("/stats/reset").json()["completed"] == 0
    assert client.get("/stats").json()["requests"] == 0


# ---- the HTTP layer, byte by byte -----------------------------------------------------------------


def _raw(port: int, data: bytes, expect_close: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                assert not expect_close, "server kept the connection open"
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_http_keep_alive_pipelining_and_framing(server: StandIn) -> None:
    port = server.port
    payload = json.dumps(body()).encode()
    two = (
        b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(payload)).encode() + b"\r\nConnection: close\r\n\r\n" + payload
    )
    out = _raw(port, two)
    assert out.count(b"HTTP/1.1 200 OK") == 2 and b"chat.completion" in out

    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
    out = _raw(
        port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + chunked,
    )
    assert out.startswith(b"HTTP/1.1 200 OK") and b"chat.completion" in out

    assert _raw(port, b"GET /health HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 OK")  # 1.0 closes
    assert _raw(port, b"BLAH\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _raw(port, b"GET / HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
    assert _raw(port, b"POST /stats/reset HTTP/1.1\r\nContent-Length: x\r\n\r\n").startswith(b"HTTP/1.1 400 ")


def test_idle_connections_are_closed_like_uvicorn(server: StandIn) -> None:
    server.keep_alive_timeout = 0.3
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")
        started = time.monotonic()
        assert s.recv(4096) == b""  # closed by the server, not by the 5 s socket timeout
        assert 0.2 < time.monotonic() - started < 2.0


def test_big_body_and_restart(server: StandIn, client: httpx.Client) -> None:
    text = "x" * 6_000_000
    msg = error_message(chat(client, body(text=text)), 400)
    assert f"your request has {20 + 1_500_000} input tokens" in msg
    server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")
    server.start()
    assert httpx.get(server.url + "/health").status_code == 200


# ---- its own process -----------------------------------------------------------------------------


def test_subprocess_and_cli(tmp_path: Path, media: dict[str, Path]) -> None:
    log = tmp_path / "requests.jsonl"
    proc, url = run_subprocess(
        [
            "--served-model-name",
            "omni",
            "--slots",
            "1",
            "--log-file",
            str(log),
            "--allowed-local-media-path",
            str(media["red"].parent),
        ],
        tmp_path,
    )
    try:
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "omni"
        payload = {**body(video(media["red"].as_uri()), **frames_kwargs(num_frames=2)), "model": "omni"}
        r = httpx.post(url + "/v1/chat/completions", json=payload)
        assert r.status_code == 200 and "2 frames at 160x96" in r.json()["choices"][0]["message"]["content"]
        assert httpx.get(url + "/stats").json()["by_video"] == {str(media["red"]): 1}
        assert len(tcp_listeners(proc.pid)) == 1  # what the --uds test checks the absence of
    finally:
        assert stop_subprocess(proc) == 0
    (line,) = log.read_text().splitlines()
    assert json.loads(line)["video"] == str(media["red"])

    bad = subprocess.run(
        [sys.executable, "-m", "tests.standin.server", "--gpu-memory-utilization", "0.9"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 2 and "unrecognized arguments: --gpu-memory-utilization" in bad.stderr
    with pytest.raises(RuntimeError, match="error_rate must be between 0 and 1"):
        run_subprocess(["--error-rate", "2"], tmp_path)
    with pytest.raises(TypeError, match="unknown stand-in option"):
        StandIn(gpu_memory_utilization=0.9)


# ---- a unix socket instead of a port (vLLM's --uds) ---------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short path: a unix socket's path has at most 107 bytes, and pytest's tmp_path can be long."""
    path = Path(tempfile.mkdtemp(prefix="standin-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_unix_socket_instead_of_a_port(sock_dir: Path) -> None:
    path = sock_dir / "vllm.sock"
    with StandIn(uds=str(path), host="no-such-host.invalid", port=1) as server:  # host and port: ignored
        assert server.port == 0 and server.url == "http://localhost"
        assert stat.S_ISSOCK(path.stat().st_mode)
        transport = httpx.HTTPTransport(uds=str(path))
        with httpx.Client(transport=transport, base_url=server.url, timeout=10) as c:
            assert c.get("/health").status_code == 200
            assert c.get("/v1/models").json()["data"][0]["id"] == MODEL
            assert chat(c, body()).status_code == 200
            server.pause()
            with pytest.raises(httpx.ConnectError):
                c.get("/health")
            server.resume()  # on the same path again: its own socket file is replaced
            assert c.get("/health").status_code == 200
        assert server.stats()["completed"] == 1
    assert stat.S_ISSOCK(path.stat().st_mode)  # left behind, as vLLM (uvicorn on a given socket) leaves it
    with pytest.raises(OSError) as err:  # like vLLM: an existing file is not replaced
        StandIn(uds=str(path)).start()
    assert err.value.errno == errno.EADDRINUSE


def tcp_listeners(pid: int) -> list[str]:
    """The TCP addresses (hex, as /proc/net/tcp writes them) that process ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    found.append(fields[1])
    return found


def test_a_unix_socket_in_its_own_process(tmp_path: Path, sock_dir: Path) -> None:
    path = sock_dir / "vllm.sock"
    proc, url = run_subprocess(["--uds", str(path), "--served-model-name", "omni"], tmp_path)
    try:
        assert url == "http://localhost"
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url=url, timeout=10) as c:
            assert c.get("/v1/models").json()["data"][0]["id"] == "omni"
        assert tcp_listeners(proc.pid) == []  # no port at all (run_subprocess passed --port 0)
        assert not list(tmp_path.glob("standin-*.port"))  # --port-file is ignored too
    finally:
        assert stop_subprocess(proc) == 0
    again = subprocess.run(
        [sys.executable, "-m", "tests.standin.server", "--uds", str(path)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert again.returncode == 1 and f"cannot listen on {path}" in again.stderr
    assert "Address already in use" in again.stderr
