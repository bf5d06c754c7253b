"""The file server and its client against a real server on 127.0.0.1:0 and real videos."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gc
import http.client
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import videos

from vidcap import __version__, fileserver, media
from vidcap.discovery import Entry, Problem, walk
from vidcap.errors import MediaError, ServerError, ServerUnreachableError
from vidcap.filesclient import FilesClient, node_url
from vidcap.sources import RemoteSource

TOKEN = "tok-" + "x7Q_" * 8
EXTS = (".mp4", ".mkv", ".mov")


@dataclasses.dataclass
class Running:
    server: fileserver.FileServer
    root: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def client(self, token: str = TOKEN) -> FilesClient:
        return FilesClient(self.base, token, timeout=20)


@pytest.fixture
def running(corpus: videos.Corpus) -> Iterator[Running]:
    server = fileserver.FileServer(corpus.root, TOKEN, verbose=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield Running(server, corpus.root)
    server.shutdown()
    server.server_close()
    thread.join(5)


def raw(
    run: Running, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request sent byte for byte as given (no client-side normalisation of the path)."""
    conn = http.client.HTTPConnection("127.0.0.1", run.server.port, timeout=20)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def call(coro_fn: Any) -> Any:
    return asyncio.run(coro_fn())


# -- access ----------------------------------------------------------------------------------------------


def test_wrong_token_is_the_same_404_as_an_unknown_route(running: Running) -> None:
    def shape(path: str) -> tuple[int, dict[str, str], bytes]:
        status, headers, body = raw(running, path)
        headers.pop("date")
        return status, headers, body

    reference = shape(f"/t/{TOKEN}/nope/top.mp4")
    assert reference[0] == 404 and reference[2] == b""
    for path in (
        "/t/WRONG/health",
        f"/t/{TOKEN[:-1]}/health",
        f"/t/{TOKEN}x/f/top.mp4",
        "/t//health",
        "/health",
        f"/{TOKEN}/health",
        f"/t/{TOKEN}/f/no such file.mp4".replace(" ", "%20"),
        f"/t/{TOKEN}",
    ):
        assert shape(path) == reference, path
    assert raw(running, f"/t/{TOKEN}/health")[0] == 200


@pytest.mark.parametrize(
    "rel",
    [
        "../secret.mp4",
        "%2e%2e/secret.mp4",
        "%2E%2E%2Fsecret.mp4",
        "..%2fsecret.mp4",
        "one/../../secret.mp4",
        "one/%2e%2e/%2e%2e/secret.mp4",
        "..%5csecret.mp4",
        "/etc/passwd",
        "%2Fetc%2Fpasswd",
        "top.mp4%00.txt",
        "%252e%252e/secret.mp4",
        "escape.mp4",
        "escape-dir/secret.mp4",
    ],
)
def test_traversal_is_refused_on_every_route(running: Running, rel: str) -> None:
    outside = running.root.parent
    (outside / "secret.mp4").write_bytes(b"SECRET")
    (running.root / "escape.mp4").symlink_to(outside / "secret.mp4")
    (running.root / "escape-dir").symlink_to(outside, target_is_directory=True)
    for route in ("f", "probe", "audio", "frames", "list"):
        status, _, body = raw(running, f"/t/{TOKEN}/{route}/{rel}?start=0&end=1&fps=1&max_pixels=4096")
        assert (status, body) == (404, b""), (route, rel)


def test_symlink_inside_the_root_is_served(running: Running, corpus: videos.Corpus) -> None:
    status, _, body = raw(running, f"/t/{TOKEN}/f/links/linked.mov")
    assert status == 200 and body == (corpus.root / "one/two/clip.mov").read_bytes()
    assert raw(running, f"/t/{TOKEN}/probe/links/linked.mov")[0] == 200


def test_listing_reports_links_out_of_the_root_without_serving_them(running: Running) -> None:
    outside = running.root.parent / "elsewhere"
    outside.mkdir()
    (outside / "far.mp4").write_bytes(b"x")
    (running.root / "out").symlink_to(outside, target_is_directory=True)
    (running.root / "out.mp4").symlink_to(outside / "far.mp4")

    async def go() -> list[Entry | Problem]:
        async with running.client() as client:
            return [item async for item in client.list("", EXTS)]

    items = {item.rel: item for item in call(go)}
    assert isinstance(items["out/far.mp4"], Problem) and items["out/far.mp4"].kind == "outside_root"
    assert isinstance(items["out.mp4"], Problem) and items["out.mp4"].kind == "outside_root"
    assert isinstance(items["top.mp4"], Entry)


