"""Captioning a cluster directory from the laptop: real sshd, the tunnel process, the file server in its
own process, the vLLM stand-in; all through the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import videos
from standin.server import StandIn

from vidcap.records import CaptionRecord

VIDCAP = str(Path(sys.executable).parent / "vidcap")
PIXELS = 160 * 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    return json.dumps(value)  # JSON strings, numbers and booleans are valid TOML


@dataclass
class Cluster:
    config: Path
    server: Any
    files: subprocess.Popen[bytes]
    root: Path
    sshd: Any

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [VIDCAP, *args, "--config", str(self.config)], capture_output=True, text=True, timeout=timeout
        )


def write_config(path: Path, ssh: dict[str, Any], endpoint: dict[str, Any], local: dict[str, int]) -> None:
    lines = ['default_profile = "cluster"', "[profiles.cluster.ssh]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in ssh.items() if v is not None]
    lines += ["[profiles.cluster.endpoint]"] + [f"{k} = {toml_value(v)}" for k, v in endpoint.items()]
    lines += ["[profiles.cluster.server]"] + [f"{k} = {toml_value(v)}" for k, v in local.items()]
    lines += ["[profiles.cluster.caption]", f"max_pixels = {PIXELS}", "concurrency = 8", "server_wait = 60.0"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(params=["sshtunnel", "openssh"])
def cluster(
    request: pytest.FixtureRequest, corpus: videos.Corpus, sshd_server: Any, tmp_path: Path
) -> Iterator[Cluster]:
    """This machine plays the login node (sshd) and the GPU node (stand-in + file server on loopback)."""
    node = tmp_path / "node"
    node.mkdir()
    token_file, port_file = node / "token", node / "files.port"
    files = subprocess.Popen(
        [
            VIDCAP,
            "files",
            "serve",
            str(corpus.root),
            "--token-file",
            str(token_file),
            "--port-file",
            str(port_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while not port_file.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert port_file.exists(), "file server did not start"
    secrets = node / "secrets.json"
    secrets.write_text(json.dumps({"api_key": "sk-test-key", "files_token": token_file.read_text().strip()}))
    secrets.chmod(0o600)
    server = StandIn(
        allowed_local_media_path=str(corpus.root), video_max_pixels=PIXELS, api_key="sk-test-key", seed=3
    ).start()
    ssh = sshd_server.ssh_config(backend=request.param).model_dump()
    endpoint = {
        "node": "127.0.0.1",
        "vllm_port": server.port,
        "files_port": int(port_file.read_text()),
        "secrets_file": str(secrets),
    }
    config = tmp_path / "vidcap.toml"
    write_config(config, ssh, endpoint, {"local_vllm_port": free_port(), "local_files_port": free_port()})
    c = Cluster(config, server, files, corpus.root, sshd_server)
    try:
        yield c
    finally:
        c.cli("tunnel", "down")
        server.stop()
        files.send_signal(signal.SIGTERM)
        files.wait(10)


def records(out: Path) -> dict[str, CaptionRecord]:
    found = {}
    for path in out.rglob("*.json"):
        if "_vidcap" not in path.relative_to(out).parts:
            rec = CaptionRecord.model_validate_json(path.read_text(encoding="utf-8"))
            found[rec.video.path] = rec
    return found


def tunnel_state(home: Path) -> Path:
    return home / "state" / "tunnels" / "cluster.json"


def test_caption_a_cluster_directory(cluster: Cluster, corpus: videos.Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = cluster.cli("caption", f"cluster:{cluster.root}", "--out", str(out), "--json")
    assert res.returncode == 1, res.stderr  # the bad files fail; everything else is captioned
    summary = json.loads(res.stdout)
    good = {str(p) for p in corpus.good}
    assert set(records(out)) == good
    failed = {json.loads(line)["path"] for line in (out / "_vidcap/failures.jsonl").read_text().splitlines()}
    assert failed == {str(p) for p in corpus.bad}
    assert summary["source"] == f"cluster:{cluster.root}"
    # vLLM read the videos on its own node (file://), the laptop only listed and probed
    assert all(r.params.media == "file" for r in records(out).values())
    assert all(k.startswith(str(cluster.root)) for k in cluster.server.stats()["by_video"])
    # the tunnel opened for the run is closed after it
    assert not tunnel_state(Path(os.environ["VIDCAP_HOME"])).exists()
    assert "sk-test-key" not in res.stderr + res.stdout
    # a rerun sends nothing for what is done
    cluster.server.reset_stats()
    res = cluster.cli("caption", f"cluster:{cluster.root}", "--out", str(out), "--json")
    assert json.loads(res.stdout)["counts"]["skipped"] == len(good)
    assert set(cluster.server.stats()["by_video"]) <= {str(cluster.root / p) for p in corpus.bad}


def test_http_media_and_windows_through_the_file_server(
    cluster: Cluster, corpus: videos.Corpus, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    res = cluster.cli(
        "caption", f"cluster:{cluster.root}/one", "--out", str(out), "--media", "http", "--json"
    )
    assert res.returncode == 0, res.stderr
    recs = records(out)
    assert recs and all(r.params.media == "http" for r in recs.values())
    assert set(recs) == {str(p.relative_to("one")) for p in corpus.good if p.parts[0] == "one"}
    out2 = tmp_path / "out2"
    res = cluster.cli(
        "caption", f"cluster:{cluster.root}/one", "--out", str(out2), "--window", "1.5", "--json"
    )
    assert res.returncode == 0, res.stderr
    windowed = records(out2)
    assert all(r.segments and len(r.segments) >= 2 and r.params.media == "inline" for r in windowed.values())


def test_tunnel_up_status_down(cluster: Cluster, tmp_path: Path) -> None:
    home = Path(os.environ["VIDCAP_HOME"])
    res = cluster.cli("tunnel", "up", "--json")
    assert res.returncode == 0, res.stderr
    state = json.loads(res.stdout)
    pid = state["pid"]
    assert tunnel_state(home).stat().st_mode & 0o777 == 0o600
    assert cluster.cli("tunnel", "up").returncode == 0  # idempotent
    status = json.loads(cluster.cli("tunnel", "status", "--json").stdout)
    assert status[0]["status"] == "up" and status[0]["checks"] == {"vllm": "ok", "files": "ok"}
    # a caption run uses the running tunnel and leaves it up
    out = tmp_path / "out"
    res = cluster.cli("caption", f"cluster:{cluster.root}/one", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert json.loads(cluster.cli("tunnel", "status", "--json").stdout)[0]["pid"] == pid
    # a remote dry run lists and probes through the file server and sends nothing to vLLM
    cluster.server.reset_stats()
    res = cluster.cli(
        "caption", f"cluster:{cluster.root}/one", "--out", str(tmp_path / "o2"), "--dry-run", "--json"
    )
    assert res.returncode == 0, res.stderr
    planned = {r["path"]: r for r in json.loads(res.stdout) if "requests" in r}
    assert planned and all(r["requests"] == 1 and r["est_tokens"] > 0 for r in planned.values())
    assert cluster.server.stats()["requests"] == 0
    assert cluster.cli("tunnel", "down").returncode == 0
    assert not tunnel_state(home).exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert json.loads(cluster.cli("tunnel", "status", "--json").stdout)[0]["status"] == "down"


def test_local_port_taken_is_a_clear_error(cluster: Cluster) -> None:
    text = cluster.config.read_text()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        cluster.config.write_text(text.replace("local_vllm_port = ", f"local_vllm_port = {port}\n# ", 1))
        res = cluster.cli("tunnel", "up")
    assert res.returncode == 3
    assert f"local port {port}" in res.stderr and "in use" in res.stderr


def test_caption_survives_a_dropped_ssh_connection(
    cluster: Cluster, corpus: videos.Corpus, tmp_path: Path
) -> None:
    assert cluster.cli("tunnel", "up").returncode == 0
    cluster.server.latency = 0.3
    cluster.server.slots = 2
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            VIDCAP,
            "caption",
            f"cluster:{cluster.root}",
            "--out",
            str(out),
            "--json",
            "--config",
            str(cluster.config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while len(records(out) if out.exists() else {}) < 4 and time.time() < deadline:
        time.sleep(0.05)
    cluster.sshd.kill_connections()
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 1, stderr
    assert set(records(out)) == {str(p) for p in corpus.good}
    counts = json.loads(stdout)["counts"]
    assert counts["done"] == len(corpus.good) and counts["failed"] == len(corpus.bad)
    # nothing was captioned twice: one 200 per good video, plus the audio check
    assert sum(cluster.server.stats()["by_video"].values()) <= len(corpus.good) + 1
    status = json.loads(cluster.cli("tunnel", "status", "--json").stdout)[0]
    assert status["status"] == "up" and status["reconnects"] >= 1


def test_changed_host_key_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    cluster.sshd.rotate_host_key()
    res = cluster.cli("tunnel", "up")
    assert res.returncode == 3
    assert "host key" in res.stderr.lower()
    assert not tunnel_state(Path(os.environ["VIDCAP_HOME"])).exists()
    res = cluster.cli("caption", f"cluster:{cluster.root}", "--out", str(tmp_path / "o"))
    assert res.returncode == 3 and "host key" in res.stderr.lower()
    assert not (tmp_path / "o").exists()
