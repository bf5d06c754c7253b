"""Talking to the OpenAI-compatible server (vLLM): server info, chat requests with the retry policy,
and the outage gate that turns "the server went away" into a wait instead of a mass failure.

Retried: connection errors, timeouts, 429, 500, 502, 503, 504 (tenacity, exponential backoff with jitter,
bounded attempts and time). Not retried: other 4xx, reported with vLLM's own message.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from vidcap.errors import ServerError, ServerUnreachableError
from vidcap.records import Usage

RETRY_STATUS = {429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # ends in /v1
    api_key: str | None = field(default=None, repr=False)

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/").removesuffix("/v1")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class ServerInfo:
    models: list[str]
    max_model_len: int | None
    version: str | None


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None
    usage: Usage
    attempts: int


class RequestFailed(Exception):
    """A request that failed for good; ``kind`` is the failure class written to failures.jsonl."""

    def __init__(self, kind: str, message: str, attempts: int, retryable: bool) -> None:
        super().__init__(message)
        self.kind, self.attempts, self.retryable = kind, attempts, retryable


def normalize_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


async def server_info(endpoint: Endpoint, timeout: float = 10.0) -> ServerInfo:
    """Models, context length and version; ServerUnreachableError / ServerError when it cannot say."""
    async with httpx.AsyncClient(timeout=timeout, headers=endpoint.headers()) as http:
        try:
            resp = await http.get(endpoint.base_url + "/models")
        except httpx.HTTPError as exc:
            raise ServerUnreachableError(
                f"cannot reach the model server at {endpoint.base_url} ({type(exc).__name__}); "
                "is the job running and the tunnel up? try 'vidcap tunnel status'"
            ) from exc
        if resp.status_code == 401:
            raise ServerError(
                f"{endpoint.base_url} refused the API key (401); set VIDCAP_API_KEY or --api-key-file"
            )
        if resp.status_code != 200:
            raise ServerError(f"{endpoint.base_url}/models answered {resp.status_code}: {resp.text[:200]}")
        data = resp.json().get("data") or []
        version = None
        try:
            vresp = await http.get(endpoint.root + "/version")
            if vresp.status_code == 200:
                version = vresp.json().get("version")
        except (httpx.HTTPError, ValueError):
            pass
    lens = [m.get("max_model_len") for m in data if isinstance(m.get("max_model_len"), int)]
    return ServerInfo([m.get("id") for m in data], lens[0] if lens else None, version)


class Gate:
    """Open while the server answers. A connection failure closes it until /health is 200 again, so
    that a dropped tunnel or a restarting server pauses every worker instead of failing every video."""

    def __init__(self, endpoint: Endpoint, max_wait: float) -> None:
        self.endpoint = endpoint
        self.max_wait = max_wait
        self._open = asyncio.Event()
        self._open.set()
        self._checking: asyncio.Task[None] | None = None
        self.outages = 0

    async def wait_open(self) -> None:
        await self._open.wait()
        if self._checking is not None and self._checking.done() and self._checking.exception():
            raise self._checking.exception()  # type: ignore[misc]

    async def report_connection_error(self) -> None:
        """Called after a connection error: check /health once for everybody, wait while it is down."""
        if self._checking is None or self._checking.done():
            if self._checking is not None and self._checking.exception():
                raise self._checking.exception()  # type: ignore[misc]
            self._checking = asyncio.ensure_future(self._check())
        await asyncio.shield(self._checking)

    async def _check(self) -> None:
        deadline = time.monotonic() + self.max_wait
        delay = 0.5
        async with httpx.AsyncClient(timeout=5.0) as http:
            while True:
                try:
                    if (await http.get(self.endpoint.root + "/health")).status_code == 200:
                        self._open.set()
                        return
                except httpx.HTTPError:
                    pass
                if self._open.is_set():
                    self._open.clear()
                    self.outages += 1
                if time.monotonic() >= deadline:
                    self._open.set()  # wake the waiters so that they see the error
                    raise ServerUnreachableError(
                        f"the model server at {self.endpoint.base_url} has not answered for "
                        f"{self.max_wait:.0f} s; stopped (rerun to complete what is missing)"
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


class Unreachable(Exception):
    """No HTTP answer: refused, reset, dropped mid-response."""


class TimedOut(Unreachable):
    pass


class StatusFailure(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error_message(resp: httpx.Response) -> str:
    """vLLM's message: {"message": ...} (older) or {"error": {"message": ...}} (newer)."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300] or resp.reason_phrase
    if isinstance(body, dict):
        inner = body.get("error")
        msg = body.get("message") or (inner.get("message") if isinstance(inner, dict) else inner)
        if msg:
            return " ".join(str(msg).split())[:500]
    return str(body)[:300]


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, Unreachable) or (isinstance(exc, StatusFailure) and exc.status in RETRY_STATUS)


