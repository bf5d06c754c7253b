"""`vidcap doctor`: check both ends a caption run needs, one row per thing, each failing row with its fix.

Rows, in order: config, ssh, vidcap, vllm, paths, partition, gpu, jobs, tunnel, server. Each check is
guarded, so one that fails (or crashes) never stops the rest; a row that needs what an earlier one could
not give is "skip" and says why ("no SSH"). A profile without ssh.host is the local executor: the
environment is checked on this machine, ``nvidia-smi`` stands in for sinfo, and the Slurm-only rows are
skipped.

The vidcap and vllm rows run the profile's job.setup lines and job.env as the job script does (``set -e``,
then ``set +u``) and look for what the job needs after them. On a cluster that happens on the login node,
which may differ from the GPU nodes (modules, drivers, mounts): the rows say so. The script reaches the
shell on stdin, not in argv: setup lines and env values may hold tokens, and any user of the login node
reads argv with ``ps``. A job's API key is read only to ask its server /v1/models and is never reported.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from vidcap import __version__, config, jobs, jobscript, tunnel
from vidcap.config import Config, Profile
from vidcap.errors import HostKeyError, VidcapError
from vidcap.slurm_parse import SINFO_FORMAT, Gres, NodeGroup, offers, parse_gres, parse_sinfo
from vidcap.transport import Transport, connect, host_key_name

Status = Literal["ok", "warn", "fail", "skip"]
ROWS = ("config", "ssh", "vidcap", "vllm", "paths", "partition", "gpu", "jobs", "tunnel", "server")
PROBE_TIMEOUT = 180.0  # `import vllm` loads torch: tens of seconds from a cold shared filesystem
SLURM_TIMEOUT = 60.0
_MARK = "@@vidcap-doctor@@"
# Read the whole script first, then run it without stdin: a setup line that reads stdin must not eat it.
_RUN_STDIN = 'script=$(cat); exec </dev/null; eval "$script"'
_LOGIN_NODE = "on the login node; the GPU nodes may differ"
_THIS_MACHINE = "on this machine"


@dataclass(frozen=True)
class Check:
    """One row of the report."""

    name: str
    status: Status
    detail: str
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def failed(checks: Sequence[Check]) -> bool:
    return any(c.status == "fail" for c in checks)


def _ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def _warn(name: str, detail: str, fix: str) -> Check:
    return Check(name, "warn", detail, fix)


def _fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, "fail", detail, fix)


def _states(groups: Sequence[NodeGroup]) -> str:
    counts: dict[str, int] = {}
    for g in groups:
        counts[g.state] = counts.get(g.state, 0) + g.nodes
    return ", ".join(f"{n} {state}" for state, n in counts.items())


# -- the job's environment ------------------------------------------------------------------------------


def probe_script(profile: Profile) -> str:
    """The job script's environment (setup lines, env), then one line per probe:
    ``MARK name exit-status output-on-one-line``."""
    server = profile.server.command[0] if profile.server.command else "vllm"
    probes = {
        "vidcap_path": "command -v vidcap",
        "vidcap": "vidcap --version",
        "guard": "command -v vidcap-guard",
        "python": "command -v python3",
        "vllm": "python3 -c 'import vllm; print(vllm.__version__)'",
        "server": f"command -v {shlex.quote(server)}",
    }
    lines = [
        "set -eo pipefail  # as in the job: a failing setup line ends it there",
        "set +u",
        *profile.job.setup,
        *(f"export {k}={shlex.quote(v)}" for k, v in profile.job.env.items()),
        "set +e",
        "probe() {",
        '    name=$1; shift; out=$("$@" 2>&1); rc=$?',
        "    one=$(printf '%s' \"$out\" | tr '\\n' ' ' | cut -c1-500)",
        f'    printf \'\\n{_MARK} %s %s %s\\n\' "$name" "$rc" "$one"',
        "}",
        *(f"probe {name} {cmd}" for name, cmd in probes.items()),
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Probe:
    rc: int
    out: str


def parse_probes(stdout: bytes) -> dict[str, Probe]:
    found = {}
    for line in stdout.decode(errors="replace").splitlines():
        if line.startswith(_MARK + " "):
            name, _, rest = line[len(_MARK) + 1 :].partition(" ")
            rc, _, out = rest.partition(" ")
            found[name] = Probe(int(rc) if rc.lstrip("-").isdigit() else -1, out.strip())
    return found


def _tail(data: bytes, limit: int = 300) -> str:
    text = " | ".join(line.strip() for line in data.decode(errors="replace").splitlines() if line.strip())
    return text[-limit:] or "(no output)"


def _major_minor(text: str) -> tuple[str, str] | None:
    found = re.findall(r"(\d+)\.(\d+)", text)
    return found[-1] if found else None


def environment_rows(
    profile: Profile, name: str, stdout: bytes, stderr: bytes, rc: int, where: str
) -> list[Check]:
    """The vidcap and vllm rows from what the probe script printed ``where`` it ran."""
    probes = parse_probes(stdout)
    if "vidcap" not in probes:
        what = "failed" if rc else "ended the shell (an exit?) before the checks"
        detail = f"the job.setup lines {what} {where} (exit {rc}): {_tail(stderr or stdout)}"
        fix = f"fix job.setup of [profiles.{name}]: the job runs them under set -e and would stop there too"
        return [_fail("vidcap", detail, fix), _fail("vllm", detail, fix)]
    install = (
        f"install vidcap {__version__} (pip install 'vidcap=={__version__}') in the environment your "
        "job.setup lines activate, or add the line that activates it to job.setup"
    )
    path, version = probes.get("vidcap_path", Probe(1, "")), probes["vidcap"]
    if path.rc != 0:
        row = _fail("vidcap", f"no vidcap on PATH after the job.setup lines ({where})", install)
    elif version.rc != 0:
        row = _fail("vidcap", f"{path.out} --version failed ({where}): {version.out[-300:]}", install)
    elif probes.get("guard", Probe(0, "")).rc != 0:  # the job starts vidcap-guard beside vidcap
        row = _fail(
            "vidcap",
            f"{version.out} at {path.out}, but no vidcap-guard on PATH ({where}): that vidcap is too old for "
            "the job, which puts vidcap-guard in front of vLLM",
            install.replace("install vidcap", "upgrade to vidcap", 1),
        )
    else:
        here = "" if where == _THIS_MACHINE else f"; this machine: vidcap {__version__}"
        detail = f"{version.out} at {path.out} ({where}){here}"
        if _major_minor(version.out) == _major_minor(__version__):
            row = _ok("vidcap", detail)
        else:
            row = _warn(
                "vidcap",
                detail
                + ": major.minor differ, so the job and this CLI may not agree on the files they share",
                f"install the same version on both ends (pip install 'vidcap=={__version__}' in the "
                "environment your job.setup lines activate, or upgrade this one)",
            )
    return [row, _vllm_row(profile, probes, where)]


def _vllm_row(profile: Profile, probes: dict[str, Probe], where: str) -> Check:
    vllm, python, server = (probes.get(k, Probe(1, "")) for k in ("vllm", "python", "server"))
    install = "install vLLM in the environment your job.setup lines activate (e.g. pip install vllm)"
    if profile.server.command:  # the job runs that instead of `vllm serve`: vLLM itself is optional
        if server.rc != 0:
            detail = f"server.command runs {profile.server.command[0]!r}, which is not on PATH ({where})"
            return _fail("vllm", detail, "install it, or fix server.command or job.setup")
        version = f"vLLM {vllm.out}" if vllm.rc == 0 else "vLLM not importable"
        return _ok("vllm", f"server.command runs {server.out}; {version} ({where})")
    if python.rc != 0:
        return _fail("vllm", f"no python3 on PATH after the job.setup lines ({where})", install)
    if vllm.rc != 0:
        why = vllm.out.rsplit("Error:", 1)[-1].strip() or "no output"
        return _fail("vllm", f"{python.out} cannot import vllm ({why}; {where})", install)
    if server.rc != 0:
        detail = f"{python.out} imports vLLM {vllm.out}, but the job runs `vllm serve` and no vllm is on PATH"
        return _fail("vllm", f"{detail} ({where})", install)
    return _ok("vllm", f"vLLM {vllm.out} ({python.out}, {server.out}; {where})")


# -- running the checks ---------------------------------------------------------------------------------


class _Report:
    """The rows found so far, by name; a check that crashes becomes a failing row."""

    def __init__(self) -> None:
        self.rows: dict[str, Check] = {}

    def add(self, *checks: Check) -> None:
        self.rows.update((c.name, c) for c in checks)

    def guard(self, names: Sequence[str], fn: Callable[[], list[Check] | Check]) -> None:
        try:
            found = fn()
        except Exception as exc:  # one broken check must never hide the others
            detail = f"the check itself failed: {type(exc).__name__}: {exc}"
            fix = "an answer vidcap did not expect: run the check by hand, and report it with this row"
            self.add(*(_fail(n, detail, fix) for n in names))
            return
        self.add(*(found if isinstance(found, list) else [found]))

    def skip(self, names: Sequence[str], why: str) -> None:
        self.add(*(Check(n, "skip", why) for n in names if n not in self.rows))

    def result(self) -> list[Check]:
        return [self.rows[n] for n in ROWS if n in self.rows]


def diagnose(config_path: Path | None, profile: str | None) -> list[Check]:
    """Load the config (``config_path``, else the lookup order) and check ``profile`` (None: the default)."""
    try:
        cfg, path = config.load(config_path)
    except VidcapError as exc:
        report = _Report()
        report.add(_fail("config", str(exc), "fix the file ('vidcap config check' says the same)"))
        report.skip(ROWS, "no config")
        return report.result()
    return run_checks(cfg, profile, path)


def run_checks(cfg: Config, profile_name: str | None, config_path: Path | None) -> list[Check]:
    """Every row for ``profile_name`` (None: the default profile); ``config_path`` is the file ``cfg`` was
    loaded from (None: the built-in defaults)."""
    report = _Report()
    name = profile_name or cfg.default_profile
    source = str(config_path) if config_path else "built-in defaults (no config file found)"
    profile = cfg.profiles.get(name)
    if profile is None:
        detail = f"{source}: no profile named {name!r}"
        report.add(_fail("config", detail, f"use -p with one of: {', '.join(sorted(cfg.profiles))}"))
        report.skip(ROWS, "no profile")
        return report.result()
    report.guard(["config"], lambda: _config_row(cfg, profile, name, source))
    (_cluster_rows if profile.ssh.host else _local_rows)(report, cfg, profile, name)
    return report.result()


def _config_row(cfg: Config, profile: Profile, name: str, source: str) -> Check:
    try:
        preset = jobs.choose_preset(cfg, profile)
    except VidcapError as exc:
        return _fail("config", f"{source}: {exc}", f"fix server.model or server.preset of [profiles.{name}]")
    try:
        jobscript.render(
            profile=profile,
            preset=preset,
            job_name=jobs.JOB_NAME_PREFIX + preset.name,
            server_command=profile.server.command,
        )
    except ValueError as exc:
        detail = f"{source}: profile {name!r}: the job script cannot be written: {exc}"
        return _fail("config", detail, f"fix that value in [profiles.{name}]")
    runs = f"Slurm over SSH to {profile.ssh.host}" if profile.ssh.host else "local executor, no ssh.host"
    model = jobs.served_name(profile, preset)
    return _ok("config", f"{source}: profile {name!r} ({runs}); preset {preset.name} serves {model}")


def _wanted_model(cfg: Config, profile: Profile) -> str | None:
    try:
        return jobs.served_name(profile, jobs.choose_preset(cfg, profile))
    except VidcapError:
        return None  # the config row says why


def _jobs_tunnel_server(report: _Report, ex: jobs.Executor, cfg: Config, profile: Profile, name: str) -> None:
    """The rows both executors share: the running jobs, the tunnel to them, and the chosen one's server."""
    found: list[jobs.JobEndpoint] = []

    def jobs_row() -> Check:
        check, endpoints = _jobs_row(ex, profile, name)
        found.extend(endpoints)
        return check

    report.guard(["jobs"], jobs_row)
    chosen = _manual_endpoint(cfg, profile) or next(
        (ep for ep in found if ep.model == _wanted_model(cfg, profile)), found[0] if found else None
    )
    if ex.kind == "local":
        report.add(Check("tunnel", "skip", "local executor: the servers are on this machine"))
    else:
        report.guard(["tunnel"], lambda: _tunnel_row(name, chosen))
    report.guard(["server"], lambda: _server_row(ex, cfg, name, chosen))


