"""Opening a cluster source for `vidcap caption PROFILE:PATH`: SSH, the servers' secrets, the tunnels
(the profile's running tunnel, or one started for this run and stopped after it), the file server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import posixpath
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from vidcap import captioner, dryrun, tunnel
from vidcap.captioner import CaptionJob, EventSink
from vidcap.client import Endpoint
from vidcap.config import Config, Profile
from vidcap.errors import TransportError, UsageError
from vidcap.records import RunSummary
from vidcap.sources import RemoteSource


@dataclass(frozen=True)
class Secrets:
    api_key: str | None
    files_token: str

    def __repr__(self) -> str:  # never let a secret reach a log or a traceback
        return "Secrets(***)"


def targets(profile: Profile) -> list[tunnel.Target]:
    ep = profile.endpoint
    if not (ep.node and ep.vllm_port and ep.files_port and ep.secrets_file):
        raise UsageError(
            "this profile names no server endpoint: set node, vllm_port, files_port and secrets_file under "
            "[profiles.NAME.endpoint] (vidcap's own jobs will fill this in by themselves)"
        )
    srv = profile.server
    return [
        tunnel.Target("vllm", srv.local_vllm_port, ep.node, ep.vllm_port),
        tunnel.Target("files", srv.local_files_port, ep.node, ep.files_port),
    ]


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
) -> AsyncIterator[tuple[Endpoint, RemoteSource]]:
    from vidcap.filesclient import FilesClient
    from vidcap.transport import connect

    profile = cfg.profile(profile_name)
    wanted = targets(profile)
    transport = await asyncio.to_thread(connect, profile.ssh)
    try:
        secrets = await asyncio.to_thread(read_secrets, transport, profile.endpoint.secrets_file or "")
        absolute = await asyncio.to_thread(remote_abs, transport, path)
    finally:
        await asyncio.to_thread(transport.close)
    started = tunnel.read_state(profile_name) is None
    state = await asyncio.to_thread(tunnel.up, profile_name, wanted, config_path)
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
        )
        yield Endpoint(f"http://127.0.0.1:{ports['vllm']}/v1", secrets.api_key), source
    finally:
        if started:
            await asyncio.to_thread(tunnel.down, profile_name)


async def caption(
    cfg: Config, job: CaptionJob, profile_name: str, path: str, config_path: Path | None, sink: EventSink
) -> RunSummary:
    async with open_remote(
        cfg,
        profile_name,
        path,
        config_path=config_path,
        extensions=job.extensions,
        mode=job.media,
        wait=job.server_wait,
    ) as (endpoint, source):
        return await captioner.run(job, endpoint, sink, source)


async def plan(
    cfg: Config, job: CaptionJob, profile_name: str, path: str, config_path: Path | None
) -> list[dict]:
    async with open_remote(
        cfg, profile_name, path, config_path=config_path, extensions=job.extensions, mode=job.media
    ) as (_, source):
        return await dryrun.dry_run(job, source)
