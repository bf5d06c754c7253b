"""The job script: presets, the pure renderer (golden file), bash -n, and rendered scripts really run by
bash against a tiny server that records the argv and environment it was started with.

Regenerate the golden file after an intended change: VIDCAP_UPDATE_GOLDEN=1 pytest tests/test_jobscript.py
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vidcap import jobscript
from vidcap.config import Profile, parse
from vidcap.errors import ConfigError
from vidcap.jobscript import Preset, load_presets, render

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden" / "vllm.sbatch"
HOSTILE = "a b 'c' \"d\" $(touch pwned) `touch pwned` ; touch pwned \\ & | > < * ? ~ % # end"
HOSTILE_JSON = '{"video": 1, "audio": 1, "note": "it\'s {braced} $(touch pwned) `touch pwned` \\"q\\""}'


def golden_profile() -> Profile:
    """A profile like config.example.toml's: what most users will render."""
    data = {
        "profiles": {
            "cluster": {
                "paths": {"videos_dir": "datasets/videos", "work_dir": "vidcap"},
                "job": {
                    "partition": "gpu",
                    "gres": "gpu:h100:1",
                    "time": "04:00:00",
                    "cpus": 16,
                    "mem": "128G",
                    "setup": ["module load cuda/12.4", "source ~/venvs/vllm/bin/activate"],
                    "env": {"HF_HOME": "/scratch/me/hf"},
                },
            }
        }
    }
    return parse(data).profile("cluster")


def golden_text() -> str:
    preset = load_presets()[jobscript.DEFAULT_PRESET]
    return render(profile=golden_profile(), preset=preset, job_name="vidcap-qwen3-omni")


def bash_n(text: str, tmp_path: Path) -> None:
    script = tmp_path / "check.sbatch"
    script.write_text(text, encoding="utf-8")
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- golden file and syntax ---------------------------------------------------------------------------------


