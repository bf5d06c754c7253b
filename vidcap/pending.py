"""What is still pending on the cluster (`vidcap report --remote`): videos with no record there, records
there that are not home yet, and the cluster's current failures.

Two SSH commands, both GNU find with NUL-separated output, so every name survives (spaces, quotes,
newlines, bytes that are not UTF-8, which are kept as surrogate escapes like ``os.fsdecode`` does):

1. the videos: ``find -L SOURCE -type f -printf '%P\\0'``; symlinks are followed as vidcap's own
   discovery does (find notices loops), and the extension filter (``caption.extensions``, a
   case-insensitive suffix match) runs here;
2. the records and the failures ledger, in one ``sh -c`` script run in OUT: ``find . -path ./_vidcap
   -prune -o -name .vidcap-partial -prune -o -type f -name '*.json' -printf '%P\\t%s\\t%T@\\0'`` (rel
   path, size, mtime), then one empty NUL-terminated entry (no real entry is empty: each has two tabs),
   then the lines of ``_vidcap/failures*.jsonl``. In-progress temp files (``*.vidcap-tmp``) do not end
   in ``.json`` and are never listed.

A source directory that does not exist is an error (exit 2); an output directory that does not exist is
not: nothing has been captioned on the cluster yet. Paths are argv words: the transport quotes each one
for the remote shell; relative paths are relative to the cluster home and get a ``./`` so that a name
starting with ``-`` is never an option and CDPATH never applies.

``compare`` then walks the local (synced) directory once: a cluster record is "not synced" when it is
missing here or its size or whole-second mtime differs (``vidcap sync`` keeps mtimes, rsync -t) and the
local copy is not newer; when the local copy is newer ``vidcap sync`` keeps it (rsync --update), so it is
counted apart as ``local_newer``. Records here that the cluster does not have are ``local_only``.

Memory: the names of the source's videos and the cluster's records are held (one listing each); the
local tree is streamed.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import stat
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vidcap import jobscript, transport
from vidcap.config import Config, Profile, model_tag
from vidcap.discovery import printable
from vidcap.errors import ConfigError, TransportError, UsageError
from vidcap.jobs import choose_preset
from vidcap.jobstate import load_records
from vidcap.oncluster import cluster_out_dir
from vidcap.store import META, TMP_SUFFIX
from vidcap.sync import PARTIAL_DIR
from vidcap.transport import Transport, stderr_tail

LIST_TIMEOUT = 900.0  # seconds for one listing: a million files on a busy shared filesystem
PATH_LIMIT = 50  # how many paths of each kind a Pending carries (the first, sorted)
_MISSING = 64  # exit codes of the scripts below
_NOT_DIR = 65

_VIDEOS_SCRIPT = """\
if [ ! -d "$1" ]; then
  if [ -e "$1" ]; then exit 65; fi
  exit 64
fi
exec find -L "$1" -type f -printf '%P\\0'
"""

_RECORDS_SCRIPT = """\
if [ ! -e "$1" ]; then exit 64; fi
if [ ! -d "$1" ]; then exit 65; fi
cd "$1" || exit 65
find . -path ./_vidcap -prune -o -name .vidcap-partial -prune -o -type f -name '*.json' \
  -printf '%P\\t%s\\t%T@\\0'
rc=$?
printf '\\0'
for f in _vidcap/failures*.jsonl; do
  if [ -f "$f" ]; then cat "$f"; printf '\\n'; fi
done
exit $rc
"""


@dataclass
class RemoteListing:
    """What the cluster has. Keys are rel paths as str (undecodable bytes as surrogate escapes)."""

    source: str  # the cluster directory whose videos were listed (as given)
    out: str  # the cluster output directory (as given)
    videos: list[str] = field(default_factory=list)  # rel paths under source with a video extension
    records: dict[str, tuple[int, int]] = field(default_factory=dict)  # "<rel>.json" -> (size, mtime s)
    out_exists: bool = True
    failures: list[dict[str, Any]] = field(default_factory=list)  # current: latest per path, no record
    warnings: list[str] = field(default_factory=list)  # e.g. an unreadable directory (find's words)


@dataclass
class Pending:
    """The comparison of a RemoteListing with a local synced directory; ``to_dict`` is the JSON."""

    cluster_dir: str
    source: str
    host: str = ""
    local_dir: str = ""
    local_exists: bool = False
    cluster_dir_exists: bool = True
    videos: int = 0  # on the cluster under source, with a video extension
    cluster_records: int = 0
    uncaptioned: int = 0  # videos with no record on the cluster (failed ones included)
    uncaptioned_paths: list[str] = field(default_factory=list)
    not_synced: int = 0  # cluster records that `vidcap sync` would bring (missing here or older here)
    not_synced_paths: list[str] = field(default_factory=list)
    local_newer: int = 0  # differ from the cluster's, but the local copy is newer: sync keeps it
    cluster_failures: int = 0  # current failures on the cluster (latest line per path, no record)
    cluster_failures_by_class: dict[str, int] = field(default_factory=dict)
    local_only: int = 0  # records here that the cluster does not have
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the cluster side ------------------------------------------------------------------------------


def remote_arg(path: str) -> str:
    """A cluster path as a find/cd operand: absolute as is, relative (to the home) with a ``./``."""
    if not path:
        raise UsageError("empty cluster path")
    if "\0" in path:
        raise UsageError(f"cluster path {path!r} contains a NUL character")
    if path.startswith("/") or path == "." or path.startswith("./"):
        return path
    return "./" + path


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _whole_seconds(text: str) -> int:
    """find's %T@ ("1700000000.1234567890") as floor seconds, without float rounding up."""
    whole, _, frac = text.partition(".")
    seconds = int(whole)
    if whole.startswith("-") and frac.strip("0"):
        seconds -= 1
    return seconds


