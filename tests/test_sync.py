"""vidcap sync: the real rsync over the real sshd (both transport backends), the real crontab.

The "cluster" is a directory on this machine reached through the test sshd; every path a shell, ssh,
rsync or cron sees has a space, quotes, ``$(x)`` and ``%`` in it.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import require_integration
from sshd import SSHServer, write_profile

from vidcap import config, sync
from vidcap.config import SSHConfig
from vidcap.errors import HostKeyError, TransportError
from vidcap.transport import connect

VIDCAP = str(Path(sys.executable).parent / "vidcap")
HOSTILE = "x 'q' $(x) %d ü"


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("rsync", "crontab"):
        if shutil.which(tool) is None:
            require_integration(f"{tool} (apt-get install rsync cron)")


# ---- a laptop and a cluster --------------------------------------------------------------------------


@dataclass
class Site:
    work: Path  # the laptop's current directory
    config: Path
    cluster: Path  # paths.captions_dir, reached through sshd
    local: Path  # --to
    sshd: SSHServer

    def argv(self, *args: str) -> list[str]:
        return [VIDCAP, "sync", "--to", str(self.local), "--config", str(self.config), *args]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), cwd=self.work, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args), cwd=self.work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def write_config(self, ssh: SSHConfig | dict[str, Any], captions_dir: str | None = None) -> None:
        write_profile(self.config, ssh, captions_dir=captions_dir or str(self.cluster))


def make_site(tmp_path: Path, sshd: SSHServer, backend: str = "sshtunnel", **ssh: Any) -> Site:
    work = tmp_path / f"work {HOSTILE}"
    work.mkdir()
    site = Site(
        work, work / "vidcap.toml", tmp_path / f"cluster {HOSTILE}" / "captions", work / "captions", sshd
    )
    site.cluster.mkdir(parents=True)
    site.write_config(sshd.ssh_config(backend, **ssh))
    return site


@pytest.fixture(params=["sshtunnel", "openssh"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def site(tmp_path: Path, sshd_server: SSHServer, backend: str) -> Site:
    return make_site(tmp_path, sshd_server, backend)


def put(root: Path, rel: str, data: bytes, mtime: float | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


RECORDS = {
    f"qwen3-omni/a video {HOSTILE}.mp4.json": b'{"caption": "one"}\n',
    f"qwen3-omni/sub {HOSTILE}/b.mkv.json": b'{"caption": "two"}\n' * 50,
    "qwen3-omni/_vidcap/runs/20250101T000000.json": b'{"run": 1}\n',
    "other-model/c.mp4.json": b"{}\n",
}
NOT_SYNCED = {
    "qwen3-omni/_vidcap/lock": b"123",  # the cluster run's output lock
    "qwen3-omni/.d.mp4.json.vidcap-tmp": b'{"half',  # a record being written there
}


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (rel path -> bytes), leaving out rsync's partial dirs."""
    found = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and sync.PARTIAL_DIR not in rel.parts:
            found[str(rel)] = path.read_bytes()
    return found


def accepted(sshd: SSHServer) -> int:
    return sshd.log_path.read_text(errors="replace").count("Accepted publickey")


# ---- syncing -----------------------------------------------------------------------------------------