def _jobs_row(ex: jobs.Executor, profile: Profile, name: str) -> tuple[Check, list[jobs.JobEndpoint]]:
    found = jobs.discover_all(ex, profile)
    ready = {ep.job_id for ep in found}
    starting = [i for i in ex.running_ids() if i not in ready]
    others = (
        f"; running without an endpoint under {profile.paths.work_dir} (starting, or another profile's): "
        + ", ".join(starting)
        if starting
        else ""
    )
    if found:
        listed = ", ".join(f"{ep.job_id} ({ep.model} on {ep.node})" for ep in found)
        return _ok("jobs", f"{len(found)} running vidcap job(s) for this profile: {listed}{others}"), found
    detail = "no running vidcap job for this profile" + others
    local = " --local" if ex.kind == "local" else ""
    # none is ready, so any job of ours not finished is pending or still starting its server
    waiting = [(rec, status) for rec, status in jobs.list_jobs(ex, name) if not status.state.finished]
    if waiting:
        detail += "; waiting: " + ", ".join(f"{rec.id} {status.describe()}" for rec, status in waiting)
        return _warn("jobs", detail, f"vidcap job wait -p {name}{local} {waiting[-1][0].id}"), []
    return _warn(
        "jobs", detail, f"vidcap job submit -p {name}{local} && vidcap job wait -p {name}{local}"
    ), []


