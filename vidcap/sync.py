"""`vidcap sync`: pull the cluster's captions home with rsync over the profile's SSH settings; cron it.

What a sync does: ``rsync -rlt --update`` from ``<login node>:<paths.captions_dir>/`` (relative to the
cluster home unless absolute) into a local directory (``vidcap sync --to``, default ``./captions``, so
``captions_dir/<model tag>/...`` lands where ``vidcap caption`` writes by default). rsync runs the system
ssh with the options the "openssh" backend uses, built by ``transport_openssh.ssh_command``: known_hosts
and the host key policy of the profile (the jump hosts' keys checked against the same file), identity,
port, user, ProxyJump as a ProxyCommand, keepalive, BatchMode when stdin is not a terminal, and for
backend "openssh" its ControlMaster socket when one is up.

Nothing local is lost: no ``--delete``; ``--update`` keeps a local file that is newer than the cluster's;
every file is written to a temp name and renamed (rsync's default), and an interrupted transfer leaves
its part in ``.vidcap-partial/`` beside the file (never under the real name), from where the next sync
resumes it. The cluster's in-progress temp files (``*.vidcap-tmp``) and output-dir locks
(``_vidcap/lock``) are not copied.

One sync per profile at a time: a flock on ``<state dir>/sync/<profile>.lock``; a second run finds it
held and returns at once (status "locked"), which is what overlapping cron runs need.

Exit codes (``SyncResult.exit_code`` / ``SyncError.exit_code``; rsync's own code is in the message):

    0    synced (or nothing to do, or another sync of the profile is running)
    1    partial: some files were not transferred (rsync 23/24) or rsync failed locally (disk, ...)
    2    usage or config: no ssh.host, captions_dir missing on the cluster, rsync missing or too old
    3    cannot reach the cluster: ssh failed, host key refused, connection lost or timed out
         (rsync 255/5/10/12/30/35), rsync missing on the cluster
    130  interrupted (SIGINT/SIGTERM/SIGHUP are passed to rsync, which keeps the partial file)

Cron: ``install_cron`` adds one line ending in ``# vidcap-sync:<profile>`` to the user's crontab (and
replaces an older one), ``remove_cron`` removes it; the line runs with absolute paths only and appends
its output to ``<state dir>/sync/<profile>.log``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vidcap import config
from vidcap.config import SSHConfig
from vidcap.errors import ConfigError, HostKeyError, SyncError, TransportError, UsageError, VidcapError
from vidcap.store import TMP_SUFFIX
from vidcap.transport import bracket, expand, stderr_tail

PARTIAL_DIR = ".vidcap-partial"
MARKER = "# vidcap-sync:"
IO_TIMEOUT = 600  # rsync --timeout: a hung transfer ends (exit 3) instead of holding the lock forever
MIN_RSYNC = (3, 1)  # --info, --no-h, --out-format with %i; -s (protect args) is 3.0
_ITEM = "vidcap> "  # prefix of our --out-format lines, so they never mix with --stats lines
_PROFILE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_SCHEDULE_FIELD = re.compile(r"[0-9A-Za-z*/,-]+")
_SCHEDULE_NICKNAMES = (
    "@reboot",
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
)
_UNREACHABLE = {
    255: "ssh failed",
    5: "could not start rsync on the cluster",
    10: "socket I/O error",
    12: "the connection broke (rsync protocol stream)",
    30: "timed out",
    35: "timed out",
}


@dataclass
class SyncResult:
    """What one sync did; ``to_dict`` is the ``--json`` summary."""

    profile: str
    source: str
    dest: str
    status: str  # "ok" | "partial" | "locked"
    dry_run: bool = False
    files: int = 0  # regular files transferred (or that would be, with dry_run)
    bytes: int = 0  # their total size
    bytes_received: int = 0  # what crossed the wire (less than bytes when a partial file was resumed)
    seconds: float = 0.0
    exit_code: int = 0
    rsync_exit: int | None = None
    message: str = ""  # the lock note, or rsync's complaint for a partial sync
    notes: list[str] = field(default_factory=list)  # e.g. a host key that was accepted (accept-new)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# ---- paths -----------------------------------------------------------------------------------------


def sync_dir() -> Path:
    return config.state_dir() / "sync"


def _file_stem(profile: str) -> str:
    return profile if _PROFILE_NAME.fullmatch(profile) else "p-" + profile.encode().hex()[:40]


def lock_path(profile: str) -> Path:
    return sync_dir() / f"{_file_stem(profile)}.lock"


def log_path(profile: str) -> Path:
    """Where the cron line appends its output."""
    return sync_dir() / f"{_file_stem(profile)}.log"


def remote_source(captions_dir: str) -> str:
    """The rsync source path for a captions_dir: its contents (trailing slash); relative = under home."""
    path = captions_dir.strip()
    if path in ("", "~", "~/"):
        return "./"
    path = path.removeprefix("~/")
    if path.startswith("~"):
        raise ConfigError(
            f"paths.captions_dir {captions_dir!r}: ~user paths are not supported; use a full path"
        )
    return path.rstrip("/") + "/"


# ---- rsync -----------------------------------------------------------------------------------------


def find_rsync() -> str:
    """The local rsync, checked to be >= 3.1 (macOS ships 2.6.9 or openrsync)."""
    found = shutil.which("rsync")
    if found is None:
        raise SyncError(
            "rsync is not installed here; install it (apt-get install rsync, brew install rsync)", 2
        )
    try:
        text = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SyncError(f"cannot run {found} --version: {exc}", 2) from exc
    version = parse_rsync_version(text)
    if version is None or version < MIN_RSYNC:
        shown = ".".join(map(str, version)) if version else "unknown"
        raise SyncError(
            f"{found} is rsync {shown}; vidcap sync needs rsync >= {'.'.join(map(str, MIN_RSYNC))} "
            f"(on macOS: brew install rsync, then make sure it comes first on PATH)",
            2,
        )
    return found


def parse_rsync_version(text: str) -> tuple[int, ...] | None:
    if "openrsync" in text:
        return None
    found = re.search(r"rsync\s+version\s+v?(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in found.groups() if g is not None) if found else None


def rsync_argv(
    rsync: str,
    ssh_argv: Sequence[str],
    host: str,
    source: str,
    dest: Path,
    *,
    dry_run: bool = False,
    bwlimit: int | None = None,
) -> list[str]:
    """The rsync command line. ``-e`` is one string that rsync splits itself (on spaces, honouring single
    and double quotes, no backslashes): shlex.join's quoting is read back by it word for word."""
    argv = [
        rsync, "-rlt", "--update", "-s",
        f"--partial-dir={PARTIAL_DIR}", f"--exclude={PARTIAL_DIR}/",
        f"--exclude=*{TMP_SUFFIX}", "--exclude=_vidcap/lock*",
        f"--timeout={IO_TIMEOUT}", "--no-h", "--stats", f"--out-format={_ITEM}%i %l %n",
        "-e", shlex.join(ssh_argv),
    ]  # fmt: skip
    if dry_run:
        argv.append("--dry-run")
    if bwlimit:
        argv.append(f"--bwlimit={bwlimit}")
    return [*argv, "--", f"{bracket(host)}:{source}", str(dest) + "/"]