def test_golden_file() -> None:
    text = golden_text()
    if os.environ.get("VIDCAP_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    assert GOLDEN.is_file(), "no golden file yet: run with VIDCAP_UPDATE_GOLDEN=1"
    assert text == GOLDEN.read_text(encoding="utf-8"), (
        "rendering changed: if intended, VIDCAP_UPDATE_GOLDEN=1"
    )


def test_render_is_pure() -> None:
    assert golden_text() == golden_text()


def test_golden_passes_bash_n(tmp_path: Path) -> None:
    bash_n(golden_text(), tmp_path)


def test_every_variant_passes_bash_n(tmp_path: Path) -> None:
    bare = Profile()  # no partition, no setup lines, no env
    presets = load_presets()
    for preset in presets.values():
        bash_n(render(profile=bare, preset=preset, job_name="j"), tmp_path)
    hostile, _ = hostile_profile(tmp_path)
    bash_n(
        render(
            profile=hostile,
            preset=presets["qwen3-omni"],
            job_name=HOSTILE,
            array="0-9%2",
            server_command=["python3", "-m", "tests.standin.server", "--latency", "0.1"],
            extra_script='echo "extra: $JOB_DIR"\n',
        ),
        tmp_path,
    )


def test_the_template_is_shipped_in_the_package() -> None:
    assert "slurm/*.sbatch" in (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert (REPO / "slurm" / "vllm.sbatch").resolve() == (REPO / "vidcap" / "slurm" / "vllm.sbatch").resolve()
    assert jobscript.template().startswith("#!/bin/bash\n{{sbatch}}\n")


# -- #SBATCH lines ------------------------------------------------------------------------------------------


def slurm_tokens(line: str) -> list[str]:
    """The words sbatch reads from an #SBATCH line: a port of _get_argument (src/sbatch/opt.c)."""
    assert line.startswith("#SBATCH")
    rest, i, words = line[len("#SBATCH") :], 0, []
    spaces = " \t\n\v\f\r"
    while True:
        while i < len(rest) and rest[i] in spaces:
            i += 1
        if i >= len(rest) or rest[i] == "#":
            return words
        word: list[str] = []
        quote, escape = "", False
        while i < len(rest) and (quote or rest[i] not in spaces):
            ch = rest[i]
            i += 1
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
                continue
            elif quote:
                if ch == quote:
                    quote = ""
                    continue
            elif ch in "\"'":
                quote = ch
                continue
            elif ch == "#":
                i = len(rest)
                break
            word.append(ch)
        assert not quote, f"unmatched quote in {line!r}"
        words.append("".join(word))


def slurm_tokens_old(line: str) -> list[str]:
    """The same for sbatch before single quotes were understood: '"' toggles quoting, a backslash escapes
    the next character, and '#' ends the line even inside quotes."""
    assert line.startswith("#SBATCH")
    rest, i, words = line[len("#SBATCH") :], 0, []
    spaces = " \t\n\v\f\r"
    while True:
        while i < len(rest) and rest[i] in spaces:
            i += 1
        if i >= len(rest):
            return words
        word: list[str] = []
        quoted, escape = False, False
        while i < len(rest) and (quoted or rest[i] not in spaces):
            ch = rest[i]
            i += 1
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
                continue
            elif ch == '"':
                quoted = not quoted
                continue
            elif ch == "#":
                i = len(rest)
                break
            word.append(ch)
        if not word:
            return words
        words.append("".join(word))


def slurm_filename(pattern: str, job_id: str, array_job: str = "", task: str = "") -> str:
    """Slurm's batch output file name (src/slurmd/slurmstepd/fname.c) for %%, %j, %A and %a."""
    assert "\\" not in pattern, "a backslash turns the patterns off"
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "%" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            out.append({"%": "%", "j": job_id, "A": array_job or job_id, "a": task}.get(nxt, "%" + nxt))
            i += 2
        else:
            out.append(pattern[i])
            i += 1
    return "".join(out)


@pytest.mark.parametrize("tokens", [slurm_tokens, slurm_tokens_old])
def test_sbatch_lines_are_sorted_and_read_back_exactly(tmp_path: Path, tokens) -> None:
    profile, work = hostile_profile(tmp_path)
    profile.job.partition = "gpu 'a' \"b\" #c"
    job_name = "name with spaces 'q' \"dq\" # not a comment $(x) \\ é"
    lines = jobscript.sbatch_lines(profile, job_name)
    flags = [line.split("=", 1)[0] for line in lines]
    assert flags == sorted(flags)
    read = dict(word.split("=", 1) for line in lines for word in tokens(line))
    assert len(read) == len(lines)
    assert read["--job-name"] == job_name
    assert read["--partition"] == profile.job.partition
    assert read["--gres"] == "gpu:1" and read["--cpus-per-task"] == "16"
    assert read["--output"] == read["--error"]
    expanded = slurm_filename(read["--output"], "4242")
    assert expanded == jobscript.log_path(str(work), "4242")
    assert "%j" in str(work)  # the work dir's own %j stays literal


def test_array_jobs_get_one_dir_and_log_per_task(tmp_path: Path) -> None:
    profile, work = hostile_profile(tmp_path)
    lines = jobscript.sbatch_lines(profile, "j", array="0-3%2")
    read = dict(word.split("=", 1) for line in lines for word in slurm_tokens(line))
    assert read["--array"] == "0-3%2"
    assert slurm_filename(read["--output"], "77", "70", "3") == jobscript.log_path(str(work), "70_3")
    text = render(profile=profile, preset=load_presets()["qwen3-vl-8b"], job_name="j", array="0-3%2")
    assert 'JOB_KEY="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in text


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("job_name", "two\nlines", "control character"),
        ("job_name", "tab\there", "control character"),
        ("job_name", "my-HetJob", "hetjob"),
        ("partition", "packjob", "hetjob"),
        ("work_dir", "/tmp/back\\slash", "backslash"),
        ("array", "0-3; rm -rf ~", "index list"),
        ("job_name", "", "empty"),
    ],
)
def test_sbatch_values_that_cannot_be_written_are_refused(field: str, value: str, message: str) -> None:
    profile = Profile()
    kwargs: dict = {"profile": profile, "preset": load_presets()["qwen3-omni"], "job_name": "j"}
    if field == "partition":
        profile.job.partition = value
    elif field == "work_dir":
        profile.paths.work_dir = value
    else:
        kwargs[field] = value
    with pytest.raises(ValueError, match=message):
        render(**kwargs)


# -- paths --------------------------------------------------------------------------------------------------


def test_paths_are_absolute_or_relative_to_home() -> None:
    assert jobscript.home_relative("~") == "."
    assert jobscript.home_relative("~/vidcap") == "vidcap"
    assert jobscript.home_relative("vidcap") == "vidcap"
    assert jobscript.home_relative("/abs") == "/abs"
    with pytest.raises(ValueError, match="~user"):
        jobscript.home_relative("~bob/x")
    assert jobscript.job_dir("~/vidcap", "12") == "vidcap/jobs/12"
    assert jobscript.job_dir("~", "12") == "jobs/12"
    assert jobscript.log_path("/w/", "12_3") == "/w/jobs/12_3.log"
    profile = Profile()
    profile.paths.work_dir = "~/my work"
    profile.paths.videos_dir = "/data/my videos"
    text = render(profile=profile, preset=load_presets()["qwen3-omni"], job_name="j")
    assert "WORK_DIR=\"$HOME\"/'my work'\n" in text
    assert "VIDEOS_SRC='/data/my videos'\n" in text
    assert '#SBATCH --output="my work/jobs/%j.log"\n' in text


