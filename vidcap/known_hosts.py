"""known_hosts for the "sshtunnel" backend, checked by vidcap rather than by paramiko's policies.

The file is parsed line by line (hashed names, ``*``/``?`` patterns, ``!`` negation, ``@revoked``;
``@cert-authority`` lines are read but host certificates are not accepted), so a refusal can name the
file and line, an unknown key is told apart from a changed one, and accept-new appends exactly one line.
paramiko's own ``HostKeys.load`` would stop at the first ``@cert-authority`` line (InvalidHostKey is not
an SSHException) and cannot say which line a key came from.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import paramiko

from vidcap.errors import HostKeyError, TransportError

log = logging.getLogger("vidcap.transport")

_RSA_ALGORITHMS = ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")


@dataclass(frozen=True)
class KnownHost:
    """One known_hosts line."""

    lineno: int
    marker: str | None  # "@revoked", "@cert-authority" or None
    patterns: tuple[str, ...]
    keytype: str
    blob: bytes

    def matches(self, name: str) -> bool:
        """OpenSSH's rule: any positive pattern matches and no negated one does."""
        name = name.lower()
        hit = False
        for pattern in self.patterns:
            negated = pattern.startswith("!")
            pattern = pattern[1:] if negated else pattern
            if pattern.startswith("|1|"):
                ok = _hashed_match(pattern, name)
            else:
                ok = _glob(pattern.lower()).fullmatch(name) is not None
            if ok and negated:
                return False
            hit = hit or ok
        return hit


def _glob(pattern: str) -> re.Pattern[str]:
    # Only * and ? are wildcards in known_hosts; "[host]:port" brackets are literal.
    return re.compile(re.escape(pattern).replace(r"\*", ".*").replace(r"\?", "."))


def _hashed_match(pattern: str, name: str) -> bool:
    try:
        _, _, salt, digest = pattern.split("|", 3)
        want = base64.b64decode(digest)
        got = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(want, got)


def read_known_hosts(path: Path) -> list[KnownHost]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise TransportError(f"cannot read known_hosts {path}: {exc.strerror or exc}") from exc
    entries = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        fields = raw.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = fields.pop(0) if fields[0].startswith("@") else None
        if len(fields) < 3:
            continue
        try:
            blob = base64.b64decode(fields[2], validate=True)
        except (binascii.Error, ValueError):
            continue
        entries.append(KnownHost(lineno, marker, tuple(fields[0].split(",")), fields[1], blob))
    return entries


def check_host_key(path: Path, name: str, key: paramiko.PKey, accept_new: bool) -> str | None:
    """Accept a known key; refuse a changed, revoked or (unless accept_new) unknown one.

    Returns a note when a new key was added to known_hosts.
    """
    entries = [e for e in read_known_hosts(path) if e.matches(name)]
    blob, fingerprint = key.asbytes(), key.fingerprint
    if any(e.marker == "@revoked" and e.blob == blob for e in entries):
        raise HostKeyError(
            f"the host key of {name} ({fingerprint}) is marked @revoked in {path}; refusing", "revoked"
        )
    plain = [e for e in entries if e.marker is None]
    if any(e.blob == blob for e in plain):
        return None
    if plain:
        same_type = [e for e in plain if e.keytype == key.get_name()] or plain
        lines = ", ".join(str(e.lineno) for e in same_type)
        raise HostKeyError(
            f"the host key of {name} has CHANGED: it now offers {key.get_name()} {fingerprint}, but "
            f"{path} line {lines} has a different key. This can be an attack (man in the middle) or a "
            f"reinstalled server: confirm the new fingerprint with the cluster admins, then remove the old "
            f"line (ssh-keygen -R {shlex.quote(name)} -f {shlex.quote(str(path))}) and connect again",
            "changed",
        )
    if not accept_new:
        raise HostKeyError(
            f"{name} is not in known_hosts ({path}); verify its fingerprint {key.get_name()} {fingerprint} "
            f"(ask the cluster admins or see their docs) and add it, e.g. by logging in once with ssh, "
            f"or set accept_new_host_key = true to add it on first use"
        )
    append_known_host(path, name, key)
    note = f"added the host key of {name} ({key.get_name()} {fingerprint}) to {path}"
    log.warning("%s", note)
    return note


def append_known_host(path: Path, name: str, key: paramiko.PKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    line = f"{name} {key.get_name()} {key.get_base64()}\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())


def prefer_known_key_types(t: paramiko.Transport, entries: list[KnownHost], name: str) -> None:
    """Ask for the key type known_hosts has, as OpenSSH does, so a legitimate server is never "changed"."""
    known = [e.keytype for e in entries if e.marker is None and e.matches(name)]
    wanted: list[str] = []
    for keytype in known:
        wanted += _RSA_ALGORITHMS if keytype == "ssh-rsa" else (keytype,)
    options = t.get_security_options()
    available = list(options.key_types)
    first = [k for k in dict.fromkeys(wanted) if k in available]
    if first:
        options.key_types = tuple(first + [k for k in available if k not in first])