@dataclass
class _Counts:
    files: int = 0
    bytes: int = 0
    stats: dict[str, int] = field(default_factory=dict)


def parse_line(line: str, counts: _Counts) -> tuple[str, int] | None:
    """One line of rsync's stdout: an item (``vidcap> %i %l %n``) or a --stats line. Returns (path,
    size) for a regular file being received."""
    if line.startswith(_ITEM):
        item, _, rest = line[len(_ITEM) :].partition(" ")
        size, _, name = rest.partition(" ")
        if item.startswith(">f") and size.isdigit():
            counts.files += 1
            counts.bytes += int(size)
            return unescape(name), int(size)
        return None
    key, sep, value = line.partition(": ")
    number = re.match(r"\d+", value.strip())
    if sep and number:
        counts.stats[key.strip()] = int(number[0])
    return None


def unescape(name: str) -> str:
    """rsync prints unprintable bytes of a name as ``\\#ooo``."""
    if "\\#" not in name:
        return name
    raw = re.sub(rb"\\#([0-7]{3})", lambda m: bytes([int(m[1], 8)]), name.encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "replace")


def classify(rc: int, stderr: str, ssh: SSHConfig, source: str) -> VidcapError | None:
    """rsync's exit code and stderr -> the error to raise, or None for 0 and a partial sync (23/24)."""
    missing = _source_missing(stderr, remote_source(source)) if rc == 23 else None
    if rc in (0, 23, 24) and not missing:
        return None
    said = stderr_tail(_plain(stderr)) or stderr_tail(stderr) or f"rsync exit {rc}"
    where = f"{ssh.user}@{ssh.host}" if ssh.user else str(ssh.host)
    known_hosts = expand(ssh.known_hosts)
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr or "Host key verification failed" in stderr:
        changed = "HAS CHANGED" in stderr
        return HostKeyError(
            (
                f"the host key of {where} has CHANGED (possible attack or a reinstalled server): confirm the "
                f"new fingerprint with the cluster admins, then remove the old line from {known_hosts}"
                if changed
                else f"{where} (or a jump host) is not in {known_hosts}: verify its fingerprint and add it, "
                f"e.g. by logging in once with ssh, or set accept_new_host_key = true"
            )
            + f"; ssh said: {said}",
            "changed" if changed else "unknown",
        )
    if missing:
        return SyncError(
            f"{source!r} does not exist on {where} (paths.captions_dir): nothing to sync yet, or the path "
            f"is wrong; rsync said: {missing}",
            2,
        )
    if "command not found" in stderr or "rsync: not found" in stderr:
        return TransportError(f"rsync is not installed on {where} (or not on its PATH); ssh said: {said}")
    if rc in _UNREACHABLE:
        return TransportError(
            f"cannot sync from {where}: {_UNREACHABLE[rc]} (rsync exit {rc}); {said}"
            + (
                "; check ssh.user and ssh.identity_file (a key with a passphrase, or MFA, needs a terminal "
                "or a running ssh-agent; cron has neither)"
                if "Permission denied (" in stderr
                else ""
            )
        )
    if rc == 20:
        return SyncError(f"interrupted; the next sync resumes from {PARTIAL_DIR}/", 130)
    if rc in (1, 2, 4):
        return SyncError(f"rsync refused the transfer (exit {rc}): {said}", 2)
    return SyncError(f"rsync failed (exit {rc}): {said}", 1)