# -- presets ------------------------------------------------------------------------------------------------


def test_shipped_presets() -> None:
    presets = load_presets()
    assert set(presets) == {"qwen3-omni", "qwen3-vl-8b", "qwen2.5-omni-7b"}
    omni = presets[jobscript.DEFAULT_PRESET]
    assert omni.model == "Qwen/Qwen3-Omni-30B-A3B-Instruct" and omni.audio and omni.max_model_len == 32768
    limits = json.loads(jobscript.flag_value(omni.vllm_args, "--limit-mm-per-prompt") or "")
    assert limits == {"image": 0, "video": 1, "audio": 1}
    assert jobscript.flag_value(omni.vllm_args, "--mm-processor-cache-gb") == "0"
    vl = presets["qwen3-vl-8b"]
    assert not vl.audio
    assert "audio" not in json.loads(jobscript.flag_value(vl.vllm_args, "--limit-mm-per-prompt") or "")
    assert presets["qwen2.5-omni-7b"].audio
    assert jobscript.find_preset(presets, "Qwen/Qwen3-VL-8B-Instruct") is vl
    assert jobscript.find_preset(presets, "qwen3-vl-8b") is vl
    assert jobscript.find_preset(presets, "nope") is None
    with pytest.raises(Exception, match="frozen"):
        omni.model = "x"  # type: ignore[misc]


def test_user_presets_override_by_field_and_extend() -> None:
    presets = load_presets(
        {
            "qwen3-omni": {"vllm_args": ["--max-model-len", "16384"], "max_model_len": 16384},
            "mine": {"model": "me/my-model", "max_model_len": 8192, "audio": False},
        }
    )
    assert presets["qwen3-omni"].model == "Qwen/Qwen3-Omni-30B-A3B-Instruct"
    assert presets["qwen3-omni"].vllm_args == ("--max-model-len", "16384")
    assert presets["mine"] == Preset(name="mine", model="me/my-model", max_model_len=8192)
    assert load_presets()["qwen3-omni"].max_model_len == 32768  # the shipped data is not changed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"mine": {"model": "m", "max_model_len": 1, "colour": "red"}},
            r"presets\.mine\.colour: unknown key",
        ),
        ({"mine": {"max_model_len": 1}}, r"presets\.mine\.model"),
        ({"qwen3-omni": {"max_model_len": 4096}}, "--max-model-len 32768 but max_model_len is 4096"),
        ({"mine": {"model": "m", "max_model_len": 1, "vllm_args": ["--api-key", "k"]}}, "--api-key"),
        ({"mine": {"model": "m", "max_model_len": 1, "vllm_args": ["--api_key=k"]}}, "--api-key"),
        ({"mine": {"model": "m", "max_model_len": 1, "name": "x"}}, "unknown key 'name'"),
        ({"mine": "m"}, "expected a table"),
    ],
)
def test_bad_presets_are_config_errors(extra: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_presets(extra)


# -- rendering rules ----------------------------------------------------------------------------------------


def test_profile_args_follow_the_preset_and_the_script_flags_come_last() -> None:
    profile = Profile()
    profile.server.vllm_args = ["--max-num-seqs", "8", "--limit-mm-per-prompt", '{"video": 2}']
    preset = load_presets()["qwen3-omni"]
    argv = jobscript.server_argv(profile, preset)
    assert argv == ["vllm", "serve", preset.model, *preset.vllm_args, *profile.server.vllm_args]
    standin = [sys.executable, "-m", "tests.standin.server"]
    assert jobscript.server_argv(profile, preset, standin) == [*standin, *profile.server.vllm_args]
    text = render(profile=profile, preset=preset, job_name="j")
    server = text[text.index("SERVER=(") : text.index("\n)\n", text.index("SERVER=("))]
    assert server.index("--max-num-seqs 32") < server.index("--max-num-seqs 8")
    assert "--limit-mm-per-prompt '{\"video\": 2}'" in server
    assert server.rstrip().endswith('--allowed-local-media-path "$VIDEOS_DIR"')


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.job.env.update({"1BAD": "x"}), "not a shell variable name"),
        (lambda p: p.job.env.update({"A-B": "x"}), "not a shell variable name"),
        (lambda p: p.job.env.update({"JOB_DIR": "/tmp"}), "set by the job script"),
        (lambda p: p.job.env.update({"VLLM_API_KEY": "k"}), "set by the job script"),
        (lambda p: p.job.env.update({"X": "a\0b"}), "NUL"),
        (lambda p: p.server.vllm_args.extend(["--api-key", "k"]), "--api-key"),
        (lambda p: p.server.vllm_args.append("--port=8000"), "--port"),
        (lambda p: p.server.vllm_args.extend(["--host", "127.0.0.1"]), "--host"),
        (lambda p: p.server.vllm_args.extend(["--allowed-local-media-path", "/"]), "videos_dir"),
        (lambda p: p.job.setup.append("echo \0"), "NUL"),
        (lambda p: setattr(p.paths, "videos_dir", ""), "empty path"),
    ],
)
def test_values_the_script_cannot_take_are_refused(change, message: str) -> None:
    profile = Profile()
    change(profile)
    with pytest.raises(ValueError, match=message):
        render(profile=profile, preset=load_presets()["qwen3-omni"], job_name="j")