# -- raw bytes -------------------------------------------------------------------------------------------


def test_ranges_are_byte_exact(running: Running, corpus: videos.Corpus) -> None:
    data = (corpus.root / "top.mp4").read_bytes()
    size = len(data)
    url = f"/t/{TOKEN}/f/top.mp4"
    status, headers, body = raw(running, url)
    assert (status, body) == (200, data)
    assert headers["accept-ranges"] == "bytes" and headers["content-type"] == "video/mp4"
    assert headers["content-length"] == str(size)
    cases = {
        "bytes=0-99": (0, 99),
        "bytes=1000-1999": (1000, 1999),
        "bytes=-100": (size - 100, size - 1),
        f"bytes={size - 10}-": (size - 10, size - 1),
        f"bytes=5-{size + 1000}": (5, size - 1),
        f"bytes=-{size * 2}": (0, size - 1),
    }
    for spec, (a, b) in cases.items():
        status, headers, body = raw(running, url, headers={"Range": spec})
        assert status == 206, spec
        assert body == data[a : b + 1], spec
        assert headers["content-range"] == f"bytes {a}-{b}/{size}", spec
        assert headers["content-length"] == str(b - a + 1)
    for spec in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}", "bytes=-0", "bytes=9-3"):
        status, headers, body = raw(running, url, headers={"Range": spec})
        assert (status, body, headers["content-range"]) == (416, b"", f"bytes */{size}"), spec
    # Multi-range and nonsense are ignored, as RFC 9110 allows: the whole file.
    for spec in ("bytes=0-1,5-6", "items=0-5", "bytes=-"):
        assert raw(running, url, headers={"Range": spec})[2] == data
    status, headers, body = raw(running, url, method="HEAD")
    assert (status, body, headers["content-length"]) == (200, b"", str(size))
    status, headers, body = raw(running, url, method="HEAD", headers={"Range": "bytes=10-19"})
    assert (status, body, headers["content-length"], headers["content-range"]) == (
        206,
        b"",
        "10",
        f"bytes 10-19/{size}",
    )


def test_keep_alive_connection_serves_several_requests(running: Running, corpus: videos.Corpus) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", running.server.port, timeout=20)
    try:
        for spec in ("bytes=0-9", "bytes=10-19"):
            conn.request("GET", f"/t/{TOKEN}/f/top.mp4", headers={"Range": spec})
            resp = conn.getresponse()
            assert resp.status == 206 and len(resp.read()) == 10
        conn.request("GET", f"/t/{TOKEN}/nope")
        assert conn.getresponse().read() == b""
        conn.request("GET", f"/t/{TOKEN}/health")
        assert json.loads(conn.getresponse().read())["ok"] is True
    finally:
        conn.close()


# -- listing ---------------------------------------------------------------------------------------------


def _local(root: Path, sub: str) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for item in walk(root / sub if sub else root, EXTS):
        if isinstance(item, Entry):
            out.append(("entry", item.rel, item.size, item.mtime))
        else:
            out.append(("problem", item.rel, item.kind, item.message, item.video))
    return out


def test_listing_equals_walk(running: Running, corpus: videos.Corpus) -> None:
    async def go(sub: str) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        async with running.client() as client:
            async for item in client.list(sub, EXTS):
                if isinstance(item, Entry):
                    real = Path(os.path.realpath(corpus.root))
                    assert item.path == str(real / sub / item.rel if sub else real / item.rel)
                    out.append(("entry", item.rel, item.size, item.mtime))
                else:
                    out.append(("problem", item.rel, item.kind, item.message, item.video))
        return out

    for sub in ("", "one/two", "names"):
        got = asyncio.run(go(sub))
        assert got == _local(corpus.root, sub), sub
    assert any(row[0] == "problem" and row[2] == "symlink_loop" for row in asyncio.run(go("")))
    status, headers, body = raw(running, f"/t/{TOKEN}/list/?ext=.mp4,MKV,mov")
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert lines[-1] == {"end": True, "count": len(lines) - 1}
    assert len(lines) - 1 == len(_local(corpus.root, ""))
    assert raw(running, f"/t/{TOKEN}/list/no-such-dir")[0] == 404


