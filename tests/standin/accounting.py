"""Counters and concurrency slots of the stand-in (loop-thread only, no locking)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any


class Slots:
    """vLLM's max-num-seqs: at most ``limit()`` holders; the rest wait in FIFO order, never refused."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self.limit = limit
        self.used = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    def _free(self) -> bool:
        limit = self.limit()
        return limit <= 0 or self.used < limit

    async def acquire(self) -> None:
        if not self.waiters and self._free():
            self.used += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted just as we were cancelled: pass it on
            else:
                self.waiters.remove(fut)
            raise

    def release(self) -> None:
        self.used -= 1
        self.wake()

    def wake(self) -> None:
        while self.waiters and self._free():
            fut = self.waiters.popleft()
            if not fut.done():
                self.used += 1
                fut.set_result(None)


class Stats:
    def __init__(self) -> None:
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        self.reset_at = time.monotonic()
        self.requests = self.completed = self.dropped = self.cancelled = 0
        self.errors: Counter[int] = Counter()
        self.max_in_flight = self.in_flight
        self.busy_slot_seconds = 0.0
        self.first_request_ts: float | None = None
        self.last_response_ts: float | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self.by_video: Counter[str] = Counter()
        self.by_video_overflow = 0

    def snapshot(self, waiting: int) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "errors": {str(k): v for k, v in sorted(self.errors.items())},
            "dropped": self.dropped,
            "cancelled": self.cancelled,
            "in_flight": self.in_flight,
            "waiting": waiting,
            "max_in_flight": self.max_in_flight,
            "busy_slot_seconds": self.busy_slot_seconds,
            "first_request_ts": self.first_request_ts,
            "last_response_ts": self.last_response_ts,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "by_video": dict(self.by_video),
            "by_video_overflow": self.by_video_overflow,
        }