def _plain(stderr: str) -> str:
    """stderr without rsync's generic epilogue ("connection unexpectedly closed", "rsync error: ... at
    io.c(...)") and ssh's notes, so the tail shows what went wrong."""
    noise = re.compile(
        r"rsync error: .*\(code \d+\) at |rsync: connection unexpectedly closed|Permanently added"
    )
    return "\n".join(line for line in stderr.splitlines() if not noise.search(line))


def _source_missing(stderr: str, source: str) -> str | None:
    """rsync's line saying that the source directory itself does not exist, if it said so."""
    tail = source.rstrip("/").removeprefix("./")
    for found in re.finditer(
        r'^.*(?:change_dir|link_stat) "(.*)".* failed: No such file or directory.*$', stderr, re.M
    ):
        if unescape(found[1]).rstrip("/").endswith(tail):
            return found[0].strip()
    return None


# ---- the lock --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(profile: str) -> Iterator[int | None]:
    """Hold the profile's sync lock; yields None when held by us, or the holder's pid (0 if unknown)
    when another process has it (nothing is done then)."""
    path = lock_path(profile)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            yield int(holder) if holder.isdigit() else 0
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield None
    finally:
        os.close(fd)  # releases the flock; the file stays (removing it would race the next run)


# ---- a sync ----------------------------------------------------------------------------------------


