"""Talking to the OpenAI-compatible server (vLLM): server info, chat requests with the retry policy,
and the outage gate that turns "the server went away" into a wait instead of a mass failure.

Retried: connection errors, timeouts, 429, 500, 502, 503, 504 (tenacity, exponential backoff with jitter,
bounded attempts and time). Not retried: other 4xx, reported with vLLM's own message.

Several replicas of the same model (N vLLM servers) are one ``Pool``: each request goes to the live
replica with the fewest requests in flight; a replica that goes away hands its requests to the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ssl
import time
from collections.abc import Callable, Sequence
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
    job_id: str | None = None  # the Slurm job serving it, when known (written to the records)

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
    replica: int = 0  # index of the Pool replica that answered


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
        self._down = asyncio.Event()  # set while closed because /health failed
        self._checking: asyncio.Task[None] | None = None
        self.outages = 0

    @property
    def is_open(self) -> bool:
        return self._open.is_set() and self.error is None

    @property
    def error(self) -> BaseException | None:
        """The ServerUnreachableError of a check that gave up (the server stayed away too long)."""
        checking = self._checking
        if checking is None or not checking.done() or checking.cancelled():
            return None
        return checking.exception()

    async def wait_open(self) -> None:
        await self._open.wait()
        if (error := self.error) is not None:
            raise error

    async def report_connection_error(self, wait: bool = True) -> None:
        """Called after a connection error: check /health once for everybody, wait while it is down.
        With ``wait=False`` return as soon as the check knows whether the server is down (the gate is
        then closed) or up, instead of waiting for the end of an outage."""
        if self._checking is None or self._checking.done():
            if (error := self.error) is not None:
                raise error
            self._checking = asyncio.ensure_future(self._check())
        if wait:
            await asyncio.shield(self._checking)
            return
        if not self._open.is_set():
            return
        closed = asyncio.ensure_future(self._down.wait())
        try:
            await asyncio.wait([self._checking, closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if (error := self.error) is not None:
            raise error

    async def close(self) -> None:
        """Stop a check still running (the run is over)."""
        checking = self._checking
        if checking is None:
            return
        if not checking.done():
            checking.cancel()
            await asyncio.wait([checking])
        if not checking.cancelled():
            checking.exception()  # retrieved, so that asyncio does not log it as never retrieved

    async def _check(self) -> None:
        deadline = time.monotonic() + self.max_wait
        delay = 0.5
        async with httpx.AsyncClient(timeout=5.0) as http:
            while True:
                try:
                    if (await http.get(self.endpoint.root + "/health")).status_code == 200:
                        self._down.clear()
                        self._open.set()
                        return
                except httpx.HTTPError:
                    pass
                if self._open.is_set():
                    self._open.clear()
                    self._down.set()
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


class _Moved(Exception):
    """A Pool's replica gave up on a request so that another replica takes it."""

    def __init__(self, attempts: int) -> None:
        super().__init__("moved to another replica")
        self.attempts = attempts


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
        # Set by a Pool of several replicas: true when a request should leave this replica for another.
        self.leave: Callable[[], bool] | None = None

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
                    if self.leave is not None:
                        await self._stay_or_move(attempts)
                    attempts += 1
                    if attempts > 1:
                        self.retried += 1
                    await self.gate.wait_open()
                    try:
                        return await self._send(body, attempts)
                    except Unreachable:
                        before = time.monotonic()
                        outages = self.gate.outages
                        if self.leave is None:
                            await self.gate.report_connection_error()
                        else:
                            # Another replica may take it now: first learn whether this one is down.
                            await self.gate.report_connection_error(wait=False)
                            if self.leave():
                                raise _Moved(attempts) from None
                            if not self.gate.is_open:
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

    async def _stay_or_move(self, attempts: int) -> None:
        """In a Pool: raise _Moved when the request should go to another replica; wait for this one's
        gate only when no other is open (and then look again)."""
        assert self.leave is not None
        if self.leave():
            raise _Moved(attempts)
        if not self.gate.is_open:
            await self.gate.wait_open()
            if self.leave():
                raise _Moved(attempts)

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


@dataclass(eq=False)
class Replica:
    index: int
    endpoint: Endpoint
    requester: Requester
    gate: Gate
    in_flight: int = 0  # requests given to it and not answered yet (waiting for a slot included)
    dead: str | None = None  # why it left the run