_MANUAL = "[endpoint]"


def _manual_endpoint(cfg: Config, profile: Profile) -> jobs.JobEndpoint | None:
    """The servers named under [profiles.NAME.endpoint], which win over running jobs (as in caption)."""
    ep = profile.endpoint
    if not (ep.node and ep.vllm_port and ep.files_port and ep.secrets_file):
        return None
    model = _wanted_model(cfg, profile) or profile.server.model
    return jobs.JobEndpoint(_MANUAL, ep.node, ep.vllm_port, ep.files_port, model, "", ep.secrets_file)


def _server_row(ex: jobs.Executor, cfg: Config, name: str, ep: jobs.JobEndpoint | None) -> Check:
    if ep is None:
        return Check("server", "skip", "no running job")
    which = f"[profiles.{name}.endpoint]" if ep.job_id == _MANUAL else f"job {ep.job_id}"
    problem = jobs.check_server(ex, ep, jobs.read_api_key(ex, ep))
    if problem is not None:
        local = " --local" if ex.kind == "local" else ""
        fix = f"vidcap job logs -p {name}{local} {ep.job_id}" if ep.job_id != _MANUAL else f"check {which}"
        return _fail("server", f"{which} on {ep.node}:{ep.vllm_port}: {problem}", fix)
    detail = f"{which}: /health 200 and /v1/models lists {ep.model} ({ep.node}:{ep.vllm_port})"
    wanted = _wanted_model(cfg, cfg.profile(name))
    if wanted is not None and ep.model != wanted:
        return _warn(
            "server", f"{detail}, but the profile's model is {wanted}", f"vidcap job submit -p {name}"
        )
    return _ok("server", detail)