class Requester:
    """Sends chat requests with the retry policy, at most ``slots`` at a time.

    Plain httpx with one single-connection client per slot, not the openai SDK: the SDK's request
    type conversion and its pool's per-request connection checks cost more CPU than everything else
    vidcap does per caption (measured in tests/bench: 0.37x a raw httpx loop with the SDK).
    A slot is held only while a request is on the wire, not during backoff sleeps.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        gate: Gate,
        *,
        slots: int,
        timeout: float,
        max_attempts: int,
        max_seconds: float,
        wait_multiplier: float = 0.5,
        wait_max: float = 20.0,
    ) -> None:
        self.url = endpoint.base_url + "/chat/completions"
        # One TLS context for all slots: each client building its own loads the CA bundle (~25 ms each).
        tls = ssl.create_default_context()
        self._all = [
            httpx.AsyncClient(
                verify=tls,
                headers=endpoint.headers(),
                timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                trust_env=False,  # a proxy setting must not divert traffic meant for the tunnel
            )
            for _ in range(slots)
        ]
        self._clients: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        for client in self._all:
            self._clients.put_nowait(client)
        self.gate = gate
        self.max_attempts = max_attempts
        self.max_seconds = max_seconds
        self.wait = wait_random_exponential(multiplier=wait_multiplier, max=wait_max)
        self.requests = 0
        self.retried = 0

    async def close(self) -> None:
        for client in self._all:
            await client.aclose()

    async def complete(self, body: dict[str, Any]) -> Reply:
        outage = {"attempts": 0, "seconds": 0.0}

        def stop(state: RetryCallState) -> bool:
            # Attempts and time spent while the server was away do not count against the request.
            spent = (state.seconds_since_start or 0.0) - outage["seconds"]
            return state.attempt_number - outage["attempts"] >= self.max_attempts or spent >= self.max_seconds

        attempts = 0
        retrying = AsyncRetrying(
            retry=retry_if_exception(_retryable), wait=self.wait, stop=stop, reraise=True
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    if attempts > 1:
                        self.retried += 1
                    await self.gate.wait_open()
                    try:
                        return await self._send(body, attempts)
                    except Unreachable:
                        before = time.monotonic()
                        outages = self.gate.outages
                        await self.gate.report_connection_error()
                        if self.gate.outages != outages:
                            outage["attempts"] += 1
                            outage["seconds"] += time.monotonic() - before
                        raise
        except StatusFailure as exc:
            raise RequestFailed(f"http_{exc.status}", str(exc), attempts, _retryable(exc)) from exc
        except Unreachable as exc:
            kind = "timeout" if isinstance(exc, TimedOut) else "connection"
            raise RequestFailed(kind, str(exc), attempts, True) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(self, body: dict[str, Any], attempts: int) -> Reply:
        client = await self._clients.get()
        try:
            self.requests += 1
            resp = await client.post(self.url, json=body)
        except httpx.TimeoutException as exc:
            raise TimedOut(f"no answer within the request timeout ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc or 'connection lost'}") from exc
        finally:
            self._clients.put_nowait(client)
        if resp.status_code != 200:
            raise StatusFailure(resp.status_code, _error_message(resp))
        try:
            data = resp.json()
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return Reply(
                choice["message"].get("content") or "",
                choice.get("finish_reason"),
                Usage(
                    prompt_tokens=usage.get("prompt_tokens", 0),
                    completion_tokens=usage.get("completion_tokens", 0),
                ),
                attempts,
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise RequestFailed(
                "bad_response", f"not a chat completion: {resp.text[:200]}", attempts, False
            ) from exc
