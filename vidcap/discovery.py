"""Streaming discovery of the videos under a directory: sorted, loop-safe, shard-filtered.

Memory is bounded by one directory listing plus the set of directories visited (which is what makes
symlink loops safe), never by the number of videos.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    path: str
    rel: str
    size: int
    mtime: float


@dataclass(frozen=True)
class Problem:
    """Something under the source that is not captioned; ``video`` tells a failed video from a warning."""

    rel: str
    kind: str
    message: str
    video: bool


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/N' -> (i, N) with 0 <= i < N."""
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes i/N, e.g. 0/4 (got {text!r})") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard i/N needs 0 <= i < N (got {text!r})")
    return i, n


def shard_of(rel: str, count: int) -> int:
    digest = hashlib.sha1(rel.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(rel: str) -> str:
    """A name that JSON can hold: undecodable bytes shown as \\xNN."""
    return rel if _utf8(rel) else rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def walk(root: Path, extensions: Iterable[str]) -> Iterator[Entry | Problem]:
    """Videos under ``root`` by extension, in sorted order, following symlinks but never in a loop.
    Problem names are always printable; an Entry whose name is not UTF-8 becomes a Problem."""
    for item in _walk(root, extensions):
        if isinstance(item, Problem) and not _utf8(item.rel):
            item = Problem(printable(item.rel), item.kind, item.message, item.video)
        yield item


def _walk(root: Path, extensions: Iterable[str]) -> Iterator[Entry | Problem]:
    exts = tuple(e.lower() for e in extensions)
    top = os.stat(root)
    seen = {(top.st_dev, top.st_ino)}
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            with os.scandir(directory) as it:
                items = sorted(it, key=lambda d: d.name)
        except OSError as exc:
            yield Problem(prefix or ".", "unreadable_dir", f"cannot list directory: {exc.strerror}", False)
            continue
        subdirs = []
        for item in items:
            rel = prefix + item.name
            try:
                st = item.stat()  # follows symlinks
            except OSError as exc:
                if item.name.lower().endswith(exts):
                    yield Problem(rel, "unreadable", f"cannot stat file: {exc.strerror} (broken link?)", True)
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    yield Problem(
                        rel, "symlink_loop", "directory already visited (symlink loop); skipped", False
                    )
                    continue
                seen.add(key)
                subdirs.append((item.path, rel + "/"))
            elif stat.S_ISREG(st.st_mode) and item.name.lower().endswith(exts):
                if not _utf8(rel):
                    # Records are JSON (UTF-8): such a name cannot be written as it is. Say so, escaped.
                    yield Problem(rel, "bad_name", "file name is not valid UTF-8; rename the file", True)
                    continue
                yield Entry(item.path, rel, st.st_size, st.st_mtime)
        stack.extend(reversed(subdirs))
