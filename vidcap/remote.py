"""Opening a cluster source for `vidcap caption PROFILE:PATH`: SSH, the servers' secrets, the tunnels
(the profile's running tunnel, or one started for this run and stopped after it), the file server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import posixpath
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from vidcap import captioner, dryrun, tunnel
from vidcap.captioner import CaptionJob, EventSink
from vidcap.client import Endpoint
from vidcap.config import Config, Profile
from vidcap.errors import ServerUnreachableError, TransportError, UsageError
from vidcap.records import RunSummary
from vidcap.sources import RemoteSource


@dataclass(frozen=True)
class Secrets:
    api_key: str | None
    files_token: str

    def __repr__(self) -> str:  # never let a secret reach a log or a traceback
        return "Secrets(***)"


@dataclass(frozen=True)
class Replica:
    """One model server of the run: its forward's name, its job's secrets (its own API key), its job."""

    target: str
    secrets_path: str
    job_id: str | None


@dataclass(frozen=True)
class Located:
    """The servers a profile uses: forwards to open, where the secrets are, and the job behind them.
    ``replicas`` lists the model servers (one, or every ready task of an array); the file server is the
    first one's, and ``secrets_path`` its secrets (the files token)."""

    targets: list[tunnel.Target]
    secrets_path: str
    job_id: str | None = None  # what to watch: the job, or the array of replicas
    replicas: tuple[Replica, ...] = ()

    def __post_init__(self) -> None:
        if not self.replicas:  # one server: the "vllm" forward, with the job's own secrets
            object.__setattr__(self, "replicas", (Replica("vllm", self.secrets_path, self.job_id),))


def locate(transport: object, cfg: Config, profile_name: str, job_id: str | None = None) -> Located:
    """The servers of job ``job_id``, else those named under [profiles.NAME.endpoint], else those of the
    profile's newest running vidcap job (found on the cluster, not typed by the user)."""
    from vidcap import jobs
    from vidcap.executors import SlurmExecutor

    profile = cfg.profile(profile_name)
    srv, ep = profile.server, profile.endpoint
    manual = ep.node and ep.vllm_port and ep.files_port and ep.secrets_file
    if job_id is None and manual:
        return Located(
            [
                tunnel.Target("vllm", srv.local_vllm_port, ep.node, ep.vllm_port),  # type: ignore[arg-type]
                tunnel.Target("files", srv.local_files_port, ep.node, ep.files_port),  # type: ignore[arg-type]
            ],
            ep.secrets_file,  # type: ignore[arg-type]
        )
    if job_id is None and (ep.node or ep.vllm_port or ep.files_port or ep.secrets_file):
        raise UsageError(
            "[profiles.NAME.endpoint] is incomplete: set node, vllm_port, files_port and secrets_file, or "
            "remove the section to use the profile's running vidcap job"
        )
    model = jobs.served_name(profile, jobs.choose_preset(cfg, profile))
    found = jobs.discover_replicas(SlurmExecutor(transport), profile, job_id, model)
    first = found[0]
    targets = [
        tunnel.Target("vllm", srv.local_vllm_port, first.node, first.vllm_port),
        tunnel.Target("files", srv.local_files_port, first.node, first.files_port),
    ]
    replicas = [Replica("vllm", first.secrets_path, first.job_id)]
    ports = _replica_ports(profile_name, [(ep.node, ep.vllm_port) for ep in found[1:]])
    for i, (ep, port) in enumerate(zip(found[1:], ports, strict=True), start=1):
        targets.append(tunnel.Target(f"vllm{i}", port, ep.node, ep.vllm_port))
        replicas.append(Replica(f"vllm{i}", ep.secrets_path, ep.job_id))
    # one job: watch it; replicas: watch their array, which ends when the last of them does
    watched = first.job_id.partition("_")[0] if len(found) > 1 else first.job_id
    return Located(targets, first.secrets_path, watched, tuple(replicas))


def _replica_ports(profile_name: str, remotes: list[tuple[str, int]]) -> list[int]:
    """Local ports for the forwards to replicas 2..N: the running tunnel's when it already forwards to
    that server (so that the tunnel is not replaced for nothing), else free ones."""
    state = tunnel.read_state(profile_name) or {}
    known = {
        (t.remote_host, t.remote_port): t.local_port
        for t in map(tunnel.Target.parse, state.get("targets", []))
    }
    from vidcap.transport import free_port

    return [known[remote] if remote in known else free_port("127.0.0.1") for remote in remotes]


def locate_over_ssh(cfg: Config, profile_name: str, job_id: str | None = None) -> Located:
    from vidcap.transport import connect

    with connect(cfg.profile(profile_name).ssh) as transport:
        return locate(transport, cfg, profile_name, job_id)


