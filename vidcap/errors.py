"""The one error tree of vidcap.

    VidcapError                  every error vidcap raises on purpose; the CLI prints "Name: message"
    ├── ConfigError              bad config file, bad option value            -> exit 2
    ├── UsageError               an option combination that cannot work       -> exit 2
    ├── OutputLockedError        another run holds the output directory       -> exit 2
    ├── ServerUnreachableError   the model server cannot be reached (or stayed away too long) -> exit 3
    ├── ServerError              the server answered, but not as vLLM should  -> exit 3
    ├── TransportError           SSH: cannot connect, a remote command failed   -> exit 3
    │   └── HostKeyError         the host key is unknown or CHANGED: refused, never auto-added
    ├── TunnelError              a tunnel cannot be started or kept             -> exit 3
    └── MediaError               one video cannot be used (corrupt, empty, not a video, ...);
                                 never ends a run: it becomes a line in failures.jsonl

Library exceptions (decord, paramiko, httpx, OSError) are translated where they enter, with ``from exc``.
"""

from __future__ import annotations


class VidcapError(Exception):
    """Base of every error vidcap raises on purpose."""

    exit_code: int = 1


class ConfigError(VidcapError):
    exit_code = 2


class UsageError(VidcapError):
    exit_code = 2


class OutputLockedError(VidcapError):
    exit_code = 2


class ServerUnreachableError(VidcapError):
    exit_code = 3


class ServerError(VidcapError):
    exit_code = 3


class TransportError(VidcapError):
    exit_code = 3


class HostKeyError(TransportError):
    """A host key that is not trusted: ``reason`` is "changed" (a different key is on file: refused
    whatever the settings), "unknown" (no key on file) or "revoked"."""

    def __init__(self, message: str, reason: str = "unknown") -> None:
        super().__init__(message)
        self.reason = reason


class JobError(VidcapError):
    """A job that failed, ended, cannot be found, or was not ready in time."""

    exit_code = 3


class TunnelError(VidcapError):
    exit_code = 3


class SyncError(VidcapError):
    """rsync could not sync; ``exit_code`` is 1, 2 or 130 (see vidcap/sync.py's module doc)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class MediaError(VidcapError):
    """A video that cannot be captioned. ``kind`` is a short stable class for reports."""

    def __init__(self, kind: str, message: str) -> None:
        # Both in args: the error crosses a process pool, and pickling rebuilds it from args.
        super().__init__(kind, message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return self.message