def _many_files(root: Path, n: int = 10_000, per_dir: int = 100) -> Path:
    big = root / "many"
    for d in range(n // per_dir):
        sub = big / f"dir {d:03d}"
        sub.mkdir(parents=True)
        for i in range(per_dir):
            (sub / f"a rather long video file name number {i:05d}.mp4").touch()
    return big


def test_listing_of_10000_files_streams_in_bounded_memory(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    _many_files(running.root)
    gate, walked = threading.Event(), {"n": 0, "gate_timed_out": False}

    def gated_walk(root: Path, exts: Any) -> Iterator[Entry | Problem]:
        for item in walk(root, exts):
            walked["n"] += 1
            if walked["n"] == 5000:  # the client must have its first line while the server is here
                walked["gate_timed_out"] = not gate.wait(10)
            yield item

    monkeypatch.setattr(fileserver, "walk", gated_walk)
    conn = http.client.HTTPConnection("127.0.0.1", running.server.port, timeout=30)
    t0 = time.perf_counter()
    conn.request("GET", f"/t/{TOKEN}/list/many?ext=.mp4")
    resp = conn.getresponse()
    first = resp.readline()
    t_first = time.perf_counter() - t0
    walked_at_first = walked["n"]
    gate.set()
    count = 1 + sum(1 for _ in iter(resp.readline, b""))
    conn.close()
    assert json.loads(first)["path"].startswith("dir 000/")
    assert walked_at_first < 10_000 and not walked["gate_timed_out"]
    assert count == 10_001

    # Memory: the server's peak while streaming everything, against holding the listing in a list.
    monkeypatch.setattr(fileserver, "walk", walk)
    gc.collect()
    tracemalloc.start()
    try:
        reference = list(walk(running.root / "many", (".mp4",)))
        held = tracemalloc.get_traced_memory()[0]
        del reference
        gc.collect()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", running.server.port, timeout=30)
        conn.request("GET", f"/t/{TOKEN}/list/many?ext=.mp4")
        resp = conn.getresponse()
        lines = sum(1 for _ in iter(resp.readline, b""))
        total = time.perf_counter() - t0
        conn.close()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert lines == 10_001
    print(
        f"\nlisting 10k: first line {t_first * 1000:.1f} ms (gated), total {total * 1000:.0f} ms "
        f"(under tracemalloc); peak growth {peak / 1024:.0f} KiB vs {held / 1024:.0f} KiB to hold it"
    )
    assert peak < 1024 * 1024 and peak < held / 4


def test_cut_listing_is_an_error(running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_walk(root: Path, exts: Any) -> Iterator[Entry | Problem]:
        yield from list(walk(root, exts))[:3]
        raise OSError("disk went away")

    monkeypatch.setattr(fileserver, "walk", broken_walk)

    async def go() -> int:
        n = 0
        async with running.client() as client:
            async for _ in client.list("", EXTS):
                n += 1
        return n

    with pytest.raises(ServerError, match="cut off"):
        call(go)
    assert raw(running, f"/t/{TOKEN}/health")[0] == 200


# -- probe, audio, frames --------------------------------------------------------------------------------


def test_probe_equals_media_probe_and_is_cached(
    running: Running, corpus: videos.Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_probe = media.probe

    def counting(path: str, *, audio: bool = True) -> media.Probe:
        calls.append(path)
        return real_probe(path, audio=audio)

    monkeypatch.setattr(media, "probe", counting)
    rels = ["top.mp4", "one/a.mkv", "vfr/variable.mp4", "names/url #frag?q=1&x=%20 100%.mp4"]

    async def go() -> list[media.Probe]:
        async with running.client() as client:
            return [await client.probe(rel, audio=True) for rel in rels]

    first = call(go)
    assert first == [real_probe(str(corpus.root / rel), audio=True) for rel in rels]
    assert len(calls) == len(rels)
    assert call(go) == first and len(calls) == len(rels)
    os.utime(corpus.root / "top.mp4", (1_000_000, 1_000_000))  # a changed file is probed again
    call(go)
    assert len(calls) == len(rels) + 1


@pytest.mark.parametrize(
    ("rel", "kind"),
    [("bad/truncated.mp4", "corrupt"), ("bad/empty.mp4", "empty"), ("bad/text.mp4", "not_video")],
)
def test_probe_of_bad_files_gives_their_kind(running: Running, rel: str, kind: str) -> None:
    async def go() -> None:
        async with running.client() as client:
            await client.probe(rel, audio=True)

    with pytest.raises(MediaError) as info:
        call(go)
    assert info.value.kind == kind and "\n" not in info.value.message
    status, _, body = raw(running, f"/t/{TOKEN}/probe/{rel}")
    assert status == 422 and json.loads(body)["error"] == kind


def _wav(data: bytes) -> tuple[int, int, int, int]:
    with wave.open(io.BytesIO(data)) as w:
        return w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()


def test_audio_span_is_a_wav_of_the_right_length(running: Running, corpus: videos.Corpus) -> None:
    status, headers, body = raw(running, f"/t/{TOKEN}/audio/top.mp4?start=0.5&end=1.5")
    assert status == 200 and headers["content-type"] == "audio/wav"
    assert _wav(body) == (16000, 1, 2, 16000)
    status, _, whole = raw(running, f"/t/{TOKEN}/audio/top.mp4")
    assert status == 200 and _wav(whole)[3] == pytest.approx(2.0 * 16000, rel=0.05)
    status, _, body = raw(running, f"/t/{TOKEN}/audio/one/a.mkv?start=0&end=1")
    assert status == 404 and json.loads(body)["error"] == "no_audio"
    for bad in ("start=x", "start=1&end=0.5", "end=nan", "start=-1"):
        assert raw(running, f"/t/{TOKEN}/audio/top.mp4?{bad}")[0] == 400, bad

    rel = "names/café 動画.mp4" if Path("names/café 動画.mp4") in corpus.with_audio else "top.mp4"

    async def go() -> tuple[str | None, str | None]:
        async with running.client() as client:
            return await client.audio_data_url(rel, 0.25, 1.75), await client.audio_data_url(
                "one/a.mkv", 0, 1
            )

    url, none = call(go)
    assert none is None
    assert url == media.encode_audio(str(corpus.root / rel), 0.25, 1.75)[0]
    assert _wav(base64.b64decode(url.split(",", 1)[1]))[3] == 24000


def test_frames_equal_encode_inline(running: Running, corpus: videos.Corpus) -> None:
    spans = [("top.mp4", 0.0, 2.0, 2.0, 64 * 64), ('names/say "hi".mp4', 0.5, 1.5, 4.0, 160 * 120)]

    async def go() -> list[media.InlineMedia]:
        async with running.client() as client:
            return [await client.frames(*span) for span in spans]

    for got, (rel, start, end, fps, px) in zip(call(go), spans, strict=True):
        path = str(corpus.root / rel)
        want = media.encode_inline(path, media.probe(path), start, end, fps, px, with_audio=False)
        assert got == want
    assert raw(running, f"/t/{TOKEN}/frames/top.mp4?start=0&end=1&fps=0&max_pixels=4096")[0] == 400
    assert raw(running, f"/t/{TOKEN}/frames/top.mp4?start=0&end=1")[0] == 400
    assert raw(running, f"/t/{TOKEN}/frames/top.mp4?start=0&end=9999&fps=30&max_pixels=4096")[0] == 400
    status, _, body = raw(running, f"/t/{TOKEN}/frames/bad/text.mp4?start=0&end=1&fps=1&max_pixels=4096")
    assert status == 422 and json.loads(body)["error"] == "not_video"


# -- client ----------------------------------------------------------------------------------------------


def test_client_round_trips_hostile_names(running: Running, corpus: videos.Corpus) -> None:
    hostile = [rel for rel in corpus.good if rel.parts[0] == "names"]
    assert len(hostile) >= 16

    async def go() -> None:
        async with running.client() as client, httpx.AsyncClient() as plain:
            listed = {item.rel async for item in client.list("names", EXTS) if isinstance(item, Entry)}
            assert listed == {str(rel.relative_to("names")) for rel in hostile}
            for rel in hostile:
                probe = await client.probe(str(rel), audio=True)
                assert probe.has_audio == (rel in corpus.with_audio), rel
                resp = await plain.get(client.url("f", str(rel)))
                assert resp.status_code == 200 and resp.content == (corpus.root / rel).read_bytes(), rel

    call(go)


def test_node_url_quotes_once() -> None:
    url = node_url(8123, TOKEN, "audio", "a b/#1?%/new\nline.mp4", start=1.5, end=3.0)
    assert url == (f"http://127.0.0.1:8123/t/{TOKEN}/audio/a%20b/%231%3F%25/new%0Aline.mp4?start=1.5&end=3.0")
    assert node_url(1, TOKEN, "f", "x.mp4") == f"http://127.0.0.1:1/t/{TOKEN}/f/x.mp4"


def test_health_through_the_client(running: Running, corpus: videos.Corpus) -> None:
    async def go(token: str) -> dict[str, Any]:
        async with running.client(token) as client:
            return await client.health()

    assert call(lambda: go(TOKEN)) == {
        "ok": True,
        "root": os.path.realpath(corpus.root),
        "version": __version__,
    }
    with pytest.raises(ServerError, match="wrong token") as info:
        call(lambda: go("not-the-token-at-all"))
    assert "not-the-token" not in str(info.value)


def test_unreachable_server_is_reported_as_such() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go() -> None:
        async with FilesClient(f"http://127.0.0.1:{port}", TOKEN, timeout=5) as client:
            await client.health()

    with pytest.raises(ServerUnreachableError, match="tunnel") as info:
        call(go)
    assert TOKEN not in str(info.value)


# -- robustness and secrecy ------------------------------------------------------------------------------


def test_bad_requests_do_not_hurt_the_server_and_the_token_is_never_logged(
    running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    port = running.server.port
    garbage = [
        f"GET /t/{TOKEN}/health HTTP/9.9\r\n\r\n".encode(),
        f"GET /t/{TOKEN}/f/top.mp4 NOT-HTTP\r\n\r\n".encode(),
        f"BREW /t/{TOKEN}/health HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        f"POST /t/{TOKEN}/health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc".encode(),
        b"\x00\xff\r\n\r\n",
    ]
    for data in garbage:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(data)
            reply = s.recv(65536)
            assert TOKEN.encode() not in reply and b"<html" not in reply.lower()
    # A client that hangs up in the middle of a listing and of a download.
    _many_files(running.root, n=2000)
    for path in (f"/t/{TOKEN}/list/many", f"/t/{TOKEN}/f/one/a.mp4"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            s.recv(100)
    raw(running, f"/t/{TOKEN}/f/top.mp4", headers={"Range": "bytes=0-3"})
    raw(running, "/t/WRONG/health")
    assert raw(running, f"/t/{TOKEN}/health")[0] == 200
    time.sleep(0.2)  # let the hung-up handlers finish their lines
    logged = capsys.readouterr().err
    assert "/t/***/health" in logged and "/t/***/f/top.mp4" in logged
    assert TOKEN not in logged and "Traceback" not in logged


def test_token_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state dir" / "files.token"
    token = fileserver.load_or_create_token(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 32
    assert fileserver.load_or_create_token(path) == token
    assert fileserver.load_or_create_token(None) != token
    path.write_text("short\n")
    with pytest.raises(Exception, match="at least 16") as info:
        fileserver.load_or_create_token(path)
    assert "short" not in str(info.value)


def test_serve_writes_the_port_and_stops_on_sigterm(tmp_path: Path, corpus: videos.Corpus) -> None:
    port_file = tmp_path / "port"
    code = (
        "import sys; from pathlib import Path; from vidcap.fileserver import serve, load_or_create_token; "
        "serve(Path(sys.argv[1]), token=load_or_create_token(Path(sys.argv[2])), port_file=Path(sys.argv[3]))"
    )
    token_file = tmp_path / "token"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(corpus.root), str(token_file), str(port_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        port = int(port_file.read_text())
        token = token_file.read_text().strip()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", f"/t/{token}/health")
        assert json.loads(conn.getresponse().read())["ok"] is True
        conn.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert token.encode() not in out + err


def test_count_matches_what_the_listing_gives(running: Running, corpus: videos.Corpus) -> None:
    """The progress bar's early total for a cluster source: counted next to the files, per shard."""

    async def go() -> tuple[list[int | None], int | None, int]:
        async with running.client() as client:
            listed = [
                i
                async for i in client.list("", EXTS)
                if isinstance(i, Entry) or i.video  # type: ignore[union-attr]
            ]
            shards = [await client.count("", EXTS, (i, 3)) for i in range(3)]
            whole = await client.count("", EXTS, None)
            return shards, whole, len(listed)

    shards, whole, listed = asyncio.run(go())
    assert whole == listed and sum(s or 0 for s in shards) == listed

    async def through_the_source() -> int | None:  # what a cluster run's progress bar gets
        client = running.client()
        source = RemoteSource(
            client,
            label="c:x",
            root=str(running.root),
            subdir="one",
            node_files_port=0,
            token=TOKEN,
            extensions=tuple(EXTS),
        )
        try:
            return await source.count((0, 1))
        finally:
            await source.close()

    one = [p for p in corpus.good + corpus.bad if p.parts[0] == "one"]
    assert asyncio.run(through_the_source()) == len(one)
    assert all(s is not None for s in shards)
    assert raw(running, f"/t/{TOKEN}/count/?shard=3/3")[0] == 400
    assert raw(running, f"/t/{TOKEN}/count/no-such-dir")[0] == 404
    assert raw(running, "/t/wrong-token-0123456789/count/")[0] == 404