def run(
    cfg: config.Config,
    profile: str,
    dest: Path,
    *,
    dry_run: bool = False,
    bwlimit: int | None = None,
    on_file: Callable[[str, int], None] | None = None,
    control_dir: Path | None = None,
) -> SyncResult:
    """Pull the profile's captions_dir into ``dest``. Returns the result for ok/partial/locked; raises
    SyncError, TransportError (exit 3) or ConfigError otherwise. ``on_file(path, size)`` is called as
    each file starts to arrive (with dry_run: for each file that would)."""
    from vidcap.transport_openssh import ssh_command

    prof = cfg.profile(profile)
    ssh = prof.ssh
    if not ssh.host:
        raise ConfigError(
            f"profile {profile!r} has no ssh.host: vidcap sync pulls paths.captions_dir from a cluster"
        )
    source = remote_source(prof.paths.captions_dir)
    shown_source = f"{ssh.user + '@' if ssh.user else ''}{bracket(ssh.host)}:{source}"
    rsync = find_rsync()
    ssh_argv = ssh_command(ssh, batch=not sys.stdin.isatty(), control_dir=control_dir)
    dest = Path(os.path.abspath(dest.expanduser()))
    lock = contextlib.nullcontext(None) if dry_run else _locked(profile)
    with lock as holder:
        if holder is not None:
            return SyncResult(
                profile, shown_source, str(dest), "locked", dry_run,
                message=f"another vidcap sync for profile {profile} is running (pid {holder or '?'}); "
                "nothing to do",
            )  # fmt: skip
        if dest.exists() and not dest.is_dir():
            raise UsageError(f"{dest} is not a directory")
        if not dry_run:  # rsync makes dest itself once connected: nothing is created when it cannot
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot create {dest.parent}: {exc.strerror}") from exc
        argv = rsync_argv(rsync, ssh_argv, ssh.host, source, dest, dry_run=dry_run, bwlimit=bwlimit)
        started = time.monotonic()
        rc, counts, stderr, interrupted = _run(argv, on_file)
        seconds = round(time.monotonic() - started, 3)
    notes = [
        line.strip().removeprefix("Warning: ") + f" ({expand(ssh.known_hosts)})"
        for line in stderr.splitlines()
        if "Permanently added" in line
    ]
    if interrupted and rc != 0:
        raise SyncError(f"interrupted; the next sync resumes the unfinished file from {PARTIAL_DIR}/", 130)
    error = classify(rc, stderr, ssh, prof.paths.captions_dir)
    if error is not None:
        raise error
    result = SyncResult(
        profile,
        shown_source,
        str(dest),
        "ok" if rc == 0 else "partial",
        dry_run,
        files=counts.stats.get("Number of regular files transferred", counts.files),
        bytes=counts.stats.get("Total transferred file size", counts.bytes),
        bytes_received=counts.stats.get("Total bytes received", 0),
        seconds=seconds,
        exit_code=0 if rc == 0 else 1,
        rsync_exit=rc,
        notes=notes,
    )
    if rc != 0:
        result.message = (
            f"some files were not transferred (rsync exit {rc}); the next sync tries them again: "
            f"{stderr_tail(_plain(stderr)) or stderr_tail(stderr)}"
        )
    return result


_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _run(argv: list[str], on_file: Callable[[str, int], None] | None) -> tuple[int, _Counts, str, bool]:
    """Run rsync, reading its item lines as they come. SIGINT/SIGTERM/SIGHUP are passed on to rsync
    (which then keeps the partial file) and we wait for it to finish; a terminal's Ctrl-C reaching rsync
    twice is harmless (its handler blocks the signal while it cleans up)."""
    counts = _Counts()
    interrupted = threading.Event()
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        except OSError as exc:
            raise SyncError(f"cannot run rsync: {exc}", 2) from exc

        def forward(signum: int, frame: object) -> None:
            interrupted.set()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

        previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in _FORWARDED:
                previous[signum] = signal.signal(signum, forward)
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                found = parse_line(raw.decode("utf-8", "replace").rstrip("\n"), counts)
                if found is not None and on_file is not None:
                    on_file(*found)
            rc = proc.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if proc.poll() is None:  # an exception in on_file: do not leave rsync running
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    return rc, counts, stderr, interrupted.is_set()


# ---- cron ------------------------------------------------------------------------------------------


def check_schedule(schedule: str) -> str:
    """Five cron fields or an @nickname; returns it normalised (single spaces)."""
    fields = schedule.split()
    if len(fields) == 1 and fields[0] in _SCHEDULE_NICKNAMES:
        return fields[0]
    if len(fields) != 5 or not all(_SCHEDULE_FIELD.fullmatch(f) for f in fields):
        raise UsageError(
            f"cron schedule {schedule!r}: expected five fields (minute hour day month weekday), "
            f'e.g. "*/15 * * * *", or one of {", ".join(_SCHEDULE_NICKNAMES)}'
        )
    return " ".join(fields)


def _cron_word(word: str) -> str:
    if "\n" in word or "\\" in word:
        raise UsageError(f"{word!r}: a cron line cannot carry a path with a newline or backslash; rename it")
    # cron turns an unescaped % into a newline (the rest becomes stdin); \% is a literal %.
    return shlex.quote(word).replace("%", "\\%")