def _tunnel_row(name: str, ep: jobs.JobEndpoint | None) -> Check:
    row = tunnel.status([name])[0]
    if row["status"] == "down":
        return _warn("tunnel", f"no tunnel for {name!r}", f"vidcap tunnel up -p {name}")
    targets = {t.name: t for t in map(tunnel.Target.parse, row.get("targets", []))}
    forwards = ", ".join(
        f"{t.name} :{t.local_port} -> {t.remote_host}:{t.remote_port}" for t in targets.values()
    )
    detail = (
        f"{row['status']} since {row.get('since', '?')} (pid {row.get('pid')}, "
        f"{row.get('reconnects', 0)} reconnects): {forwards}"
    )
    restart = f"vidcap tunnel down -p {name} && vidcap tunnel up -p {name}"
    if row["status"] != "up":
        return _warn("tunnel", f"{detail}; last error: {row.get('last_error')}", restart)
    vllm = targets.get("vllm")
    if (
        ep is not None
        and vllm is not None
        and (vllm.remote_host, vllm.remote_port) != (ep.node, ep.vllm_port)
    ):
        detail += f"; but {ep.job_id} serves at {ep.node}:{ep.vllm_port}"
        return _warn("tunnel", detail, f"vidcap tunnel up -p {name} (replaces it)")
    bad = ", ".join(f"{k}: {v}" for k, v in row.get("checks", {}).items() if v != "ok")
    if bad:
        return _warn("tunnel", f"{detail}; not answering: {bad}", restart)
    return _ok("tunnel", f"{detail}; every forward answers")