class Pool:
    """Requests spread over replicas of one model: the same interface as a Requester (``complete``,
    ``requests``, ``retried``, ``close``). Each replica has its own Requester (``slots`` requests in
    flight) and Gate, so an outage pauses only that replica's requests.

    A request goes to the live replica with the fewest requests in flight, preferring those whose gate
    is open. When its replica goes away (connection errors and /health failing) while another is open,
    the request moves there at once; a replica whose gate gives up (no answer for ``server_wait``) or
    that is dropped (``drop``: its job ended) is dead, and its requests that then fail with connection
    errors are retried on the others. Only when no replica is left does ServerUnreachableError reach
    the caller. A Pool of one replica is that replica's Requester.
    """

    def __init__(
        self,
        replicas: Sequence[tuple[Endpoint, Requester, Gate]],
        on_dead: Callable[[int, str], None] = lambda index, reason: None,
    ) -> None:
        if not replicas:
            raise ValueError("a Pool needs at least one replica")
        self.replicas = [Replica(i, e, r, g) for i, (e, r, g) in enumerate(replicas)]
        self.on_dead = on_dead
        self.failovers = 0
        self._turn = 0
        if len(self.replicas) > 1:
            for rep in self.replicas:
                rep.requester.leave = functools.partial(self._should_leave, rep)

    @classmethod
    def connect(
        cls,
        endpoints: Sequence[Endpoint],
        *,
        slots: int,
        server_wait: float,
        timeout: float,
        max_attempts: int,
        max_seconds: float,
        wait_max: float = 20.0,
        on_dead: Callable[[int, str], None] = lambda index, reason: None,
    ) -> Pool:
        replicas = []
        for endpoint in endpoints:
            gate = Gate(endpoint, server_wait)
            requester = Requester(
                endpoint,
                gate,
                slots=slots,
                timeout=timeout,
                max_attempts=max_attempts,
                max_seconds=max_seconds,
                wait_max=wait_max,
            )
            replicas.append((endpoint, requester, gate))
        return cls(replicas, on_dead)

    @property
    def requests(self) -> int:
        return sum(r.requester.requests for r in self.replicas)

    @property
    def retried(self) -> int:
        return sum(r.requester.retried for r in self.replicas) + self.failovers

    def live(self) -> list[int]:
        return [r.index for r in self.replicas if r.dead is None]

    def drop(self, index: int, reason: str) -> None:
        """Send nothing more to replica ``index`` (e.g. its Slurm job ended); requests in flight there
        that then fail with connection errors are retried on the others."""
        rep = self.replicas[index]
        if rep.dead is None:
            rep.dead = reason
            self.on_dead(index, reason)

    async def close(self) -> None:
        for rep in self.replicas:
            await rep.requester.close()
            await rep.gate.close()

    async def complete(self, body: dict[str, Any], replica: int | None = None) -> Reply:
        """Send ``body``; to replica ``replica`` when it is live and open (e.g. a follow-up request
        whose answer is compared with an earlier one), else to the least busy."""
        if len(self.replicas) == 1:
            if self.replicas[0].dead is not None:
                raise ServerUnreachableError(self._gone())
            return await self.replicas[0].requester.complete(body)
        attempts = 0
        while True:
            rep = self._pick(replica)
            rep.in_flight += 1
            try:
                reply = await rep.requester.complete(body)
            except _Moved as exc:
                attempts += exc.attempts
            except ServerUnreachableError:
                self.drop(rep.index, f"no answer for {rep.gate.max_wait:.0f} s")
            except RequestFailed as exc:
                if rep.dead is None or exc.kind not in ("connection", "timeout"):
                    exc.attempts += attempts
                    raise
                attempts += exc.attempts
            else:
                if attempts:
                    reply = dataclasses.replace(reply, attempts=reply.attempts + attempts)
                return dataclasses.replace(reply, replica=rep.index)
            finally:
                rep.in_flight -= 1
            self.failovers += 1
            replica = None

    def _pick(self, prefer: int | None) -> Replica:
        for rep in self.replicas:
            if rep.dead is None and rep.gate.error is not None:
                self.drop(rep.index, f"no answer for {rep.gate.max_wait:.0f} s")
        live = [r for r in self.replicas if r.dead is None]
        if not live:
            raise ServerUnreachableError(self._gone())
        if prefer is not None and self.replicas[prefer].dead is None and self.replicas[prefer].gate.is_open:
            return self.replicas[prefer]
        # Ties go round, so that an idle pool does not send everything to the first replica.
        n = len(self.replicas)
        self._turn = (self._turn + 1) % n
        return min(live, key=lambda r: (not r.gate.is_open, r.in_flight, (r.index - self._turn) % n))

    def _should_leave(self, rep: Replica) -> bool:
        if rep.dead is not None:
            return True
        if rep.gate.is_open:
            return False
        return any(o is not rep and o.dead is None and o.gate.is_open for o in self.replicas)

    def _gone(self) -> str:
        if len(self.replicas) == 1:
            rep = self.replicas[0]
            return f"the model server at {rep.endpoint.base_url} left the run ({rep.dead}); stopped"
        why = "; ".join(f"{r.endpoint.base_url}: {r.dead}" for r in self.replicas)
        return f"no model server replica is left ({why}); stopped (rerun to complete what is missing)"
