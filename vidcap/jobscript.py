"""The job script: model presets (data in presets.toml) and the pure rendering of slurm/vllm.sbatch.

``render`` turns a profile and a preset into the text of one batch script; it does no I/O besides reading
the template shipped in the package, and the same inputs give the same bytes (checked against
tests/golden/vllm.sbatch). Every value reaches the script quoted: ``shlex.quote`` for the shell, and
Slurm's own quoting for the ``#SBATCH`` lines, which sbatch tokenizes itself (src/sbatch/opt.c
_get_argument: whitespace ends a word unless quoted, a backslash escapes the next character but does not
protect a space, an unquoted ``#`` starts a comment, and in old versions even a quoted one; a line
containing "hetjob" or "packjob" splits the job; a backslash anywhere in an output path turns off Slurm's
%-patterns, src/slurmd/slurmstepd/fname.c), so values that cannot be represented there (control
characters, those words, a backslash in work_dir) are refused with a ValueError naming the field.

Paths: a relative path (or one starting with ``~/``) is relative to the cluster home. In the script it
becomes ``"$HOME"/...``; in the ``#SBATCH`` lines it stays relative, which Slurm resolves against the
submit directory, so the submit runs from ``$HOME`` (and creates ``<work_dir>/jobs`` first: Slurm does
not create a log file's directory). One job's files live in ``job_dir()``, its log in ``log_path()``.

Job ids: a plain job is ``$SLURM_JOB_ID``; an array task is ``<array job id>_<task id>``, the name squeue
and scancel use, so each task has its own directory, endpoint and log (``%A_%a``).

vLLM flags, as checked against vLLM's sources and docs (not guessed):
  - ``--limit-mm-per-prompt '{"image":0,"video":1,"audio":1}'``: MultiModalConfig.limit_per_prompt, a dict
    given as JSON ("to allow up to 16 images and 2 videos per prompt: {"image": 16, "video": 2}",
    docs.vllm.ai/en/v0.11.0/api/vllm/config/multimodal.html); JSON CLI values are one argv word
    (`vllm serve` docs, "JSON CLI arguments").
  - ``--mm-processor-cache-gb``: MultiModalConfig.mm_processor_cache_gb, float, default 4; 0 disables it.
  - ``--allowed-local-media-path``: MediaConnector refuses a path that does not exist or is not a
    directory (vllm/multimodal/utils.py), so the script resolves and checks the videos dir first.
  - API key: ``tokens = args.api_key or [envs.VLLM_API_KEY]`` in vllm/entrypoints/openai/api_server.py
    (build_app): the VLLM_API_KEY environment variable works like ``--api-key``, which would show the
    key in ps. docs/usage/security.md: the key guards /v1, /v2 and /inference only; /health,
    /invocations, /tokenize, /pause, ... stay open to anyone who can reach the server. Hence vLLM listens
    on no TCP port at all, where any other user with a job on the node could reach it (127.0.0.1
    included), but on a unix socket (below), and vidcap's guard (vidcap/guard.py), bound on the node's
    address, passes on only GET /health, GET /version and /v1/...; endpoint.json's vllm_port is the
    guard's port. The guard runs from the same installation as the file server: ``guard_argv`` derives
    its command from ``vidcap_command``.
  - ``--uds PATH``: "Unix domain socket path. If set, host and port arguments are ignored"
    (vllm/entrypoints/openai/cli_args.py). api_server.py create_server_unix_socket binds the path plainly
    before the engine is set up: an existing file there fails with EADDRINUSE, and nothing removes the
    socket file when vLLM exits. So the template makes a new private directory for each run (mktemp -d,
    0700, node-local under $TMPDIR: a socket's path has at most 107 bytes, and job dirs are often on NFS
    or Lustre) and removes it on exit; the guard reaches vLLM there (``--upstream unix:PATH``).
"""

from __future__ import annotations

