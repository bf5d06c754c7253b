"""A test-only stand-in for ``vllm serve Qwen/Qwen3-Omni-30B-A3B-Instruct`` (OpenAI-compatible API).

In-process (pytest)::

    with StandIn(allowed_local_media_path=str(tmp_path), slots=2, latency=0.1) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        server.error_rate = 0.2          # options can be changed while it runs
        server.stats()["completed"]

In its own process (benchmarks, Slurm jobs)::

    python -m tests.standin.server --port 0 --port-file PORT --slots 8 --latency 0.5
    python -m tests.standin.server --uds /tmp/d/vllm.sock     # like vLLM's --uds: --host/--port ignored
    proc, url = run_subprocess(["--slots", "8"], tmp_path)

Endpoints: GET /health, /version, /v1/models, /stats; POST /v1/chat/completions, /stats/reset.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .core import Core, configure_logging, log
from .options import OPTION_NAMES, Options, from_args

__all__ = ["StandIn", "main", "run_subprocess", "stop_subprocess"]

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]
# Options that only matter when binding; ``port`` reads back the bound port instead.
_BIND_ONLY = frozenset({"host", "port", "port_file", "uds"})


class StandIn:
    """The stand-in on its own event loop in a daemon thread, for use from synchronous test code.

    Every option of ``Options`` (the CLI flags in snake_case) is a keyword argument and, except host,
    port, port_file and uds, an attribute that can be changed while the server runs. With ``uds`` (a unix
    socket's path) ``url`` is ``http://localhost``: connect through that socket, e.g.
    ``httpx.Client(transport=httpx.HTTPTransport(uds=path))``.
    """

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - OPTION_NAMES
        if unknown:
            raise TypeError(f"unknown stand-in option(s): {', '.join(sorted(unknown))}")
        opts = Options(**options)
        object.__setattr__(self, "_options", opts)
        object.__setattr__(self, "_core", Core(opts))
        object.__setattr__(self, "_loop", None)
        object.__setattr__(self, "_thread", None)

    # ---- options as attributes ---------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name in OPTION_NAMES:
            return getattr(self._options, name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in OPTION_NAMES or name in _BIND_ONLY:
            object.__setattr__(self, name, value)
            return
        candidate = dataclasses.replace(self._options, **{name: value})
        candidate.validate()
        candidate.effective_api_key()  # a missing key file fails here, in the caller's thread

        def apply() -> None:
            setattr(self._options, name, value)
            self._core.apply(name)

        self._call(apply)

    # ---- lifecycle ---------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._core.port

    @property
    def url(self) -> str:
        """Base URL without ``/v1``, e.g. ``http://127.0.0.1:43211`` (``http://localhost`` with uds)."""
        if self._options.uds:
            return "http://localhost"
        host = self._options.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> StandIn:
        """Start listening; returns once connections are accepted."""
        if self._thread is not None:
            raise RuntimeError("stand-in already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._core.start())
            except BaseException as exc:  # report bind errors to start()'s caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                _cancel_all(loop)
                loop.close()

        thread = threading.Thread(target=run, name=f"standin-{id(self):x}", daemon=True)
        object.__setattr__(self, "_loop", loop)
        object.__setattr__(self, "_thread", thread)
        thread.start()
        ready.wait()
        if failure:
            object.__setattr__(self, "_thread", None)
            object.__setattr__(self, "_loop", None)
            raise failure[0]
        return self

    def pause(self) -> None:
        """Go away: close the listening socket and abort open connections (clients see refusals)."""
        self._run(self._core.pause())

    def resume(self) -> None:
        """Listen again on the same port (or unix socket)."""
        if not self._core.listening:
            self._run(self._core.start())

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._run(self._core.close())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            object.__setattr__(self, "_thread", None)
            object.__setattr__(self, "_loop", None)

    def __enter__(self) -> StandIn:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- stats -------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The same dict GET /stats returns (``errors`` keyed by status as a string)."""
        return self._call(self._core.snapshot)

    def reset_stats(self) -> None:
        self._call(self._core.stats.reset)

    # ---- running things on the loop ----------------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        loop = self._loop
        if loop is None or threading.current_thread() is self._thread:
            return fn()
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(fn())
            except BaseException as exc:
                result.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return result.result(timeout=30)

    def _run(self, coro: Any) -> Any:
        if self._loop is None:
            coro.close()
            raise RuntimeError("stand-in is not running; call start() first")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


# ---- its own process -----------------------------------------------------------------------------


def run_subprocess(
    args: Sequence[str],
    tmp_path: str | os.PathLike[str],
    *,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``python -m tests.standin.server ARGS`` and wait until it listens.

    Returns the process and its base URL (no ``/v1``; ``http://localhost`` when ARGS has ``--uds PATH``:
    connect through that socket). Its stderr goes to a file in ``tmp_path``, quoted in the error if it
    fails to start. Stop it with ``stop_subprocess``.
    """
    tmp = Path(tmp_path)
    tag = uuid.uuid4().hex[:8]
    port_file = tmp / f"standin-{tag}.port"
    stderr_path = tmp / f"standin-{tag}.stderr"
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "tests.standin.server", "--port", "0", "--port-file", str(port_file), *args]
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    uds = _flag(args, "--uds")
    deadline = time.monotonic() + timeout
    while not (_accepts(uds) if uds else port_file.exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_subprocess(proc)
            tail = stderr_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"stand-in did not start (exit {proc.returncode}); stderr:\n{tail}")
        time.sleep(0.02)
    if uds:
        return proc, "http://localhost"
    port = int(port_file.read_text())
    return proc, f"http://{_host_of(args)}:{port}"


def _flag(args: Sequence[str], name: str) -> str | None:
    """The last value of ``--name V`` or ``--name=V`` in ``args``."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def _host_of(args: Sequence[str]) -> str:
    host = _flag(args, "--host") or "127.0.0.1"
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def stop_subprocess(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


async def _serve(options: Options) -> None:
    core = Core(options)
    try:
        port = await core.start()
    except OSError as exc:
        where = options.uds or f"{options.host}:{options.port}"
        log.error("cannot listen on %s: %s", where, exc)
        raise SystemExit(1) from exc
    where = f"unix:{options.uds}" if options.uds else f"http://{options.host}:{port}"
    log.info("listening on %s, serving %s", where, options.served_name)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await core.close()


def main(argv: list[str] | None = None) -> int:
    options = from_args(argv)
    configure_logging()
    asyncio.run(_serve(options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