def cron_line(
    schedule: str,
    profile: str,
    command: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log: Path,
) -> str:
    """The crontab line: ``SCHEDULE cd CWD && ENV... COMMAND >> LOG 2>&1 # vidcap-sync:PROFILE``.

    Everything is quoted for sh, and ``%`` escaped for cron; ``command`` must use absolute paths (cron's
    PATH is /usr/bin:/bin)."""
    if not _PROFILE_NAME.fullmatch(profile):
        raise UsageError(f"profile {profile!r}: a cron line needs a profile name of letters, digits, _ . -")
    assignments = [f"{name}={_cron_word(value)}" for name, value in env.items()]
    words = [_cron_word(w) for w in command]
    return (
        f"{check_schedule(schedule)} cd {_cron_word(str(cwd))} && {' '.join([*assignments, *words])} "
        f">> {_cron_word(str(log))} 2>&1 {MARKER}{profile}"
    )


def edit_crontab(text: str, profile: str, line: str | None) -> str:
    """The crontab with this profile's marked line(s) removed and, unless ``line`` is None, ``line``
    added once at the end. Every other line is kept as it was."""
    mark = f"{MARKER}{profile}"
    kept = [ln for ln in text.splitlines() if not ln.rstrip().endswith(mark)]
    if line is not None:
        kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join(kept) + "\n" if kept else ""


def _crontab_bin() -> str:
    found = shutil.which("crontab")
    if found is None:
        raise UsageError("the crontab command is missing; install cron (apt-get install cron)")
    return found


def read_crontab() -> str:
    proc = subprocess.run([_crontab_bin(), "-l"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode == 0:
        return proc.stdout
    if "no crontab" in proc.stderr.lower():
        return ""
    raise SyncError(f"crontab -l failed: {stderr_tail(proc.stderr) or f'exit {proc.returncode}'}", 1)


def write_crontab(text: str) -> None:
    argv = [_crontab_bin(), "-"] if text else [_crontab_bin(), "-r"]
    proc = subprocess.run(argv, input=text, capture_output=True, text=True)
    if proc.returncode != 0 and not (not text and "no crontab" in proc.stderr.lower()):
        raise SyncError(
            f"{shlex.join(argv)} failed: {stderr_tail(proc.stderr) or f'exit {proc.returncode}'}", 1
        )


def marked_lines(text: str, profile: str) -> list[str]:
    mark = f"{MARKER}{profile}"
    return [ln for ln in text.splitlines() if ln.rstrip().endswith(mark)]


def vidcap_command() -> list[str]:
    """This vidcap by absolute path: the console script beside this Python, else ``python -m``."""
    script = Path(sys.executable).parent / "vidcap"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "vidcap.cli"]


def cron_entry(
    schedule: str, profile: str, dest: Path, config_file: Path | None, cwd: Path | None = None
) -> str:
    """The line ``install_cron`` writes for this profile: absolute vidcap, --to and --config; PATH with
    the directories of this rsync and ssh; VIDCAP_HOME when set."""
    cwd = Path(os.path.abspath(cwd or Path.cwd()))
    command = [*vidcap_command(), "sync", "-p", profile, "--to", os.path.abspath(cwd / dest.expanduser())]
    if config_file is not None:
        command += ["--config", os.path.abspath(cwd / config_file.expanduser())]
    dirs = [str(Path(p).parent) for p in (shutil.which("rsync"), shutil.which("ssh")) if p]
    env = {"PATH": ":".join(dict.fromkeys([*dirs, "/usr/bin", "/bin"]))}
    home = config.home_dir()
    if home is not None:
        env["VIDCAP_HOME"] = str(home.absolute())
    return cron_line(schedule, profile, command, cwd=cwd, env=env, log=log_path(profile))


def install_cron(line: str, profile: str) -> str:
    """Put ``line`` in the crontab as the one line for this profile: "added", "replaced" or "unchanged"."""
    current = read_crontab()
    marked = marked_lines(current, profile)
    if marked == [line]:
        return "unchanged"
    sync_dir().mkdir(parents=True, exist_ok=True, mode=0o700)  # the log's directory
    write_crontab(edit_crontab(current, profile, line))
    return "replaced" if marked else "added"


def remove_cron(profile: str) -> int:
    """Remove this profile's line(s); returns how many there were."""
    current = read_crontab()
    marked = marked_lines(current, profile)
    if marked:
        write_crontab(edit_crontab(current, profile, None))
    return len(marked)
