"""Test-only stand-in for a vLLM OpenAI-compatible server serving Qwen3-Omni (see server.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .options import Options
    from .server import StandIn, run_subprocess, stop_subprocess

__all__ = ["Options", "StandIn", "run_subprocess", "stop_subprocess"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m tests.standin.server` does not import server.py twice (runpy warns).
    if name == "Options":
        from .options import Options

        return Options
    if name in ("StandIn", "run_subprocess", "stop_subprocess"):
        from . import server

        return getattr(server, name)
    raise AttributeError(name)