def _check_find(done_stderr: bytes, what: str) -> None:
    if b"printf" in done_stderr and (b"unknown" in done_stderr or b"invalid" in done_stderr):
        raise TransportError(
            f"listing {what} on the cluster needs GNU find (find -printf); "
            f"it said: {stderr_tail(done_stderr)}"
        )


def list_videos(transport: Transport, source: str, extensions: Iterable[str]) -> tuple[list[str], list[str]]:
    """The rel paths of the videos under ``source`` on the cluster, and find's warnings."""
    exts = tuple(e.lower() for e in extensions)
    done = transport.run(
        ["sh", "-c", _VIDEOS_SCRIPT, "vidcap-pending", remote_arg(source)], timeout=LIST_TIMEOUT, check=False
    )
    if done.returncode == _MISSING:
        raise UsageError(
            f"{source!r} does not exist on the cluster (a relative path is under the cluster home); "
            "set paths.videos_dir or pass --source"
        )
    if done.returncode == _NOT_DIR:
        raise UsageError(f"{source!r} on the cluster is not a directory")
    _check_find(done.stderr, "videos")
    if done.returncode not in (0, 1):  # 1: find went on past an unreadable directory or a loop
        raise TransportError(
            f"listing {source!r} on the cluster failed (exit {done.returncode}): "
            f"{stderr_tail(done.stderr) or 'no message'}"
        )
    videos = [
        name
        for name in (_decode(raw) for raw in done.stdout.split(b"\0") if raw)
        if name.lower().endswith(exts)
    ]
    warnings = [f"{source}: {stderr_tail(done.stderr, 3)}"] if done.returncode == 1 and done.stderr else []
    return videos, warnings


def parse_records(data: bytes) -> tuple[dict[str, tuple[int, int]], bytes]:
    """The records part of the second script's stdout -> {rel: (size, mtime s)}, and the ledger bytes."""
    records: dict[str, tuple[int, int]] = {}
    start = 0
    while True:
        end = data.find(b"\0", start)
        if end < 0:  # no separator: the script was cut short
            return records, b""
        entry = data[start:end]
        start = end + 1
        if not entry:
            return records, data[start:]
        name, _, rest = entry.rpartition(b"\t")
        name, _, size = name.rpartition(b"\t")
        try:
            records[_decode(name)] = (int(size), _whole_seconds(rest.decode("ascii")))
        except ValueError:
            continue