def read_secrets(transport: object, path: str) -> Secrets:
    """The 0600 secrets file written by the job, read over SSH; its content never leaves this object."""
    done = transport.run(["cat", path], check=False)  # type: ignore[attr-defined]
    if done.returncode != 0:
        raise TransportError(
            f"cannot read the server secrets file {path} on the cluster (exit {done.returncode})"
        )
    try:
        data = json.loads(done.stdout)
        return Secrets(data.get("api_key"), data["files_token"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TransportError(f"the secrets file {path} is not JSON with a files_token") from exc


def remote_abs(transport: object, path: str) -> str:
    """The canonical cluster path (relative = under the login home), as the file server's realpath root
    sees it: a dataset reached through a symlink must still land under that root."""
    done = transport.run(["realpath", "-m", "--", path or "."], check=False)  # type: ignore[attr-defined]
    if done.returncode != 0:
        raise TransportError(
            f"cannot resolve {path!r} on the cluster: {done.stderr.decode(errors='replace')}"
        )
    return done.stdout.decode().strip()


@contextlib.asynccontextmanager
async def open_remote(
    cfg: Config,
    profile_name: str,
    path: str,
    *,
    config_path: Path | None,
    extensions: tuple[str, ...],
    mode: str,
    wait: float = 900.0,
    job_id: str | None = None,
) -> AsyncIterator[tuple[list[Endpoint], RemoteSource]]:
    from vidcap.filesclient import FilesClient
    from vidcap.transport import connect

    profile = cfg.profile(profile_name)
    transport = await asyncio.to_thread(connect, profile.ssh)
    try:
        located = await asyncio.to_thread(locate, transport, cfg, profile_name, job_id)
        if len(located.replicas) > 1 and mode == "http":
            raise UsageError(
                "--media http with several servers: each fetches from its own node's file server, with "
                "its own token; use --media file (the default) or inline"
            )
        secrets = await asyncio.to_thread(read_secrets, transport, located.secrets_path)
        keys = [secrets.api_key]
        for replica in located.replicas[1:]:
            keys.append((await asyncio.to_thread(read_secrets, transport, replica.secrets_path)).api_key)
        absolute = await asyncio.to_thread(remote_abs, transport, path)
    finally:
        await asyncio.to_thread(transport.close)
    wanted = located.targets
    started = tunnel.read_state(profile_name) is None
    state = await asyncio.to_thread(tunnel.up, profile_name, wanted, config_path, replace=True)
    try:
        ports = {t.name: t.local_port for t in map(tunnel.Target.parse, state["targets"])}
        client = FilesClient(f"http://127.0.0.1:{ports['files']}", secrets.files_token)
        root = (await client.health())["root"]
        if absolute != root and not absolute.startswith(root.rstrip("/") + "/"):
            await client.close()
            raise UsageError(f"{path} is not under the file server's root {root}")
        source = RemoteSource(
            client,
            label=f"{profile_name}:{path}",
            root=root,
            subdir=posixpath.relpath(absolute, root) if absolute != root else "",
            node_files_port=wanted[1].remote_port,
            token=secrets.files_token,
            extensions=extensions,
            mode=mode,  # type: ignore[arg-type]
            wait=wait,
            watcher=_job_watcher(profile, located.job_id) if located.job_id else None,
        )
        yield (
            [
                Endpoint(f"http://127.0.0.1:{ports[r.target]}/v1", key, job_id=r.job_id)
                for r, key in zip(located.replicas, keys, strict=True)
            ],
            source,
        )
    finally:
        if started:
            await asyncio.to_thread(tunnel.down, profile_name)


def _job_watcher(
    profile: Profile, job_id: str, interval: float | None = None
) -> Callable[[], Awaitable[None]]:
    """Polls the job's Slurm state during a run; when the job has ended (cancelled, time limit,
    preempted) the run stops at once with that reason instead of waiting out server_wait."""
    from vidcap.executors import SlurmExecutor
    from vidcap.jobstate import JobRecord
    from vidcap.transport import connect

    every = interval if interval is not None else float(os.environ.get("VIDCAP_JOB_WATCH_INTERVAL", "10"))
    rec = JobRecord(job_id, "", "slurm", "", "", "", "", "", "")

    def check(ex: SlurmExecutor | None) -> tuple[SlurmExecutor | None, str | None]:
        try:
            ex = ex or SlurmExecutor(connect(profile.ssh))
            status = ex.statuses([rec])[job_id]
        except Exception:  # the link is down: the tunnel and the gate handle that; look again later
            if ex is not None:
                with contextlib.suppress(Exception):
                    ex.close()
            return None, None
        return ex, status.describe() if status.state.finished else None

    async def watch() -> None:
        ex: SlurmExecutor | None = None
        try:
            while True:
                await asyncio.sleep(every)
                ex, ended = await asyncio.to_thread(check, ex)
                if ended:
                    raise ServerUnreachableError(
                        f"job {job_id} has ended: {ended}; its server is gone. Captions written so far "
                        "are kept: submit a new job ('vidcap job submit', 'vidcap job wait') and rerun this "
                        "command to caption the rest"
                    )
        finally:
            if ex is not None:
                await asyncio.to_thread(ex.close)

    return watch


async def caption(
    cfg: Config,
    job: CaptionJob,
    profile_name: str,
    path: str,
    config_path: Path | None,
    sink: EventSink,
    job_id: str | None = None,
) -> RunSummary:
    async with open_remote(
        cfg,
        profile_name,
        path,
        config_path=config_path,
        extensions=job.extensions,
        mode=job.media,
        wait=job.server_wait,
        job_id=job_id,
    ) as (endpoints, source):
        return await captioner.run(job, endpoints if len(endpoints) > 1 else endpoints[0], sink, source)


async def plan(
    cfg: Config,
    job: CaptionJob,
    profile_name: str,
    path: str,
    config_path: Path | None,
    job_id: str | None = None,
    warn: Callable[[str], None] = lambda m: None,
) -> list[dict]:
    async with open_remote(
        cfg,
        profile_name,
        path,
        config_path=config_path,
        extensions=job.extensions,
        mode=job.media,
        job_id=job_id,
    ) as (endpoints, source):
        return await dryrun.dry_run(job, source, endpoints[0], warn)