import functools
import posixpath
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vidcap.config import Profile
from vidcap.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_PRESET = "qwen3-omni"
JOBS_SUBDIR = "jobs"
ENDPOINT_FILE = "endpoint.json"
SECRETS_FILE = "secrets.json"
TOKEN_FILE = "files.token"
FILES_PORT_FILE = "files.port"
GUARD_PORT_FILE = "guard.port"

# Flags the script sets itself; in vllm_args they would be ignored (ours come last) or leak the key.
_MANAGED_FLAGS = {
    "--api-key": "the API key is generated per job and passed in the environment (VLLM_API_KEY)",
    "--host": "the server listens on a private unix socket behind vidcap's guard, on no TCP address",
    "--port": "the server listens on a private unix socket, not a port; the guard's port is picked free",
    "--uds": "the job makes the socket in a private node-local directory, for vidcap's guard to reach",
    "--allowed-local-media-path": "it is the profile's paths.videos_dir",
}
# Variables the script itself uses; job.env must not overwrite them.
_RESERVED_ENV = frozenset(
    {
        *("JOB_KEY", "WORK_DIR", "JOB_DIR", "VIDEOS_SRC", "VIDEOS_DIR", "SERVED_NAME", "SERVER", "VIDCAP"),
        *("READY_TIMEOUT", "READY_DEADLINE", "SERVER_PID", "FILES_PID", "POLL_PID", "SOCK_DIR"),
        *("VLLM_SOCK", "FILES_PORT", "VLLM_API_KEY", "VIDCAP_LOCAL_JOB_ID", "rc", "status"),
        *("GUARD", "GUARD_PID", "GUARD_PORT", "CAPTION_PID", "CAPTION_SRC", "CAPTION_OUT", "CAPTION_DIR"),
        *("CAPTION", "VIDCAP_API_KEY", "VIDCAP_JOB_KEY"),
    }
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ARRAY = re.compile(r"[0-9][0-9,:%-]*")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# Values made only of these characters are written as they are on an #SBATCH line; others are quoted.
_SLURM_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./:=+,@%-")


class Preset(BaseModel):
    """One model the job can serve: what vLLM is started with, and what the model accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The preset's name (its table name in presets.toml).")
    model: str = Field(min_length=1, description="Hugging Face id or path given to `vllm serve`.")
    audio: bool = Field(False, description="The model accepts an audio item next to the video.")
    max_model_len: int = Field(gt=0, description="Context length the preset serves.")
    vllm_args: tuple[str, ...] = Field((), description="Extra `vllm serve` argv words, in order.")
    description: str = ""

    @field_validator("vllm_args")
    @classmethod
    def _args_ok(cls, args: tuple[str, ...]) -> tuple[str, ...]:
        check_vllm_args(args, "vllm_args")
        return args

    @model_validator(mode="after")
    def _context_matches(self) -> Preset:
        given = flag_value(self.vllm_args, "--max-model-len")
        if given is not None and given != str(self.max_model_len):
            raise ValueError(
                f"vllm_args has --max-model-len {given} but max_model_len is {self.max_model_len}"
            )
        return self


def _flag_name(word: str) -> str:
    """'--max_model_len=5' -> '--max-model-len' (vLLM's parser accepts underscores for dashes)."""
    name = word.split("=", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The last value given to ``flag`` in argv words (``--flag v`` or ``--flag=v``), else None."""
    found = None
    for i, word in enumerate(args):
        if _flag_name(word) != flag:
            continue
        if "=" in word:
            found = word.split("=", 1)[1]
        elif i + 1 < len(args):
            found = args[i + 1]
    return found


def check_vllm_args(args: Sequence[str], where: str) -> None:
    """Refuse words the shell cannot carry and flags the script owns; ValueError names the flag."""
    for word in args:
        if not isinstance(word, str):
            raise ValueError(f"{where}: every item must be a string, got {word!r}")
        if "\0" in word:
            raise ValueError(f"{where}: {word!r} contains a NUL character")
        reason = _MANAGED_FLAGS.get(_flag_name(word))
        if reason:
            raise ValueError(f"{where}: remove {_flag_name(word)}: vidcap sets it ({reason})")


# -- presets ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _shipped_presets() -> dict[str, dict[str, Any]]:
    text = resources.files("vidcap").joinpath("presets.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def load_presets(extra: Mapping[str, Mapping] | None = None) -> dict[str, Preset]:
    """The shipped presets, with ``extra`` (the user's, from the config) merged in by name: a field given
    there replaces the shipped one, a new name adds a preset. Raises ConfigError naming the bad field."""
    merged: dict[str, dict[str, Any]] = {name: dict(data) for name, data in _shipped_presets().items()}
    for name, data in (extra or {}).items():
        if not isinstance(data, Mapping):
            raise ConfigError(f"presets.{name}: expected a table of preset fields, got {data!r}")
        merged[name] = {**merged.get(name, {}), **data}
    presets: dict[str, Preset] = {}
    for name, data in merged.items():
        if "name" in data:
            raise ConfigError(f"presets.{name}: unknown key 'name' (the table's name is the preset's name)")
        try:
            presets[name] = Preset.model_validate({**data, "name": name})
        except ValidationError as exc:
            raise ConfigError(_explain(name, exc)) from exc
    return presets


def _explain(name: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        where = f"presets.{name}" + (f".{loc}" if loc else "")
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(set(Preset.model_fields) - {"name"}))
            parts.append(f"{where}: unknown key (known: {known})")
        else:
            parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def find_preset(presets: Mapping[str, Preset], key: str) -> Preset | None:
    """The preset named ``key``, else the first one serving model ``key``, else None."""
    if key in presets:
        return presets[key]
    return next((p for p in presets.values() if p.model == key), None)


# -- paths -------------------------------------------------------------------------------------------------


def home_relative(path: str, field: str = "path") -> str:
    """A cluster path as absolute or relative to $HOME: '~' -> '.', '~/a' -> 'a'. '~user' is refused."""
    if not path:
        raise ValueError(f"{field}: empty path")
    if "\0" in path:
        raise ValueError(f"{field}: {path!r} contains a NUL character")
    if path == "~":
        return "."
    if path.startswith("~/"):
        return path[2:].lstrip("/") or "."
    if path.startswith("~"):
        raise ValueError(f"{field}: {path!r}: write ~user paths out in full (absolute)")
    return path


def _under_jobs(work_dir: str, name: str) -> str:
    base = home_relative(work_dir, "work_dir").rstrip("/") or "/"
    return f"{JOBS_SUBDIR}/{name}" if base == "." else posixpath.join(base, JOBS_SUBDIR, name)


def job_dir(work_dir: str, job_key: str) -> str:
    """The job's directory (endpoint.json, secrets.json, ...), absolute or relative to $HOME."""
    return _under_jobs(work_dir, job_key)


def log_path(work_dir: str, job_key: str) -> str:
    """The job's log (stdout and stderr), beside its directory: Slurm cannot create a directory for it."""
    return _under_jobs(work_dir, f"{job_key}.log")


def shell_path(path: str, field: str) -> str:
    """A cluster path as a shell word: absolute, or ``"$HOME"/...``."""
    rel = home_relative(path, field)
    if rel.startswith("/"):
        return shlex.quote(rel)
    return '"$HOME"' if rel == "." else '"$HOME"/' + shlex.quote(rel)


# -- #SBATCH lines -----------------------------------------------------------------------------------------


def _slurm_value(flag: str, value: str) -> str:
    """``value`` written so that sbatch's #SBATCH tokenizer reads it back unchanged."""
    if value == "":
        raise ValueError(f"#SBATCH {flag}: empty value")
    bad = next((ch for ch in value if ord(ch) < 32 or ord(ch) == 127), None)
    if bad is not None:
        raise ValueError(
            f"#SBATCH {flag}: {value!r} contains the control character {bad!r}, which an #SBATCH line "
            "cannot carry"
        )
    lowered = value.lower()
    if "hetjob" in lowered or "packjob" in lowered:
        raise ValueError(
            f"#SBATCH {flag}: {value!r}: sbatch reads 'hetjob'/'packjob' on a line as a job split"
        )
    if all(ch in _SLURM_PLAIN for ch in value):
        return value
    # sbatch keeps spaces only inside quotes (a backslash does not protect one), and old versions end the
    # line at a '#' even inside quotes: so double quotes around the value, a backslash before \ " #.
    return '"' + "".join("\\" + ch if ch in '\\"#' else ch for ch in value) + '"'


def _slurm_log_path(work_dir: str, array: bool) -> str:
    path = _under_jobs(work_dir, "%A_%a.log" if array else "%j.log")
    if "\\" in path:
        raise ValueError(f"paths.work_dir: {work_dir!r}: Slurm ignores %j in an output path with a backslash")
    head, _, pattern = path.rpartition("/")
    return f"{head.replace('%', '%%')}/{pattern}"


def sbatch_lines(profile: Profile, job_name: str, array: str | None = None) -> list[str]:
    """The ``#SBATCH`` lines, sorted by flag."""
    job = profile.job
    flags: dict[str, str] = {
        "--cpus-per-task": str(job.cpus),
        "--job-name": job_name,
        "--mem": job.mem,
        "--time": job.time,
    }
    if job.partition:
        flags["--partition"] = job.partition
    if job.gres:
        flags["--gres"] = job.gres
    log = _slurm_log_path(profile.paths.work_dir, array is not None)
    flags["--output"] = flags["--error"] = log
    if array is not None:
        if not _ARRAY.fullmatch(array):
            raise ValueError(f"#SBATCH --array: {array!r} is not an index list like 0-9, 1,3,5 or 0-99%4")
        flags["--array"] = array
    return [f"#SBATCH {flag}={_slurm_value(flag, value)}" for flag, value in sorted(flags.items())]


# -- the script --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def template() -> str:
    """The text of slurm/vllm.sbatch as shipped in the package."""
    return resources.files("vidcap").joinpath("slurm", "vllm.sbatch").read_text(encoding="utf-8")


def server_argv(profile: Profile, preset: Preset, server_command: Sequence[str] | None = None) -> list[str]:
    """The model server's argv before the flags the script adds (--served-model-name,
    --allowed-local-media-path, --uds): ``vllm serve MODEL`` + the preset's args (or ``server_command``
    instead of those), then the profile's server.vllm_args."""
    check_vllm_args(profile.server.vllm_args, "server.vllm_args")
    if server_command is None:
        head = ["vllm", "serve", preset.model, *preset.vllm_args]
    else:
        head = list(server_command)
        if not head:
            raise ValueError("server_command: empty")
        check_vllm_args(head, "server_command")
    return [*head, *profile.server.vllm_args]


def guard_argv(vidcap_command: Sequence[str]) -> list[str]:
    """The guard's command, from the same installation as ``vidcap_command``: ``[..., "vidcap"]`` (a path
    or not) -> ``[..., "vidcap-guard"]`` (the console script beside it), ``[python, "-m", "vidcap.cli"]``
    -> ``[python, "-m", "vidcap.guard"]``. ValueError for a command of another shape."""
    words = list(vidcap_command)
    last = words[-1] if words else ""
    if last == "vidcap.cli" and words[-2:-1] == ["-m"]:
        return [*words[:-1], "vidcap.guard"]
    head, slash, name = last.rpartition("/")
    if name == "vidcap":
        return [*words[:-1], f"{head}{slash}vidcap-guard"]
    raise ValueError(
        f"vidcap_command: {shlex.join(words)!r} must end with 'vidcap' or '-m vidcap.cli', so that the "
        "guard (vidcap-guard, python -m vidcap.guard) runs from the same installation"
    )


def _argv_lines(words: Sequence[str], head: int) -> str:
    """Words of a bash array, one option (with its values) per line, the first ``head`` words together."""
    lines = [[shlex.quote(w) for w in words[:head]]]
    for word in words[head:]:
        if word.startswith("-") or not lines[-1]:
            lines.append([])
        lines[-1].append(shlex.quote(word))
    return "\n".join("    " + " ".join(line) for line in lines if line)


def _env_lines(env: Mapping[str, str]) -> str:
    lines = []
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"job.env: {name!r} is not a shell variable name (letters, digits, _)")
        if name in _RESERVED_ENV:
            raise ValueError(f"job.env: {name} is set by the job script itself; choose another name")
        if "\0" in value:
            raise ValueError(f"job.env.{name}: the value contains a NUL character")
        lines.append(f"export {name}={shlex.quote(value)}")
    return "\n".join(lines) or "# (no env)"


def render(
    *,
    profile: Profile,
    preset: Preset,
    job_name: str,
    server_command: list[str] | None = None,
    vidcap_command: list[str] | None = None,
    array: str | None = None,
    extra_script: str = "",
) -> str:
    """The batch script that serves ``preset`` with ``profile``'s job settings. Pure: same inputs, same text.

    ``server_command`` replaces ``vllm serve MODEL <preset args>`` (tests pass the stand-in); the profile's
    server.vllm_args and the script's own flags (--served-model-name, --allowed-local-media-path <videos
    dir>, --uds <socket>) follow it either way. ``vidcap_command`` runs the file server (default
    ``vidcap``, from the PATH the setup lines make), and the guard is run from the same place
    (``guard_argv``). ``array`` is an #SBATCH --array index list.
    ``extra_script`` is shell run once the endpoint is ready (JOB_DIR, GUARD_PORT (the guard, what
    endpoint.json names: reach the model server at http://127.0.0.1:$GUARD_PORT/v1), FILES_PORT,
    SERVED_NAME and VIDEOS_DIR are set; VLLM_SOCK, the model server's own unix socket in the private
    SOCK_DIR, is for debugging; secrets are in $JOB_DIR/secrets.json); the job then serves until one of the
    servers ends, so a snippet that should end the job calls ``exit`` (the servers are stopped on exit).
    Raises ValueError for a value that cannot be written into the script.
    """
    vidcap = list(vidcap_command) if vidcap_command is not None else ["vidcap"]
    if not vidcap or any("\0" in w for w in vidcap):
        raise ValueError("vidcap_command: must be a non-empty list of words without NUL characters")
    guard = guard_argv(vidcap)
    for i, line in enumerate(profile.job.setup):
        if "\0" in line:
            raise ValueError(f"job.setup[{i}]: contains a NUL character")
    served = profile.server.served_name or preset.model
    if not served or "\0" in served:
        raise ValueError("server.served_name: must be a non-empty name without NUL characters")
    if "\0" in extra_script:
        raise ValueError("extra_script: contains a NUL character")
    head = len(server_command) if server_command is not None else 3
    values = {
        "sbatch": "\n".join(sbatch_lines(profile, job_name, array)),
        "work_dir": shell_path(profile.paths.work_dir, "paths.work_dir"),
        "videos_dir": shell_path(profile.paths.videos_dir, "paths.videos_dir"),
        "setup": "\n".join(profile.job.setup) or "# (no setup lines)",
        "env": _env_lines(profile.job.env),
        "served_name": shlex.quote(served),
        "server": _argv_lines(server_argv(profile, preset, server_command), head),
        "vidcap": " ".join(shlex.quote(w) for w in vidcap),
        "guard": " ".join(shlex.quote(w) for w in guard),
        "extra_script": extra_script.strip("\n") or "# (no extra script)",
    }
    text = template()
    missing = set(_PLACEHOLDER.findall(text)) - set(values)
    if missing:  # pragma: no cover - the template and this function change together
        raise RuntimeError(f"template placeholders without a value: {sorted(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