# -- a cluster ------------------------------------------------------------------------------------------


def _cluster_rows(report: _Report, cfg: Config, profile: Profile, name: str) -> None:
    from vidcap.executors import SlurmExecutor

    check, transport = _ssh_row(profile, name)
    report.add(check)
    if transport is None:
        report.skip(["vidcap", "vllm", "paths", "partition", "gpu", "jobs"], "no SSH")
        report.guard(["tunnel"], lambda: _tunnel_row(name, None))
        report.skip(["server"], "no SSH")
        return
    try:
        report.guard(["vidcap", "vllm"], lambda: _cluster_environment(transport, profile, name))
        report.guard(["paths"], lambda: _paths_row(profile, name, _LOGIN_NODE, transport))
        report.guard(["partition", "gpu"], lambda: _slurm_rows(transport, profile, name))
        _jobs_tunnel_server(report, SlurmExecutor(transport), cfg, profile, name)
    finally:
        transport.close()


def _ssh_row(profile: Profile, name: str) -> tuple[Check, Transport | None]:
    ssh = profile.ssh
    who = f"{ssh.user + '@' if ssh.user else ''}{ssh.host}"
    where = f"{who}:{ssh.port}" + (f" via {ssh.jump}" if ssh.jump else "")
    try:
        transport = connect(ssh)
    except HostKeyError as exc:
        if exc.reason == "changed":
            key = shlex.quote(host_key_name(ssh.host or "", ssh.port))
            then = f"remove the old key (ssh-keygen -R {key} -f {shlex.quote(ssh.known_hosts)}) and try again"
        else:
            then = (
                f"add it: log in once with ssh, or set accept_new_host_key = true under [profiles.{name}.ssh]"
            )
        return _fail("ssh", str(exc), f"check the fingerprint with your admins, then {then}"), None
    except VidcapError as exc:
        fix = (
            f"check ssh.host, ssh.port, ssh.user and ssh.identity_file of [profiles.{name}]; try it by hand: "
            f"ssh -p {ssh.port} {who}"
        )
        return _fail("ssh", f"cannot log in to {where} ({ssh.backend}): {exc}", fix), None
    notes = "".join(f"; {note}" for note in transport.notes)
    return _ok(
        "ssh", f"logged in to {where} ({ssh.backend}); host key matches {ssh.known_hosts}{notes}"
    ), transport


def _cluster_environment(transport: Transport, profile: Profile, name: str) -> list[Check]:
    script = probe_script(profile).encode()
    done = transport.run(["bash", "-c", _RUN_STDIN], input=script, timeout=PROBE_TIMEOUT, check=False)
    return environment_rows(profile, name, done.stdout, done.stderr, done.returncode, _LOGIN_NODE)


# From the home directory, as the job and the remote commands see relative paths. Creates nothing: a
# directory that does not exist yet is fine when its nearest existing parent is writable.
_PATHS_SCRIPT = r"""
cd || exit 90
writable() {
    p=$1
    while [ ! -e "$p" ]; do p=$(dirname -- "$p"); done
    [ -d "$p" ] && [ -w "$p" ] && [ -x "$p" ]
}
if [ -d "$1" ] && [ -r "$1" ] && [ -x "$1" ]; then echo "videos ok"; else echo "videos bad"; fi
if writable "$2"; then echo "captions ok"; else echo "captions bad"; fi
if writable "$3"; then echo "work ok"; else echo "work bad"; fi
"""