def test_sync_brings_records_home_then_has_nothing_to_do(site: Site) -> None:
    for rel, data in {**RECORDS, **NOT_SYNCED}.items():
        put(site.cluster, rel, data, mtime=1_700_000_000)
    put(site.local, "mine.json", b"a local file the cluster does not have")
    newer = put(site.local, "other-model/c.mp4.json", b"edited here, newer", mtime=1_800_000_000)

    res = site.cli("--json")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # quiet when not on a terminal
    summary = json.loads(res.stdout)
    shipped = {k: v for k, v in RECORDS.items() if k != "other-model/c.mp4.json"}
    assert summary["status"] == "ok" and summary["files"] == len(shipped)
    assert summary["bytes"] == sum(len(v) for v in shipped.values())
    assert summary["dest"] == str(site.local)
    got = tree(site.local)
    assert {k: got[k] for k in shipped} == shipped  # byte-identical
    assert got["mine.json"] == b"a local file the cluster does not have"  # never deleted
    assert newer.read_bytes() == b"edited here, newer"  # a newer local file is kept
    assert not set(NOT_SYNCED) & set(got)
    assert (site.local / next(iter(shipped))).stat().st_mtime == 1_700_000_000

    res = site.cli("--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["files"] == 0
    # a record rewritten on the cluster comes again
    put(site.cluster, f"qwen3-omni/a video {HOSTILE}.mp4.json", b'{"caption": "redone"}\n')
    again = json.loads(site.cli("--json").stdout)
    assert again["files"] == 1
    assert tree(site.local)[f"qwen3-omni/a video {HOSTILE}.mp4.json"] == b'{"caption": "redone"}\n'
    # without --json and without a terminal: nothing at all on success
    res = site.cli()
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")


def test_dry_run_lists_and_changes_nothing(tmp_path: Path, sshd_server: SSHServer) -> None:
    site = make_site(tmp_path, sshd_server)
    for rel, data in RECORDS.items():
        put(site.cluster, rel, data)
    # a captions_dir relative to the login directory (written with ~/, as users do)
    home = pwd.getpwnam(sshd_server.user).pw_dir
    site.write_config(sshd_server.ssh_config(), captions_dir="~/" + os.path.relpath(site.cluster, home))
    res = site.cli("--dry-run")
    assert res.returncode == 0, res.stderr
    assert set(res.stdout.splitlines()) == set(RECORDS)
    assert f"would transfer {len(RECORDS)} files" in res.stderr
    assert not site.local.exists()


def test_openssh_backend_uses_its_control_master(tmp_path: Path, sshd_server: SSHServer) -> None:
    site = make_site(tmp_path, sshd_server, "openssh")
    put(site.cluster, "a.json", b"1")
    profile_ssh = config.load(site.config)[0].profile("cluster").ssh  # the same settings, the same socket
    with connect(profile_ssh):  # the master that `vidcap tunnel up` would hold
        before = accepted(sshd_server)
        assert site.cli().returncode == 0
        assert accepted(sshd_server) == before  # no new login: rsync went through the master
    put(site.cluster, "b.json", b"2")
    res = site.cli("--json")  # no master now: ssh logs in by itself
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["files"] == 1
    assert accepted(sshd_server) == before + 1
    assert tree(site.local) == {"a.json": b"1", "b.json": b"2"}


def test_through_a_jump_host(tmp_path: Path, sshd_server: SSHServer, backend: str) -> None:
    site = make_site(tmp_path, sshd_server, backend, jump=f"{sshd_server.user}@127.0.0.1:{sshd_server.port}")
    put(site.cluster, "a.json", b"via the jump host")
    before = accepted(sshd_server)
    res = site.cli("--json")
    assert res.returncode == 0, res.stderr
    assert tree(site.local) == {"a.json": b"via the jump host"}
    assert accepted(sshd_server) == before + 2  # the jump host, then the login node through it


def test_host_keys_are_checked(tmp_path: Path, sshd_server: SSHServer) -> None:
    site = make_site(tmp_path, sshd_server)
    put(site.cluster, "a.json", b"1")
    sshd_server.known_hosts.write_text("")
    res = site.cli()
    assert res.returncode == 3
    assert "HostKeyError" in res.stderr and "is not in" in res.stderr and not site.local.exists()
    site.write_config(sshd_server.ssh_config(accept_new_host_key=True))
    res = site.cli()
    assert res.returncode == 0, res.stderr
    assert "Permanently added" in res.stderr  # said once, and the key is now in the profile's file
    assert sshd_server.known_hosts.read_text().count("ssh-ed25519") == 1
    assert tree(site.local) == {"a.json": b"1"}


def test_errors_map_to_exit_codes(tmp_path: Path, sshd_server: SSHServer) -> None:
    site = make_site(tmp_path, sshd_server)
    site.write_config(sshd_server.ssh_config(), captions_dir=str(site.cluster / "missing"))
    res = site.cli()
    assert res.returncode == 2 and "does not exist on" in res.stderr and "missing" in res.stderr
    site.write_config(sshd_server.ssh_config(port=_closed_port()))
    res = site.cli()
    assert res.returncode == 3 and "TransportError: cannot sync from" in res.stderr
    site.config.write_text("[profiles.local.ssh]\nport = 22\n")
    res = subprocess.run(
        [VIDCAP, "sync", "--config", str(site.config)], capture_output=True, text=True, cwd=site.work
    )
    assert res.returncode == 2 and "no ssh.host" in res.stderr


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_syncs_at_once_one_runs_one_steps_aside(tmp_path: Path, sshd_server: SSHServer) -> None:
    site = make_site(tmp_path, sshd_server)
    big = put(site.cluster, "big.bin", os.urandom(4 << 20))
    procs = [site.popen("--json", "--bwlimit", "1500") for _ in range(2)]  # ~3 s: they overlap
    results = [(p.wait(60), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0], results
    by_status = {json.loads(out)["status"]: (out, err) for _, out, err in results}
    assert set(by_status) == {"ok", "locked"}, results
    note = by_status["locked"][1]
    assert note.count("\n") == 1 and note.startswith(
        "another vidcap sync for profile cluster is running (pid "
    )
    assert note.rstrip().endswith("nothing to do")
    assert (site.local / "big.bin").read_bytes() == big.read_bytes()


def _rsync_running(dest: Path) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"rsync" in cmdline and str(dest).encode() in cmdline:
                return True
    return False


def test_interrupted_sync_keeps_the_part_aside_and_resumes(tmp_path: Path, sshd_server: SSHServer) -> None:
    site = make_site(tmp_path, sshd_server)
    size = 8 << 20
    big = put(site.cluster, "big.bin", os.urandom(size))
    proc = site.popen("--bwlimit", "2048")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        temps = list(site.local.glob(".big.bin.*")) if site.local.is_dir() else []
        if temps and temps[0].stat().st_size >= 1 << 20:
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail(f"the transfer did not start: {proc.communicate()}")
    proc.send_signal(signal.SIGTERM)  # as `kill` or a cron timeout would
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not (site.local / "big.bin").exists()  # never half a file under its real name
    part = site.local / sync.PARTIAL_DIR / "big.bin"
    kept = part.stat().st_size
    assert 0 < kept < size
    assert not _rsync_running(site.local)

    res = site.cli("--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["files"] == 1 and summary["bytes"] == size
    assert summary["bytes_received"] < size - kept // 2  # resumed, not started over
    assert (site.local / "big.bin").read_bytes() == big.read_bytes()
    assert not (site.local / sync.PARTIAL_DIR).exists()


# ---- cron --------------------------------------------------------------------------------------------


@pytest.fixture
def crontab() -> Iterator[None]:
    """This user's crontab as it was before the test, put back after it."""
    saved = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    try:
        yield
    finally:
        if saved.returncode == 0:
            subprocess.run(["crontab", "-"], input=saved.stdout, text=True, check=True)
        else:
            subprocess.run(["crontab", "-r"], capture_output=True)


def crontab_lines() -> list[str]:
    res = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    return res.stdout.splitlines() if res.returncode == 0 else []


def cron_command(line: str) -> str:
    """What cron hands to ``sh -c`` for a crontab line: the part after the five time fields, with
    ``\\%`` turned into ``%`` (an unescaped ``%`` would end the command)."""
    command = line.split(None, 5)[5]
    assert "%" not in command.replace("\\%", "")
    return command.replace("\\%", "%")


def test_install_cron_once_run_it_as_cron_would_and_remove_it(
    tmp_path: Path, sshd_server: SSHServer, crontab: None
) -> None:
    site = make_site(tmp_path, sshd_server)
    for rel, data in RECORDS.items():
        put(site.cluster, rel, data)
    subprocess.run(["crontab", "-"], input="# theirs\n0 3 * * * true # other job\n", text=True, check=True)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        # relative --to and --config: the line must carry them as absolute paths
        argv = [VIDCAP, "sync", "--to", "captions", "--config", "vidcap.toml", *args]
        return subprocess.run(argv, cwd=site.work, capture_output=True, text=True, timeout=60)

    assert cli("--install-cron", "*/15 * * *").returncode == 2  # four fields
    for _ in range(2):
        res = cli("--install-cron", "*/15 * * * *")
        assert res.returncode == 0, res.stderr
    lines = crontab_lines()
    ours = [ln for ln in lines if ln.endswith("# vidcap-sync:cluster")]
    assert len(ours) == 1 and lines[:2] == ["# theirs", "0 3 * * * true # other job"]
    line = ours[0]
    assert line.startswith("*/15 * * * * ")
    for word in (str(site.work / "captions"), str(site.config), str(sync.log_path("cluster"))):
        assert shlex.quote(word).replace("%", "\\%") in line  # absolute, quoted, % escaped for cron
    assert f"VIDCAP_HOME={shlex.quote(os.environ['VIDCAP_HOME'])}" in line
    assert "already had the" in res.stderr and res.stdout.strip() == line

    home = pwd.getpwuid(os.getuid()).pw_dir
    env = ["env", "-i", f"HOME={home}", f"LOGNAME={pwd.getpwuid(os.getuid()).pw_name}", "PATH=/usr/bin:/bin",
           "SHELL=/bin/sh"]  # fmt: skip
    res = subprocess.run([*env, "sh", "-c", cron_command(line)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, (res.stdout, res.stderr, sync.log_path("cluster").read_text())
    assert tree(site.local) == RECORDS
    assert sync.log_path("cluster").read_text() == ""  # quiet: nothing to log when all went well

    res = cli("--remove-cron")
    assert res.returncode == 0 and "removed" in res.stderr
    assert crontab_lines() == ["# theirs", "0 3 * * * true # other job"]
    assert "no crontab line" in cli("--remove-cron").stderr


# ---- the pure parts ----------------------------------------------------------------------------------


def test_remote_source() -> None:
    assert sync.remote_source("vidcap/captions") == "vidcap/captions/"
    assert sync.remote_source("~/vidcap/captions/") == "vidcap/captions/"
    assert sync.remote_source("/scratch/me/captions") == "/scratch/me/captions/"
    assert sync.remote_source("~") == "./"


def test_rsync_version() -> None:
    assert sync.parse_rsync_version("rsync  version 3.2.7  protocol version 31\n") == (3, 2, 7)
    assert sync.parse_rsync_version("rsync  version v3.4.1  protocol version 32") == (3, 4, 1)
    assert sync.parse_rsync_version("rsync  version 2.6.9  protocol version 29") == (2, 6, 9)
    assert sync.parse_rsync_version("openrsync: protocol version 29\nrsync version 2.6.9 compatible") is None


def test_output_lines_are_counted() -> None:
    counts = sync._Counts()
    assert sync.parse_line("vidcap> >f+++++++++ 12 a b.json", counts) == ("a b.json", 12)
    assert sync.parse_line("vidcap> >f.st...... 5 \\#303\\#274.json", counts) == ("ü.json", 5)
    assert sync.parse_line("vidcap> cd+++++++++ 4096 sub/", counts) is None
    assert sync.parse_line("Total bytes received: 1234", counts) is None
    assert (counts.files, counts.bytes, counts.stats["Total bytes received"]) == (2, 17, 1234)


def test_exit_codes() -> None:
    ssh = SSHConfig(host="login", user="me", known_hosts="/k")
    assert sync.classify(0, "", ssh, "c") is None
    assert sync.classify(24, "file has vanished", ssh, "c") is None  # partial: a result, exit 1
    gone = 'rsync: [sender] change_dir "/home/me/c" failed: No such file or directory (2)'
    missing = sync.classify(23, gone, ssh, "c")
    assert isinstance(missing, sync.SyncError) and missing.exit_code == 2
    vanished = 'rsync: [sender] change_dir "/home/me/c/sub" failed: No such file or directory (2)'
    assert sync.classify(23, vanished, ssh, "c") is None  # a subdirectory that went away: partial
    escaped = 'rsync: change_dir "/s/\\#303\\#274 c" failed: No such file or directory (2)'
    assert sync.classify(23, escaped, ssh, "/s/ü c") is not None
    unknown = sync.classify(255, "Host key verification failed.", ssh, "c")
    assert isinstance(unknown, HostKeyError) and unknown.reason == "unknown"
    refused = sync.classify(255, "ssh: connect to host login port 22: Connection refused", ssh, "c")
    assert isinstance(refused, TransportError) and refused.exit_code == 3
    for rc in (10, 12, 30, 35):
        assert sync.classify(rc, "", ssh, "c").exit_code == 3  # type: ignore[union-attr]
    assert sync.classify(12, "bash: line 1: rsync: command not found", ssh, "c").exit_code == 3  # type: ignore[union-attr]
    assert sync.classify(20, "", ssh, "c").exit_code == 130  # type: ignore[union-attr]
    assert sync.classify(11, "No space left on device", ssh, "c").exit_code == 1  # type: ignore[union-attr]


def test_schedules() -> None:
    assert sync.check_schedule(" */15  * * * * ") == "*/15 * * * *"
    assert sync.check_schedule("@hourly") == "@hourly"
    for bad in ("* * * *", "@sometimes", "* * * * * *", "*/15 * * * ; rm", "5 % * * *"):
        with pytest.raises(sync.UsageError):
            sync.check_schedule(bad)


def test_cron_line_quotes_for_sh_and_escapes_percent() -> None:
    line = sync.cron_line(
        "@daily", "p", ["/v env/bin/vidcap", "sync", "--to", "/a 'b' $(x) 100%"],
        cwd=Path("/w"), env={"VIDCAP_HOME": "/h%"}, log=Path("/s/p.log"),
    )  # fmt: skip
    assert line == (
        "@daily cd /w && VIDCAP_HOME=/h\\% '/v env/bin/vidcap' sync --to '/a '\"'\"'b'\"'\"' $(x) 100\\%' "
        ">> /s/p.log 2>&1 # vidcap-sync:p"
    )
    with pytest.raises(sync.UsageError):
        sync.cron_line("@daily", "p", ["/a\\b"], cwd=Path("/w"), env={}, log=Path("/l"))
    with pytest.raises(sync.UsageError):
        sync.cron_line("@daily", "a profile", ["/x"], cwd=Path("/w"), env={}, log=Path("/l"))


def test_edit_crontab_keeps_other_lines() -> None:
    text = "MAILTO=me\n0 1 * * * backup\n*/5 * * * * old # vidcap-sync:p\n0 2 * * * x # vidcap-sync:q\n"
    once = sync.edit_crontab(text, "p", "@hourly new # vidcap-sync:p")
    assert once == "MAILTO=me\n0 1 * * * backup\n0 2 * * * x # vidcap-sync:q\n@hourly new # vidcap-sync:p\n"
    assert sync.edit_crontab(once, "p", "@hourly new # vidcap-sync:p") == once
    assert sync.edit_crontab(once, "p", None) == "MAILTO=me\n0 1 * * * backup\n0 2 * * * x # vidcap-sync:q\n"
    assert sync.edit_crontab("@hourly new # vidcap-sync:p\n", "p", None) == ""