def test_the_guard_runs_from_the_same_installation_as_the_file_server() -> None:
    assert jobscript.guard_argv(["vidcap"]) == ["vidcap-guard"]
    assert jobscript.guard_argv(["/opt/my env/bin/vidcap"]) == ["/opt/my env/bin/vidcap-guard"]
    assert jobscript.guard_argv(["uv", "run", "vidcap"]) == ["uv", "run", "vidcap-guard"]
    assert jobscript.guard_argv(["/usr/bin/python3", "-m", "vidcap.cli"]) == [
        "/usr/bin/python3",
        "-m",
        "vidcap.guard",
    ]
    for bad in (["python3", "-m", "other"], ["vidcap.cli"], ["my-vidcap"]):
        with pytest.raises(ValueError, match=r"must end with 'vidcap' or '-m vidcap\.cli'"):
            jobscript.guard_argv(bad)
    text = render(
        profile=Profile(),
        preset=load_presets()["qwen3-omni"],
        job_name="j",
        vidcap_command=["/opt/my env/bin/python", "-m", "vidcap.cli"],
    )
    assert "\nGUARD=('/opt/my env/bin/python' -m vidcap.guard)\n" in text
    # The console script the default command needs is declared, and installed in this environment.
    assert 'vidcap-guard = "vidcap.guard:main"' in (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert (Path(sys.executable).parent / "vidcap-guard").exists()


# -- real runs ----------------------------------------------------------------------------------------------

DUMPER = r"""
import hashlib, http.server, json, os, signal, socketserver, sys, threading, time

dump, argv = sys.argv[1], sys.argv[2:]


def last(flag):
    value = None
    for i, word in enumerate(argv[:-1]):
        if word == flag:
            value = argv[i + 1]
    return value


key = os.environ.get("VLLM_API_KEY")
record = {
    "argv": argv,
    "has_key": bool(key),
    "key_sha256": hashlib.sha256(key.encode()).hexdigest() if key else None,
    "env": {name: os.environ.get(name) for name in ("HOSTILE", "EMPTY", "SETUP_MSG")},
    "pid": os.getpid(),
    "pgid": os.getpgid(0),
}
with open(dump + ".tmp", "w") as fh:
    json.dump(record, fh)
os.replace(dump + ".tmp", dump)

if os.environ.get("DUMPER_EXIT"):
    sys.exit(int(os.environ["DUMPER_EXIT"]))


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class UnixHTTPServer(socketserver.UnixStreamServer):
    pass


server = UnixHTTPServer(last("--uds"), Handler)  # like vLLM: a plain bind, the file is left behind
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
parent = os.getppid()


def orphaned():  # never outlive the job script, even a killed one
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


threading.Thread(target=orphaned, daemon=True).start()
server.serve_forever()
"""


def hostile_profile(tmp_path: Path) -> tuple[Profile, Path]:
    """Spaces, quotes, `$()`, backticks and % in every value that reaches the shell."""
    work = tmp_path / "work dir 'q' \"dq\" $(touch pwned) `touch pwned` 100%j"
    videos = tmp_path / "videos 'v' \"dq\" $(touch pwned) `touch pwned`"
    videos.mkdir(parents=True, exist_ok=True)
    profile = Profile()
    profile.paths.work_dir = str(work)
    profile.paths.videos_dir = str(videos)
    profile.job.setup = [
        "SETUP_MSG=\"setup ran with 'quotes' and spaces\"  # a comment $(touch pwned)",
        "export SETUP_MSG",
    ]
    profile.job.env = {"HOSTILE": HOSTILE, "EMPTY": ""}
    profile.server.served_name = "served 'name' $(touch pwned)"
    profile.server.vllm_args = ["--limit-mm-per-prompt", HOSTILE_JSON, "--note", HOSTILE, "--empty", ""]
    return profile, work


@dataclass
class Run:
    proc: subprocess.Popen
    job_dir: Path
    log: Path
    dump: Path

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def endpoint(self, timeout: float = 25.0) -> dict:
        path = self.job_dir / "endpoint.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"the job exited with {self.proc.returncode} before it was ready:\n{self.text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no endpoint.json after {timeout}s:\n{self.text()}")
            time.sleep(0.1)
        return json.loads(path.read_text(encoding="utf-8"))

    def children(self) -> list[int]:
        return descendants(self.proc.pid)

    def stop(self, timeout: float = 25.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """The jobs' TMPDIR, where the model server's socket dir goes: short, as a unix socket's path has at
    most 107 bytes and tmp_path can be long; removed at the end with whatever a killed job left there."""
    path = Path(tempfile.mkdtemp(prefix="vidcap-jt-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def jobs(tmp_path: Path, short_tmp: Path):
    started: list[Run] = []

    def start(profile: Profile, job_id: str, *, env: dict[str, str] | None = None, **kwargs) -> Run:
        dumper = tmp_path / "dumper.py"
        dumper.write_text(DUMPER, encoding="utf-8")
        dump = tmp_path / f"{job_id}.argv.json"
        text = render(
            profile=profile,
            preset=kwargs.pop("preset", load_presets()["qwen3-omni"]),
            job_name=f"vidcap-{job_id}",
            server_command=kwargs.pop("server_command", [sys.executable, str(dumper), str(dump)]),
            vidcap_command=kwargs.pop("vidcap_command", [sys.executable, "-m", "vidcap.cli"]),
            **kwargs,
        )
        script = tmp_path / f"{job_id}.sbatch"
        script.write_text(text, encoding="utf-8")
        log = tmp_path / f"{job_id}.log"
        cwd = tmp_path / "cwd"
        cwd.mkdir(exist_ok=True)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        full_env.update(
            SLURM_JOB_ID=job_id,
            VIDCAP_READY_TIMEOUT="30",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            PYTHONPATH=str(REPO),
            TMPDIR=str(short_tmp),
        )
        full_env.update(env or {})
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", str(script)],
                cwd=cwd,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        run = Run(proc, Path(jobscript.job_dir(profile.paths.work_dir, job_id)), log, dump)
        started.append(run)
        return run

    yield start
    for run in started:
        if run.proc.poll() is None:
            kids = run.children()
            run.stop()
            for pid in kids:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


def http_status(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> int:
    """The status of one request, sent as written: no client-side path clean-up."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Length: 0"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n" not in data:
            more = sock.recv(4096)
            if not more:
                break
            data += more
    return int(data.split(b" ", 2)[1])


def child_running(run: Run, word: bytes) -> int:
    """The job's child process with ``word`` among its argv words."""
    for pid in run.children():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if word in argv:
            return pid
    pytest.fail(f"no child of the job runs {word!r}")


def guard_pid(run: Run) -> int:
    return child_running(run, b"vidcap.guard")


def listening_ports(pids: list[int]) -> dict[int, set[int]]:
    """The TCP ports each of ``pids`` listens on: its socket fds (/proc/PID/fd) that /proc/net/tcp and
    tcp6 list in state LISTEN (0A)."""
    listening: dict[str, int] = {}  # socket inode -> port
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):  # no IPv6
            for line in Path(table).read_text(encoding="ascii").splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":
                    listening[fields[9]] = int(fields[1].rpartition(":")[2], 16)
    found: dict[int, set[int]] = {}
    for pid in pids:
        ports: set[int] = set()
        with contextlib.suppress(OSError):  # a process that has just ended
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:[") and target[8:-1] in listening:
                        ports.add(listening[target[8:-1]])
        found[pid] = ports
    return found


def unix_get(path: str, target: str) -> int:
    """The status of GET ``target`` on the unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data and (more := sock.recv(4096)):
            data += more
    return int(data.split(b" ", 2)[1])


def files_health(port: int, token: str) -> dict:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(f"http://127.0.0.1:{port}/t/{token}/health/", timeout=5) as resp:
        return json.loads(resp.read())


def test_hostile_profile_runs_with_exact_argv_and_private_secrets(tmp_path: Path, jobs) -> None:
    profile, work = hostile_profile(tmp_path)
    extra = (
        'if [[ -f "$JOB_DIR/endpoint.json" ]]; then\n'
        '    echo "$GUARD_PORT $FILES_PORT $VLLM_SOCK" >"$JOB_DIR/extra.out"\n'
        "fi"
    )
    run = jobs(profile, "test123", extra_script=extra)
    endpoint = run.endpoint()
    videos = Path(profile.paths.videos_dir).resolve()

    record = json.loads(run.dump.read_text(encoding="utf-8"))
    assert record["argv"] == [
        *profile.server.vllm_args,
        "--served-model-name",
        profile.server.served_name,
        "--allowed-local-media-path",
        str(videos),
        "--uds",
        endpoint["internal_socket"],
    ]
    assert json.loads(record["argv"][1]) == json.loads(HOSTILE_JSON)
    assert record["env"] == {
        "HOSTILE": HOSTILE,
        "EMPTY": "",
        "SETUP_MSG": "setup ran with 'quotes' and spaces",
    }

    job_dir = Path(work) / "jobs" / "test123"
    assert run.job_dir == job_dir
    secrets = json.loads((job_dir / "secrets.json").read_text(encoding="utf-8"))
    assert set(secrets) == {"api_key", "files_token"} and all(len(v) >= 32 for v in secrets.values())
    for name in ("secrets.json", "files.token", "endpoint.json", "files.port", "guard.port"):
        assert stat.S_IMODE((job_dir / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(job_dir.stat().st_mode) == 0o700
    assert (job_dir / "files.token").read_text(encoding="utf-8").strip() == secrets["files_token"]
    # The key went in through the environment, and only there: not in argv (ps), not in the log.
    assert (
        record["has_key"] and record["key_sha256"] == hashlib.sha256(secrets["api_key"].encode()).hexdigest()
    )
    cmdline = Path(f"/proc/{record['pid']}/cmdline").read_bytes()
    assert secrets["api_key"].encode() not in cmdline and secrets["files_token"].encode() not in cmdline
    assert record["pgid"] == record["pid"]  # its own process group, stopped as a whole

    assert set(endpoint) == {
        "node",
        "vllm_port",
        "internal_socket",
        "files_port",
        "model",
        "started",
        "job_id",
    }
    assert endpoint["node"] == socket.gethostname()
    assert endpoint["model"] == profile.server.served_name
    assert endpoint["job_id"] == "test123"
    assert endpoint["vllm_port"] != endpoint["files_port"]
    # vllm_port is the guard's: it passes /health on to the server and refuses what vLLM leaves open.
    assert (job_dir / "guard.port").read_text(encoding="utf-8").strip() == str(endpoint["vllm_port"])
    assert http_status(endpoint["vllm_port"], "/health") == 200
    assert http_status(endpoint["vllm_port"], "/invocations", "POST") == 403
    guard = guard_pid(run)
    cmdline = Path(f"/proc/{guard}/cmdline").read_bytes().split(b"\0")
    assert b"vidcap.guard" in cmdline and f"unix:{endpoint['internal_socket']}".encode() in cmdline
    assert secrets["api_key"].encode() not in b" ".join(cmdline)
    assert files_health(endpoint["files_port"], secrets["files_token"])["root"] == str(videos)
    assert (job_dir / "job.log").is_symlink() and os.readlink(job_dir / "job.log") == "../test123.log"
    deadline = time.monotonic() + 5
    while not (job_dir / "extra.out").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    extra_out = (job_dir / "extra.out").read_text(encoding="utf-8")
    assert extra_out == f"{endpoint['vllm_port']} {endpoint['files_port']} {endpoint['internal_socket']}\n"

    children = run.children()
    assert children
    assert run.stop() == 143  # what scancel does: SIGTERM
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if alive(pid)], "processes left behind after SIGTERM"
    assert not (job_dir / "endpoint.json").exists() and not (job_dir / "secrets.json").exists()
    log = run.text()
    assert secrets["api_key"] not in log and secrets["files_token"] not in log
    assert "terminated (SIGTERM)" in log
    assert not [p for p in tmp_path.rglob("pwned")], f"a $() or `` in a value was executed:\n{log}"


def test_two_jobs_on_one_node_get_their_own_ports_and_sockets(tmp_path: Path, jobs) -> None:
    profile = Profile()
    videos = tmp_path / "videos"
    videos.mkdir()
    profile.paths.videos_dir = str(videos)
    profile.paths.work_dir = str(tmp_path / "work")
    first, second = jobs(profile, "job-a"), jobs(profile, "job-b")
    a, b = first.endpoint(), second.endpoint()
    ports = [e[name] for e in (a, b) for name in ("vllm_port", "files_port")]
    assert len(set(ports)) == 4, ports
    assert Path(a["internal_socket"]).parent != Path(b["internal_socket"]).parent
    for run, endpoint in ((first, a), (second, b)):
        argv = json.loads(run.dump.read_text(encoding="utf-8"))["argv"]
        assert argv[-2:] == ["--uds", endpoint["internal_socket"]]
        assert http_status(endpoint["vllm_port"], "/health") == 200
    assert first.stop() == 143 and second.stop() == 143


def test_the_standin_serves_under_the_job_script_with_the_key_from_the_environment(
    tmp_path: Path, jobs
) -> None:
    profile = Profile()
    (tmp_path / "videos").mkdir()
    profile.paths.videos_dir = str(tmp_path / "videos")
    profile.paths.work_dir = str(tmp_path / "work")
    profile.server.served_name = "qwen3-omni"
    profile.server.vllm_args = ["--limit-mm-per-prompt", '{"image": 0, "video": 1, "audio": 1}']
    run = jobs(profile, "standin", server_command=[sys.executable, "-m", "tests.standin.server"])
    endpoint = run.endpoint()
    key = json.loads((run.job_dir / "secrets.json").read_text(encoding="utf-8"))["api_key"]
    bearer = {"Authorization": f"Bearer {key}"}
    port = endpoint["vllm_port"]  # the guard's
    assert http_status(port, "/v1/models") == 401  # vLLM's own key check, through the guard
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers=bearer)
    with direct.open(request, timeout=5) as resp:
        assert [m["id"] for m in json.loads(resp.read())["data"]] == ["qwen3-omni"]
    # What vLLM leaves open without a key never reaches the server, key or not.
    for path in ("/invocations", "/tokenize", "/pause", "/metrics"):
        assert http_status(port, path, "POST", bearer) == 403, path
    assert http_status(port, "/health") == 200
    assert "refused POST /invocations from 127.0.0.1: 403" in run.text()
    assert key not in run.text()
    assert run.stop() == 143


def plain_profile(tmp_path: Path) -> Profile:
    profile = Profile()
    (tmp_path / "videos").mkdir(exist_ok=True)
    profile.paths.videos_dir = str(tmp_path / "videos")
    profile.paths.work_dir = str(tmp_path / "work")
    return profile


def test_the_model_server_has_no_tcp_port_only_its_unix_socket(tmp_path: Path, jobs) -> None:
    """The point of --uds: a port, even on 127.0.0.1, would let any user with a job on the node use what
    vLLM's key leaves open. The job's only TCP listeners are the guard's port and the file server's."""
    profile = plain_profile(tmp_path)
    run = jobs(profile, "nolisten", server_command=[sys.executable, "-m", "tests.standin.server"])
    endpoint = run.endpoint()
    standin = child_running(run, b"tests.standin.server")
    ports = listening_ports(run.children())
    assert ports[standin] == set(), "the model server listens on a TCP port"
    assert ports[guard_pid(run)] == {endpoint["vllm_port"]}
    assert set().union(*ports.values()) == {endpoint["vllm_port"], endpoint["files_port"]}, ports
    # The server answers on its socket (to its owner: the directory is 0700), and only the guard's
    # allowlist reaches it from the network.
    assert unix_get(endpoint["internal_socket"], "/health") == 200
    assert http_status(endpoint["vllm_port"], "/health") == 200
    assert http_status(endpoint["vllm_port"], "/invocations", "POST") == 403
    assert run.stop() == 143


def test_the_socket_dir_is_private_node_local_and_removed_at_the_end(
    tmp_path: Path, jobs, short_tmp: Path
) -> None:
    profile = plain_profile(tmp_path)
    run = jobs(profile, "sockdir")
    endpoint = run.endpoint()
    sock = Path(endpoint["internal_socket"])
    assert sock.name == "vllm.sock" and sock.parent.parent == short_tmp  # under $TMPDIR
    assert sock.parent.name.startswith("vidcap-sockdir.")
    info = sock.parent.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert f"model server starting on {sock} behind the guard" in run.text()
    assert run.stop() == 143
    assert not sock.parent.exists(), "the socket dir (and the socket vLLM leaves) outlived the job"
    assert list(short_tmp.iterdir()) == []
    # A start that fails leaves nothing behind either.
    failed = jobs(profile, "sockdir-fails", env={"DUMPER_EXIT": "7"})
    assert failed.proc.wait(25) == 7
    assert list(short_tmp.iterdir()) == []


@pytest.mark.parametrize("why", ["too long", "missing"])
def test_a_tmpdir_that_cannot_hold_the_socket_falls_back_to_tmp(
    tmp_path: Path, jobs, short_tmp: Path, why: str
) -> None:
    base = short_tmp / ("d" * 90 if why == "too long" else "no such dir")
    if why == "too long":
        base.mkdir()  # <base>/vidcap-<job>.XXXXXX/vllm.sock would be over 107 bytes
    profile = plain_profile(tmp_path)
    run = jobs(profile, "fallback", env={"TMPDIR": str(base)})
    sock = Path(run.endpoint()["internal_socket"])
    assert sock.parent.parent == Path("/tmp") and len(str(sock).encode()) <= 107
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert run.stop() == 143
    assert not sock.parent.exists()
    if why == "too long":
        assert list(base.iterdir()) == []  # the directory tried first is gone


def _python_for(uid: int) -> str | None:
    """A python3 that user ``uid`` can run (the test's own may live under a private home), or None."""
    for python in (shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin"), sys.executable):
        if python:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                ok = subprocess.run([python, "-I", "-c", "pass"], user=uid, group=uid, cwd="/", timeout=30)
                if ok.returncode == 0:
                    return python
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_another_user_on_the_node_cannot_connect_to_the_model_server(tmp_path: Path, jobs) -> None:
    nobody = 65534
    python = _python_for(nobody)
    if python is None:
        pytest.skip("no python3 that uid 65534 can run")
    profile = plain_profile(tmp_path)
    run = jobs(profile, "otheruser")
    endpoint = run.endpoint()
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__)\n"
        "else:\n"
        "    print('connected')\n"
    )
    argv = [python, "-I", "-c", probe, endpoint["internal_socket"]]
    done = subprocess.run(
        argv, user=nobody, group=nobody, cwd="/", capture_output=True, text=True, timeout=30
    )
    assert done.stdout.strip() == "PermissionError", done
    assert http_status(endpoint["vllm_port"], "/health") == 200  # the guard is the way in
    assert run.stop() == 143


@pytest.mark.parametrize("which", ["guard", "files"])
def test_a_guard_or_file_server_that_dies_after_ready_ends_the_job(tmp_path: Path, jobs, which: str) -> None:
    profile = Profile()
    (tmp_path / "videos").mkdir()
    profile.paths.videos_dir = str(tmp_path / "videos")
    profile.paths.work_dir = str(tmp_path / "work")
    run = jobs(profile, f"dies-{which}")
    run.endpoint()
    pid = guard_pid(run) if which == "guard" else child_running(run, b"files")
    os.kill(pid, signal.SIGKILL)
    assert run.proc.wait(15) == 1
    expected = {
        "guard": "the guard exited; ending the job: the model server cannot be reached without it",
        "files": "the file server exited; ending the job",
    }[which]
    assert expected in run.text()
    assert not (run.job_dir / "endpoint.json").exists() and not (run.job_dir / "secrets.json").exists()


def test_a_server_that_dies_at_start_fails_the_job_fast(tmp_path: Path, jobs) -> None:
    profile = Profile()
    (tmp_path / "videos").mkdir()
    profile.paths.videos_dir = str(tmp_path / "videos")
    profile.paths.work_dir = str(tmp_path / "work")
    started = time.monotonic()
    run = jobs(profile, "dies", env={"DUMPER_EXIT": "7"})
    assert run.proc.wait(25) == 7
    assert time.monotonic() - started < 15
    log = run.text()
    assert "the model server exited with status 7 before it was ready" in log
    assert not (run.job_dir / "endpoint.json").exists() and not (run.job_dir / "secrets.json").exists()


def test_a_guard_that_cannot_start_fails_the_job(tmp_path: Path, jobs) -> None:
    profile = Profile()
    (tmp_path / "videos").mkdir()
    profile.paths.videos_dir = str(tmp_path / "videos")
    profile.paths.work_dir = str(tmp_path / "work")
    # An interpreter that runs the file server (-m vidcap.cli) but not the guard (-m vidcap.guard).
    python = tmp_path / "python"
    python.write_text(
        '#!/bin/sh\n[ "$2" = vidcap.guard ] && { echo "no guard here" >&2; exit 1; }\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n',
        encoding="utf-8",
    )
    python.chmod(0o755)
    run = jobs(profile, "noguard", vidcap_command=[str(python), "-m", "vidcap.cli"])
    assert run.proc.wait(25) == 1
    log = run.text()
    assert "no guard here" in log
    assert "the guard exited before the model server was ready" in log


def test_a_server_missing_from_path_is_a_clear_error(tmp_path: Path, jobs) -> None:
    profile = Profile()
    (tmp_path / "videos").mkdir()
    profile.paths.videos_dir = str(tmp_path / "videos")
    profile.paths.work_dir = str(tmp_path / "work")
    run = jobs(profile, "nopath", server_command=["no-such-vllm-here", "serve"])
    assert run.proc.wait(15) == 2
    assert "no-such-vllm-here is not on PATH after the setup lines" in run.text()


def test_a_vidcap_without_the_guard_is_a_clear_error(tmp_path: Path, jobs) -> None:
    profile = Profile()
    (tmp_path / "videos").mkdir()
    profile.paths.videos_dir = str(tmp_path / "videos")
    profile.paths.work_dir = str(tmp_path / "work")
    old = tmp_path / "old vidcap" / "bin" / "vidcap"  # an installation from before the guard
    old.parent.mkdir(parents=True)
    old.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    old.chmod(0o755)
    run = jobs(profile, "oldvidcap", vidcap_command=[str(old)])
    assert run.proc.wait(15) == 2
    expected = f"{old}-guard is not on PATH after the setup lines: the vidcap installed there is too old"
    assert expected in run.text()


def test_a_missing_videos_dir_is_a_clear_error(tmp_path: Path, jobs) -> None:
    profile = Profile()
    profile.paths.videos_dir = str(tmp_path / "no such dir")
    profile.paths.work_dir = str(tmp_path / "work")
    run = jobs(profile, "novideos")
    assert run.proc.wait(15) == 2
    assert f"videos_dir {tmp_path / 'no such dir'} is not a directory here" in run.text()