def _paths_row(profile: Profile, name: str, where: str, transport: Transport | None) -> Check:
    """videos_dir readable, captions_dir and work_dir writable (or creatable): on-cluster captioning
    writes to captions_dir, every job to work_dir."""
    paths = profile.paths
    try:
        args = [
            jobscript.home_relative(paths.videos_dir, "paths.videos_dir"),
            jobscript.home_relative(paths.captions_dir, "paths.captions_dir"),
            jobscript.home_relative(paths.work_dir, "paths.work_dir"),
        ]
    except ValueError as exc:
        return _fail("paths", str(exc), f"fix [profiles.{name}.paths]")
    argv = ["sh", "-c", _PATHS_SCRIPT, "sh", *args]
    if transport is not None:
        done = transport.run(argv, timeout=SLURM_TIMEOUT, check=False)
        out, rc = done.stdout.decode(errors="replace"), done.returncode
    else:
        local = subprocess.run(argv, capture_output=True, timeout=SLURM_TIMEOUT, cwd=Path.home())
        out, rc = local.stdout.decode(errors="replace"), local.returncode
    found = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    if rc != 0 or len(found) != 3:
        return _fail("paths", f"could not check the paths ({where}, exit {rc})", "check paths.* by hand")
    section = f"[profiles.{name}.paths]"
    if found["videos"] != "ok":
        return _fail(
            "paths",
            f"videos_dir {paths.videos_dir!r} is not a readable directory ({where})",
            f"set paths.videos_dir in {section} to the directory of your videos (absolute, or relative to "
            "the cluster home); the model server reads videos only under it",
        )
    bad = [key for key in ("captions", "work") if found[key] != "ok"]
    if bad:
        names = " and ".join(f"paths.{k}_dir {getattr(paths, k + '_dir')!r}" for k in bad)
        fix = f"point them at your own space in {section}"
        return _fail("paths", f"{names}: not writable ({where})", fix)
    return _ok(
        "paths",
        f"videos_dir {paths.videos_dir}, captions_dir {paths.captions_dir}, work_dir {paths.work_dir} "
        f"usable ({where})",
    )


class _NoSinfo(Exception):
    pass


def _sinfo(transport: Transport, *args: str) -> list[NodeGroup]:
    done = transport.run(["sinfo", "-h", *args, "-o", SINFO_FORMAT], timeout=SLURM_TIMEOUT, check=False)
    if done.returncode == 127:
        raise _NoSinfo(f"no sinfo on the login node's PATH ({_tail(done.stderr)}): is it a Slurm login node?")
    if done.returncode != 0:
        raise _NoSinfo(f"sinfo failed on the login node (exit {done.returncode}): {_tail(done.stderr)}")
    return parse_sinfo(done.stdout.decode(errors="replace"))


def _partitions(groups: Sequence[NodeGroup]) -> str:
    names = dict.fromkeys(g.partition + ("*" if g.default else "") for g in groups)
    return ", ".join(names) or "(none)"


def _slurm_rows(transport: Transport, profile: Profile, name: str) -> list[Check]:
    job = profile.job
    try:
        groups = _sinfo(transport, *(["-p", job.partition] if job.partition else []))
        # sinfo -p with an unknown name prints nothing and exits 0: ask again for the names to suggest
        everything = _sinfo(transport) if job.partition and not groups else groups
    except _NoSinfo as exc:
        fix = "run sinfo by hand on the login node: vidcap submits with sbatch there"
        return [_fail("partition", str(exc), fix), Check("gpu", "skip", "no sinfo")]
    set_it = f"set job.partition in [profiles.{name}] to one of: {_partitions(everything)} (* = the default)"
    partition = job.partition or next((g.partition for g in groups if g.default), None)
    if partition is None:
        detail = "job.partition is not set and the cluster has no default partition"
        return [_fail("partition", detail, set_it), Check("gpu", "skip", "no partition")]
    if not groups:
        detail = f"job.partition {partition!r} is not a partition of this cluster"
        return [_fail("partition", detail, set_it), Check("gpu", "skip", "no partition")]
    mine = [g for g in groups if g.partition == partition]
    chosen = "job.partition" if job.partition else "the cluster's default; job.partition is not set"
    avail = sorted({g.avail for g in mine})
    detail = (
        f"{partition} ({chosen}): {'/'.join(avail)}, {sum(g.nodes for g in mine)} node(s): {_states(mine)}"
    )
    if avail == ["up"]:
        row = _ok("partition", detail)
    else:
        fix = "ask the admins when it is back, or choose another partition (job.partition)"
        row = _warn("partition", f"{detail}: jobs queue but do not start until it is up", fix)
    return [row, _gpu_row(mine, partition, job.gres, name)]