def _ts(item: dict[str, Any]) -> datetime:
    try:
        found = datetime.fromisoformat(str(item.get("ts", "")).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return found if found.tzinfo else found.replace(tzinfo=timezone.utc)


def current_failures(ledger: bytes, records: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """The latest line per path (by ``ts``; a tie goes to the later line) for paths with no record."""
    latest: dict[str, tuple[datetime, dict[str, Any]]] = {}
    for line in ledger.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            continue
        when = _ts(item)
        kept = latest.get(item["path"])
        if kept is None or when >= kept[0]:
            latest[item["path"]] = (when, item)
    return [item for path, (_, item) in sorted(latest.items()) if path + ".json" not in records]


def list_remote(transport: Transport, source: str, out: str, extensions: Iterable[str]) -> RemoteListing:
    """List the videos under ``source`` and the records and current failures under ``out`` on the
    cluster (paths absolute or relative to the cluster home). Raises UsageError for a source that does
    not exist, TransportError when SSH or find fails."""
    videos, warnings = list_videos(transport, source, extensions)
    listing = RemoteListing(source=source, out=out, videos=videos, warnings=warnings)
    done = transport.run(
        ["sh", "-c", _RECORDS_SCRIPT, "vidcap-pending", remote_arg(out)], timeout=LIST_TIMEOUT, check=False
    )
    if done.returncode == _MISSING:
        listing.out_exists = False
        return listing
    if done.returncode == _NOT_DIR:
        raise UsageError(f"{out!r} on the cluster is not a directory (paths.captions_dir/<model tag>)")
    _check_find(done.stderr, "records")
    if done.returncode not in (0, 1):
        raise TransportError(
            f"listing {out!r} on the cluster failed (exit {done.returncode}): "
            f"{stderr_tail(done.stderr) or 'no message'}"
        )
    if done.returncode == 1 and done.stderr:
        listing.warnings.append(f"{out}: {stderr_tail(done.stderr, 3)}")
    listing.records, ledger = parse_records(done.stdout)
    listing.failures = current_failures(ledger, listing.records)
    return listing


# ---- the local side --------------------------------------------------------------------------------


def _local_records(root: Path) -> Iterable[tuple[str, os.stat_result]]:
    """(rel, stat) of each regular ``*.json`` under root, leaving out META at the top, rsync's partial
    dirs and temp files. Symlinks are not followed (vidcap sync copies them as links)."""
    stack = [(str(root), "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            rel = prefix + entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if entry.name == PARTIAL_DIR or (not prefix and entry.name == META):
                    continue
                stack.append((entry.path, rel + "/"))
            elif stat.S_ISREG(st.st_mode) and entry.name.endswith(".json") and TMP_SUFFIX not in entry.name:
                yield rel, st


def compare(listing: RemoteListing, local_dir: Path) -> Pending:
    """What the cluster has that is not captioned, not home yet, or failed; and what only we have."""
    local_exists = local_dir.is_dir()
    pending = Pending(
        cluster_dir=listing.out,
        source=listing.source,
        local_dir=str(local_dir),
        local_exists=local_exists,
        cluster_dir_exists=listing.out_exists,
        videos=len(listing.videos),
        cluster_records=len(listing.records),
        warnings=list(listing.warnings),
    )
    records = listing.records
    uncaptioned = (v for v in listing.videos if v + ".json" not in records)
    pending.uncaptioned_paths, pending.uncaptioned = _first(uncaptioned)

    seen: set[str] = set()
    stale: list[str] = []
    if local_exists:
        for rel, st in _local_records(local_dir):
            remote = records.get(rel)
            if remote is None:
                pending.local_only += 1
                continue
            seen.add(rel)
            size, mtime = remote
            local_mtime = st.st_mtime_ns // 1_000_000_000
            if size == st.st_size and mtime == local_mtime:
                continue
            if local_mtime > mtime:
                pending.local_newer += 1
            else:
                stale.append(rel)
    missing = (rel for rel in records if rel not in seen)
    pending.not_synced_paths, pending.not_synced = _first(itertools.chain(stale, missing))

    by_class = Counter(str(f.get("error", "?")) for f in listing.failures)
    pending.cluster_failures = len(listing.failures)
    pending.cluster_failures_by_class = dict(by_class.most_common())
    return pending


def _first(paths: Iterable[str]) -> tuple[list[str], int]:
    """The first PATH_LIMIT paths in sorted order (printable), and how many there are, in one pass."""
    count = 0

    def counted() -> Iterable[str]:
        nonlocal count
        for path in paths:
            count += 1
            yield path

    first = heapq.nsmallest(PATH_LIMIT, counted())
    return [printable(p) for p in first], count


# ---- a profile -------------------------------------------------------------------------------------


def default_local_dir(cfg: Config, profile: Profile) -> Path:
    """Where ``vidcap sync`` (default ``--to captions``) puts the profile's model's cluster records."""
    return Path("captions") / model_tag(choose_preset(cfg, profile).model)


def _last_caption_path(profile_name: str) -> str | None:
    """The directory the profile's newest captioning job (job submit --caption) captions: record paths
    are relative to it, so that is what "no record yet" must be counted against."""
    found = [r for r in load_records(profile_name) if r.caption and not r.root]
    return str(found[-1].caption["path"]) if found and found[-1].caption else None


def check(cfg: Config, profile_name: str, local_dir: Path, source: str | None = None) -> Pending:
    """List the profile's cluster (videos under ``source``, default the newest captioning job's directory,
    else paths.videos_dir; records under
    ``cluster_out_dir``) over SSH and compare with ``local_dir``. ConfigError/UsageError (exit 2) for a
    profile without ssh.host or a bad path, TransportError (exit 3) when the cluster cannot be reached."""
    profile = cfg.profile(profile_name)
    if not profile.ssh.host:
        raise ConfigError(
            f"profile {profile_name!r} has no ssh.host: vidcap report --remote lists the cluster over SSH; "
            "set [profiles.NAME.ssh] host or pick a profile with -p"
        )
    try:
        out = cluster_out_dir(cfg, profile)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        src = jobscript.home_relative(source, "--source") if source is not None else None
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if src is None:
        src = _last_caption_path(profile_name)
    if src is None:
        try:
            src = jobscript.home_relative(profile.paths.videos_dir, "paths.videos_dir")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    with transport.connect(profile.ssh) as conn:
        listing = list_remote(conn, src, out, profile.caption.extensions)
        listing.warnings.extend(conn.notes)
    pending = compare(listing, local_dir)
    pending.host = profile.ssh.host
    return pending
