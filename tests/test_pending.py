"""vidcap report --remote: the real sshd, the real GNU find on the "cluster", the real rsync of vidcap sync.

The cluster is a directory on this machine reached through the test sshd (the cluster home is this
user's home; the paths are absolute temp paths). Its names carry spaces, quotes, ``$(x)``, ``%``, a
newline and non-ASCII letters.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import videos
from conftest import require_integration
from sshd import SSHServer, write_profile

from vidcap import config, pending, sync
from vidcap.config import SSHConfig
from vidcap.errors import ConfigError, UsageError
from vidcap.transport import connect

VIDCAP = str(Path(sys.executable).parent / "vidcap")
HOSTILE = "x 'q' \"d\" $(x) %d ü"
TAG = "qwen3-omni"  # the model tag of the default model
T0 = 1_700_000_000


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("rsync", "find"):
        if shutil.which(tool) is None:
            require_integration(f"{tool} (apt-get install rsync findutils)")


# ---- a laptop and a cluster --------------------------------------------------------------------------


@dataclass
class Site:
    work: Path  # the laptop's current directory; vidcap sync --to default is work/captions
    config: Path
    videos: Path  # paths.videos_dir on the cluster
    captions: Path  # paths.captions_dir on the cluster
    sshd: SSHServer

    @property
    def out(self) -> Path:  # the cluster output dir of the default model
        return self.captions / TAG

    @property
    def local(self) -> Path:  # where vidcap sync puts it
        return self.work / "captions" / TAG

    def write_config(self, ssh: SSHConfig | None = None, **paths: str) -> None:
        write_profile(
            self.config,
            ssh or self.sshd.ssh_config(),
            videos_dir=paths.get("videos_dir", str(self.videos)),
            captions_dir=paths.get("captions_dir", str(self.captions)),
        )

    def cfg(self) -> config.Config:
        return config.load(self.config)[0]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [VIDCAP, "report", "--config", str(self.config), *args],
            cwd=self.work, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip


def make_site(tmp_path: Path, sshd: SSHServer, backend: str = "sshtunnel") -> Site:
    work = tmp_path / f"work {HOSTILE}"
    work.mkdir()
    cluster = tmp_path / f"cluster {HOSTILE}"
    site = Site(work, work / "vidcap.toml", cluster / "datasets" / "videos", cluster / "captions", sshd)
    site.videos.mkdir(parents=True)
    site.out.mkdir(parents=True)
    site.write_config(sshd.ssh_config(backend))
    return site


def put(root: Path, rel: str, data: bytes, mtime: float | None = T0) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def record(rel: str, caption: str = "a caption") -> bytes:
    """Enough of a vidcap.caption/1 record for vidcap.report."""
    return json.dumps(
        {
            "schema": "vidcap.caption/1",
            "video": {"path": rel, "size": 1, "mtime": T0, "duration_s": 1.0},
            "model": "Qwen/Qwen3-Omni-30B-A3B-Instruct",
            "caption": caption,
            "usage": {"prompt_tokens": 100, "completion_tokens": 10},
            "finish_reason": "stop",
            "timing": {"latency_s": 1.5},
        }
    ).encode()


def failure(path: str, error: str, ts: str) -> str:
    return json.dumps(
        {"ts": ts, "run_id": "r", "path": path, "error": error, "message": "m", "attempts": 1}
        | {"retryable": False}
    )


NEWLINE = "new\nline.mp4"
UNICODE = "ü 日本/clip é.webm"
SPACES = f"sub {HOSTILE}/a b.MKV"  # upper-case extension: still a video
CAPTIONED = ["real clip.mp4", NEWLINE, UNICODE, SPACES]
UNCAPTIONED = ["failed 1.mp4", "failed 2.mov", "tab\tname.avi"]


def fill(site: Site) -> None:
    """The cluster: 7 videos (one real), 4 with records, 3 without (2 of them failed), the clutter a run
    leaves in an output dir, and files that are not videos."""
    videos.make_video(site.videos / "real clip.mp4", duration=1.0, audio=True)
    for rel in CAPTIONED[1:] + UNCAPTIONED:
        put(site.videos, rel, b"not really a video")
    put(site.videos, "notes.txt", b"not a video")
    put(site.videos, "real clip.mp4.json", b"{}")  # a sidecar with a non-video extension
    for rel in CAPTIONED:
        put(site.out, rel + ".json", record(rel))
    put(site.out, "_vidcap/lock", b"123")
    put(site.out, "_vidcap/runs/20250101T000000.json", b'{"counts": {"done": 4}, "wall_s": 8}')
    put(site.out, ".failed 1.mp4.json" + ".vidcap-tmp", b'{"half')  # a record being written
    put(site.out, ".vidcap-partial/failed 2.mov.json", b"{}")
    ledger = [
        failure("failed 1.mp4", "timeout", "2025-01-01T00:00:00.000+00:00"),
        failure("failed 1.mp4", "corrupt", "2025-01-03T00:00:00.000+00:00"),  # latest: corrupt
        failure("failed 2.mov", "http_400", "2025-01-02T00:00:00.000+00:00"),
        failure(NEWLINE, "timeout", "2025-01-01T00:00:00.000+00:00"),  # captioned since: not current
        "not json {",
    ]
    put(site.out, "_vidcap/failures.jsonl", "\n".join(ledger).encode())  # no final newline
    later = failure("failed 1.mp4", "timeout", "2025-01-02T00:00:00.000+00:00")  # older than corrupt
    put(site.out, "_vidcap/failures-shard1.jsonl", (later + "\n").encode())


@pytest.fixture(params=["sshtunnel", "openssh"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ---- the listing -------------------------------------------------------------------------------------


def test_list_remote_names_records_and_failures(tmp_path: Path, sshd_server: SSHServer, backend: str) -> None:
    site = make_site(tmp_path, sshd_server, backend)
    fill(site)
    prof = site.cfg().profile("cluster")
    with connect(prof.ssh) as conn:
        listing = pending.list_remote(conn, str(site.videos), str(site.out), prof.caption.extensions)
    assert sorted(listing.videos) == sorted(CAPTIONED + UNCAPTIONED)
    assert set(listing.records) == {rel + ".json" for rel in CAPTIONED}
    real = site.out / "real clip.mp4.json"
    assert listing.records["real clip.mp4.json"] == (real.stat().st_size, T0)
    assert listing.out_exists and listing.warnings == []
    assert {f["path"]: f["error"] for f in listing.failures} == {
        "failed 1.mp4": "corrupt",
        "failed 2.mov": "http_400",
    }

    # nothing synced yet: every cluster record is pending, nothing is only here
    result = pending.compare(listing, site.local)
    assert not result.local_exists
    assert (result.videos, result.cluster_records, result.uncaptioned) == (7, 4, 3)
    assert result.uncaptioned_paths == sorted(UNCAPTIONED)
    assert result.not_synced == 4 and result.not_synced_paths == sorted(rel + ".json" for rel in CAPTIONED)
    assert result.cluster_failures == 2
    assert result.cluster_failures_by_class == {"corrupt": 1, "http_400": 1}
    assert result.local_only == 0


def test_missing_source_is_an_error_missing_out_is_not(tmp_path: Path, sshd_server: SSHServer) -> None:
    site = make_site(tmp_path, sshd_server)
    put(site.videos, "a.mp4", b"x")
    prof = site.cfg().profile("cluster")
    with connect(prof.ssh) as conn:
        with pytest.raises(UsageError, match="does not exist on the cluster"):
            pending.list_remote(conn, str(site.videos / "missing"), str(site.out), [".mp4"])
        with pytest.raises(UsageError, match="not a directory"):
            pending.list_remote(conn, str(site.videos / "a.mp4"), str(site.out), [".mp4"])
        listing = pending.list_remote(conn, str(site.videos), str(site.captions / "other-model"), [".mp4"])
        assert not listing.out_exists and listing.records == {} and listing.failures == []
        assert listing.videos == ["a.mp4"]
        # a relative path is under the cluster home, and a name starting with "-" is not an option
        home = pwd.getpwnam(sshd_server.user).pw_dir
        dashed = site.videos / "-name x"
        put(dashed, "b.mp4", b"x")
        listing = pending.list_remote(conn, os.path.relpath(dashed, home), str(site.out), [".mp4"])
        assert listing.videos == ["b.mp4"]


# ---- against a real sync -----------------------------------------------------------------------------


def test_after_sync_nothing_pending_then_what_changed(tmp_path: Path, sshd_server: SSHServer) -> None:
    site = make_site(tmp_path, sshd_server)
    fill(site)
    cfg = site.cfg()
    done = sync.run(cfg, "cluster", site.work / "captions")
    assert done.status == "ok" and done.files >= 4, done
    result = pending.check(cfg, "cluster", site.local)
    assert result.local_exists and result.host == "127.0.0.1"
    assert (result.cluster_records, result.not_synced, result.local_only, result.local_newer) == (4, 0, 0, 0)
    assert result.uncaptioned == 3 and result.cluster_failures == 2

    # on the cluster: one record rewritten later (touched), one new video captioned
    os.utime(site.out / f"{NEWLINE}.json", (T0 + 100, T0 + 100))
    put(site.out, "failed 2.mov.json", record("failed 2.mov"), mtime=T0 + 200)
    # here: a record the cluster does not have, and one edited here (newer: sync keeps it)
    put(site.local, "laptop only.mp4.json", record("laptop only.mp4"))
    put(site.local, f"{UNICODE}.json", record(UNICODE, "edited here"), mtime=T0 + 300)
    result = pending.check(cfg, "cluster", site.local)
    assert result.not_synced == 2
    assert result.not_synced_paths == sorted(["failed 2.mov.json", f"{NEWLINE}.json"])
    assert (result.local_only, result.local_newer) == (1, 1)
    assert result.uncaptioned == 2 and result.cluster_failures_by_class == {"corrupt": 1}

    sync.run(cfg, "cluster", site.work / "captions")
    result = pending.check(cfg, "cluster", site.local)
    assert (result.not_synced, result.local_newer, result.local_only) == (0, 1, 1)


# ---- the command line --------------------------------------------------------------------------------


def test_cli_json_and_table(tmp_path: Path, sshd_server: SSHServer) -> None:
    site = make_site(tmp_path, sshd_server)
    fill(site)
    # nothing here yet: --remote still reports the cluster (the default dir is captions/<model tag>)
    res = site.cli("--remote", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["records"] == 0 and data["out"] == f"captions/{TAG}"
    remote = data["remote"]
    assert remote["cluster_dir"] == str(site.out) and remote["source"] == str(site.videos)
    assert (remote["cluster_records"], remote["not_synced"], remote["uncaptioned"]) == (4, 4, 3)
    assert remote["cluster_failures_by_class"] == {"corrupt": 1, "http_400": 1}
    assert NEWLINE + ".json" in remote["not_synced_paths"]

    assert sync.run(site.cfg(), "cluster", site.work / "captions").status == "ok"
    put(site.out, f"{SPACES}.json", record(SPACES, "redone"), mtime=T0 + 50)
    res = site.cli("--remote")
    assert res.returncode == 0, res.stderr
    table = res.stdout
    assert f"vidcap report: captions/{TAG}" in table
    assert "captions" in table and "4" in table  # the local report: 4 records here
    for row in ("cluster dir", "records there", "not yet synced", "no record there", "failures there"):
        assert row in table, table
    assert "1 (run 'vidcap sync')" in table
    assert "3 of 7 videos under" in table
    assert "corrupt=1 http_400=1" in table
    assert repr(f"{SPACES}.json") in table  # the path that is not home yet

    # an explicit OUT_DIR and --source (relative to the cluster home, written with ~/)
    home = pwd.getpwnam(sshd_server.user).pw_dir
    source = os.path.relpath(site.videos / f"sub {HOSTILE}", home)
    res = site.cli(str(site.local), "--remote", "--json", "--source", "~/" + source)
    assert res.returncode == 0, res.stderr
    remote = json.loads(res.stdout)["remote"]
    assert remote["source"] == source and remote["videos"] == 1 and remote["uncaptioned"] == 1
    assert json.loads(res.stdout)["records"] == 4

    # without --remote the local report is as before: no "remote" key, no SSH
    res = site.cli("--json")
    assert res.returncode == 0, res.stderr
    assert "remote" not in json.loads(res.stdout) and json.loads(res.stdout)["records"] == 4


def test_cli_errors(tmp_path: Path, sshd_server: SSHServer) -> None:
    site = make_site(tmp_path, sshd_server)
    # the default dir missing and no --remote
    res = site.cli()
    assert res.returncode == 2 and "does not exist" in res.stderr and "vidcap sync" in res.stderr
    res = site.cli("--source", "x")
    assert res.returncode == 2 and "--source goes with --remote" in res.stderr
    # the source dir missing on the cluster
    res = site.cli("--remote", "--source", str(site.videos / "nope"))
    assert res.returncode == 2 and "does not exist on the cluster" in res.stderr
    # the cluster cannot be reached
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = int(s.getsockname()[1])
    site.write_config(sshd_server.ssh_config(port=closed))
    res = site.cli("--remote")
    assert res.returncode == 3 and "TransportError" in res.stderr
    # a profile without ssh.host
    site.config.write_text("[profiles.local.caption]\nconcurrency = 2\n", encoding="utf-8")
    res = site.cli("--remote")
    assert res.returncode == 2 and "no ssh.host" in res.stderr
    (site.work / "captions" / TAG).mkdir(parents=True)
    res = site.cli("--remote")
    assert res.returncode == 2 and "no ssh.host" in res.stderr


def test_profile_without_host_in_the_library(tmp_path: Path) -> None:
    cfg = config.Config()
    with pytest.raises(ConfigError, match=r"no ssh\.host"):
        pending.check(cfg, "local", tmp_path)


# ---- parsing -----------------------------------------------------------------------------------------


def test_parse_records_and_failures() -> None:
    data = (
        b"a\tb.mp4.json\t12\t1700000000.9999999999\0"  # a tab in the name; no rounding up
        b"bad\xff name.json\t3\t-1.5\0"  # not UTF-8; before 1970
        b"\0" + b'{"ts": "2025-01-01T00:00:00Z", "path": "x.mp4", "error": "a"}\n'
        b'{"ts": "2025-01-01T00:00:00+00:00", "path": "x.mp4", "error": "b"}\n'  # a tie: the later line
        b'{"ts": "2024-12-31T23:00:00-02:00", "path": "y.mp4", "error": "c"}\n'
        b'{"ts": "2025-01-01T00:00:00+00:00", "path": "y.mp4", "error": "d"}\n'  # earlier than c
        b'{"path": "a\\tb.mp4", "error": "e"}\n'
    )
    records, ledger = pending.parse_records(data)
    assert records == {"a\tb.mp4.json": (12, 1_700_000_000), "bad\udcff name.json": (3, -2)}
    failures = pending.current_failures(ledger, records)
    assert [(f["path"], f["error"]) for f in failures] == [("x.mp4", "b"), ("y.mp4", "c")]
    assert pending.parse_records(b"cut\t1\t2") == ({}, b"")
    assert pending.remote_arg("-x") == "./-x" and pending.remote_arg("/abs") == "/abs"