def _gpu_row(groups: Sequence[NodeGroup], partition: str, gres: str | None, name: str) -> Check:
    if not gres:
        detail = "job.gres is empty: the job asks for no GPU, and vLLM needs one"
        return _warn("gpu", detail, f'set job.gres in [profiles.{name}], e.g. "gpu:1" or "gpu:h100:1"')
    try:
        wanted = parse_gres(gres)
    except ValueError as exc:
        return _fail("gpu", f"job.gres {gres!r}: {exc}", 'write it as name[:type][:count], e.g. "gpu:h100:1"')
    able = [g for g in groups if offers(g.gres, wanted)]
    if not able:
        offered = ", ".join(
            f"{','.join(map(str, g.gres)) or 'no gres'} on {g.nodes} {g.state}" for g in groups
        )
        like = next(
            (str(Gres(x.name, x.type, 1)) for g in groups for x in g.gres if x.name == wanted[0].name), None
        )
        fix = f"set job.gres to what {partition} offers" + (f" (e.g. {like})" if like else "")
        return _fail(
            "gpu",
            f"no node in {partition} offers {gres} (offered: {offered})",
            fix + ", or another partition",
        )
    usable = [g for g in able if g.usable]
    if not usable:
        where = "; ".join(f"{g.nodelist} ({g.nodes} {g.state})" for g in able)
        return _warn(
            "gpu",
            f"{gres} is offered in {partition} only by nodes that take no jobs now: {where}",
            f"a job will pend until one is back: 'sinfo -R -p {partition}' says why; ask the admins, or "
            "choose another partition",
        )
    count = sum(g.nodes for g in usable)
    return _ok("gpu", f"{gres}: {count} node(s) in {partition} can run it now ({_states(usable)})")


# -- the local executor ---------------------------------------------------------------------------------


def _local_rows(report: _Report, cfg: Config, profile: Profile, name: str) -> None:
    from vidcap.executors import LocalExecutor

    report.add(Check("ssh", "skip", "local executor (no ssh.host)"))
    report.guard(["vidcap", "vllm"], lambda: _local_environment(profile, name))
    report.guard(["paths"], lambda: _paths_row(profile, name, _THIS_MACHINE, None))
    report.add(Check("partition", "skip", "local executor: no Slurm"))
    report.guard(["gpu"], lambda: _nvidia_smi(name))
    _jobs_tunnel_server(report, LocalExecutor(), cfg, profile, name)


def _local_environment(profile: Profile, name: str) -> list[Check]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # as the local executor
    script = probe_script(profile).encode()
    try:
        done = subprocess.run(
            ["bash", "-c", _RUN_STDIN],
            input=script,
            capture_output=True,
            timeout=PROBE_TIMEOUT,
            cwd=Path.home(),
            env=env,
        )
    except subprocess.TimeoutExpired:
        detail = f"the job.setup lines and the checks after them took over {PROBE_TIMEOUT:.0f} s here"
        fix = f"run the job.setup lines of [profiles.{name}] by hand to see which one hangs"
        return [_fail("vidcap", detail, fix), _fail("vllm", detail, fix)]
    return environment_rows(profile, name, done.stdout, done.stderr, done.returncode, _THIS_MACHINE)


def _nvidia_smi(name: str) -> Check:
    fix = (
        "run the local executor on a machine with an NVIDIA GPU and its driver, or set ssh.host in "
        f"[profiles.{name}.ssh] to run the job on a cluster"
    )
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return _fail("gpu", "no nvidia-smi on this machine, and vLLM needs an NVIDIA GPU here", fix)
    try:
        argv = [exe, "--query-gpu=name,memory.total", "--format=csv,noheader"]
        done = subprocess.run(argv, capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return _fail("gpu", "nvidia-smi did not answer in 30 s", fix)
    gpus = [line.strip() for line in done.stdout.decode(errors="replace").splitlines() if line.strip()]
    if done.returncode != 0 or not gpus:
        return _fail(
            "gpu", f"nvidia-smi failed (exit {done.returncode}): {_tail(done.stderr or done.stdout)}", fix
        )
    return _ok("gpu", f"{len(gpus)} GPU(s): " + "; ".join(gpus))
