"""Throughput of an SSH port forward on loopback: vidcap's two backends against a plain ``ssh -N -L``.

Run from the repository root::

    .venv/bin/python tests/bench/bench_tunnel.py [--quick] [--json-out F]

A real OpenSSH sshd on 127.0.0.1 (``tests/sshd.py``) plays the login node. A small TCP server in its
own process plays the GPU node: a client sends ``N\\n`` and gets N bytes back, then EOF. The client
downloads through each forward, checks the byte count, and times the whole connection (connect, channel
open, transfer). It runs in its own process, so it never shares a GIL with paramiko. The forwards are:

- ``sshtunnel``: ``vidcap.transport.connect(backend="sshtunnel").forward(...)``, i.e. paramiko plus
  vidcap.forward, in this process. It is also measured with the client in this process (a GIL shared
  with the forwarder's threads), and, as a diagnostic, reading a paramiko channel directly in this
  process, without vidcap.forward (``recv(4 MiB)``, more than the 2 MiB channel window, so every read
  takes the whole buffer): about the most paramiko can carry here.
- ``openssh``: ``connect(backend="openssh").forward(...)``, i.e. ``ssh -O forward -L`` on a ControlMaster.
- ``ssh -L``: a plain ``ssh -N -L`` process with the same key, known_hosts (StrictHostKeyChecking=yes),
  user and port. This is the baseline. It is also run with the cipher and MAC that paramiko negotiates,
  which separates the cost of the cipher from the cost of Python.
- ``direct``: no SSH, for reference.

A round sends 500 MB through every forward in turn, after one small warm-up transfer each; a full run
is 5 rounds (``--quick``: 3 rounds of 200 MB, about 10 s; ``--rounds`` and ``--mb`` override). The
table shows the best and the median MB/s (1 MB = 10^6 bytes) and the CPU time per GB of the forwarding
client process and of sshd. Progress goes to stderr, the table to stdout. ``--json-out``
writes every run's numbers to a file. The sshd, the ssh processes, the data server and the temp
directory are all removed at the end, also after Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchtable import Row, finish, print_table, ratio_row

REPO = Path(__file__).resolve().parents[2]
MB = 1_000_000
RECV_BUF = 1 << 20
RAW_CHANNEL_READ = 4 << 20  # more than paramiko's default channel window (2 MiB)
SERVE_CHUNK = 1 << 20
HOST = "127.0.0.1"


def log(msg: str) -> None:
    print(f"[bench-tunnel {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the two children: the GPU node's byte server and the measuring client ---------------------------


def serve_child() -> int:
    """Listen on a free port, print it, and stream the requested number of bytes to each client.

    Exits when its stdin closes (the parent is gone or done).
    """
    import threading

    payload = memoryview(os.urandom(SERVE_CHUNK))  # incompressible, in case compression is ever on
    lsock = socket.socket()
    lsock.bind((HOST, 0))
    lsock.listen(64)
    print(lsock.getsockname()[1], flush=True)

    def watch_stdin() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    def handle(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError, ValueError):
            line = conn.makefile("rb").readline()
            if not line.strip():
                return  # a readiness probe
            left = int(line)
            while left > 0:
                n = min(left, SERVE_CHUNK)
                conn.sendall(payload[:n])
                left -= n

    threading.Thread(target=watch_stdin, daemon=True).start()
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def fetch(port: int, nbytes: int) -> dict[str, float]:
    """Download ``nbytes`` from the byte server through 127.0.0.1:port; wall time from connect to EOF."""
    buf = bytearray(RECV_BUF)
    view = memoryview(buf)
    got = 0
    first = None
    t0 = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=120) as s:
        s.sendall(b"%d\n" % nbytes)
        while True:
            n = s.recv_into(view)
            if not n:
                break
            if first is None:
                first = time.perf_counter()
            got += n
    t1 = time.perf_counter()
    return {"bytes": got, "seconds": t1 - t0, "first_byte_s": (first or t1) - t0}


def client_child(port: int, nbytes: int) -> int:
    print(json.dumps(fetch(port, nbytes)), flush=True)
    return 0


# ---- CPU accounting from /proc -------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one live process (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


# ---- the forwards --------------------------------------------------------------------------------------


@dataclass
class Tunnel:
    name: str
    port: int
    #: CPU seconds so far of the process(es) that forward on the client side (None: not measured).
    cpu: Callable[[], float] | None
    #: Run the client here instead of in its own process.
    in_process: bool = False
    #: Instead of the local port, read this way (the raw-channel diagnostic); returns what fetch returns.
    reader: Callable[[int], dict[str, float]] | None = None
    runs: list[dict[str, float]] = field(default_factory=list)


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, err: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {err.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}: {err.read_text(errors='replace')}")


def ssh_value(path: Path) -> str:
    """A path as an ssh -o value: quoted (the test key's directory has a space), ``%`` doubled."""
    return '"' + str(path).replace("%", "%%") + '"'


def plain_ssh_argv(server: Any, local_port: int, target_port: int, extra: list[str]) -> list[str]:
    return [
        "ssh", "-F", "none", "-N",
        "-o", f"IdentityFile={ssh_value(server.identity_file)}", "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={ssh_value(server.known_hosts)}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
        "-p", str(server.port), "-l", server.user,
        *extra,
        "-L", f"{HOST}:{local_port}:{HOST}:{target_port}",
        "--", HOST,
    ]  # fmt: skip


def agreed_cipher(server: Any) -> str:
    """What ssh and this sshd agree on by default: the first client cipher the server also offers."""

    def listed(argv: list[str]) -> dict[str, list[str]]:
        out = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout
        return {k: v.split(",") for k, _, v in (line.partition(" ") for line in out.splitlines())}

    client = listed(["ssh", "-G", "-F", "none", "-p", str(server.port), HOST])
    import sshd

    srv = listed([sshd.SSHD, "-T", "-f", str(server.config_path)])
    cipher = next((c for c in client.get("ciphers", []) if c in srv.get("ciphers", [])), "?")
    if "poly1305" in cipher or "gcm" in cipher:
        return cipher  # AEAD: no separate MAC
    mac = next((m for m in client.get("macs", []) if m in srv.get("macs", [])), "?")
    return f"{cipher} + {mac}"


def master_pid(control: Path) -> int | None:
    proc = subprocess.run(
        ["ssh", "-F", "none", "-S", str(control), "-O", "check", HOST],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    text = proc.stderr + proc.stdout
    if "pid=" not in text:
        return None
    return int(text.split("pid=", 1)[1].split(")", 1)[0])


def is_ssh_master(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and os.path.basename(argv[0]) == b"ssh" and b"ControlMaster=yes" in argv


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- measuring -----------------------------------------------------------------------------------------


def run_client(port: int, nbytes: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--client-child", str(port), str(nbytes)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"client through port {port} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(tunnel: Tunnel, nbytes: int, sshd_pid: int | None) -> dict[str, float]:
    import sshd  # tests/ is on sys.path once bench() runs

    sshd_pids = sshd.descendants(sshd_pid) if sshd_pid else []
    sshd0 = sum(map(proc_cpu, sshd_pids))
    fwd0 = tunnel.cpu() if tunnel.cpu else 0.0
    if tunnel.reader is not None:
        result = tunnel.reader(nbytes)
    elif tunnel.in_process:
        result = fetch(tunnel.port, nbytes)
    else:
        result = run_client(tunnel.port, nbytes)
    fwd1 = tunnel.cpu() if tunnel.cpu else 0.0
    sshd1 = sum(map(proc_cpu, sshd_pids))
    if result["bytes"] != nbytes:
        raise RuntimeError(f"{tunnel.name}: received {result['bytes']} bytes, expected {nbytes}")
    result["mb_s"] = nbytes / MB / result["seconds"]
    result["forwarder_cpu_s"] = fwd1 - fwd0
    result["sshd_cpu_s"] = sshd1 - sshd0
    return result


def raw_channel_reader(transport: Any, target_port: int) -> Callable[[int], dict[str, float]]:
    """Read the byte server straight from a paramiko direct-tcpip channel in this process."""

    def read(nbytes: int) -> dict[str, float]:
        got = 0
        first = None
        t0 = time.perf_counter()
        chan = transport._open_forward_channel((HOST, target_port), (HOST, 0))
        try:
            chan.sendall(b"%d\n" % nbytes)
            while True:
                data = chan.recv(RAW_CHANNEL_READ)
                if not data:
                    break
                if first is None:
                    first = time.perf_counter()
                got += len(data)
        finally:
            chan.close()
        t1 = time.perf_counter()
        return {"bytes": got, "seconds": t1 - t0, "first_byte_s": (first or t1) - t0}

    return read


def bench(
    cfg: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack
) -> tuple[list[Row], dict[str, Any]]:
    for p in (str(REPO), str(REPO / "tests")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import sshd

    from vidcap.transport import connect

    reps = cfg.rounds or (3 if cfg.quick else 5)
    nbytes = (cfg.mb or (200 if cfg.quick else 500)) * MB
    warm = 4 * MB

    # The GPU node: a byte server in its own process.
    data = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve-child"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )

    def stop_data() -> None:
        assert data.stdin is not None
        with contextlib.suppress(OSError):
            data.stdin.close()
        stop_process(data)

    stack.callback(stop_data)
    assert data.stdout is not None
    target = int(data.stdout.readline())

    # The login node.
    server = sshd.SSHServer(tmp / "sshd")
    stack.callback(server.stop)
    server.start()
    sshd_pid = server.proc.pid if server.proc else None
    log(f"sshd on {HOST}:{server.port}, byte server on {HOST}:{target}")

    tunnels: list[Tunnel] = [Tunnel("direct", target, None)]

    # (c) the baseline, and the same with paramiko's cipher.
    def plain(name: str, extra: list[str]) -> Tunnel:
        port = free_port()
        err = tmp / f"{name.replace(' ', '_')}.stderr"
        with open(err, "wb") as fh:
            proc = subprocess.Popen(
                plain_ssh_argv(server, port, target, extra), stdin=subprocess.DEVNULL, stdout=fh, stderr=fh
            )
        stack.callback(stop_process, proc)
        wait_listening(port, proc, name, err)
        return Tunnel(name, port, lambda: proc_cpu(proc.pid))

    baseline = plain("ssh -L", [])
    tunnels.append(baseline)

    # (b) openssh: a ControlMaster and `ssh -O forward`.
    ctl = tmp / "ctl"
    ossh = connect(server.ssh_config(backend="openssh"), control_dir=ctl)
    master: list[int] = []

    def close_openssh() -> None:
        try:
            ossh.close()  # cancels the forward and ends the master (-O exit), since it started it
        finally:
            for pid in master:  # should the master have outlived close()
                if is_ssh_master(pid):
                    os.kill(pid, signal.SIGTERM)

    stack.callback(close_openssh)
    control = ossh._control  # private, read only: where the master listens
    pid = master_pid(control)
    if pid is not None:
        master.append(pid)
    fwd = ossh.forward(0, HOST, target)
    stack.callback(fwd.close)
    tunnels.append(Tunnel("openssh", fwd.local_port, (lambda: proc_cpu(pid)) if pid is not None else None))

    # (a) sshtunnel: paramiko + vidcap.forward in this process.
    ptr = connect(server.ssh_config(backend="sshtunnel"))
    stack.callback(ptr.close)
    pfwd = ptr.forward(0, HOST, target)
    stack.callback(pfwd.close)
    this_cpu = time.process_time
    tunnels.append(Tunnel("sshtunnel", pfwd.local_port, this_cpu))
    tunnels.append(Tunnel("sshtunnel, client in this process", pfwd.local_port, this_cpu, in_process=True))
    tunnels.append(
        Tunnel(
            "paramiko channel read in this process",
            0,
            this_cpu,
            reader=raw_channel_reader(ptr, target),
        )
    )
    hop = ptr._hops[-1]
    paramiko_cipher = hop.remote_cipher
    paramiko_mac = hop.remote_mac
    paramiko_desc = f"{paramiko_cipher} + {paramiko_mac}" if paramiko_mac else paramiko_cipher
    same_cipher = ["-o", f"Ciphers={paramiko_cipher}"]
    if paramiko_mac and "gcm" not in paramiko_cipher:
        same_cipher += ["-o", f"MACs={paramiko_mac}"]
    tunnels.append(plain("ssh -L, paramiko's cipher", same_cipher))
    ssh_desc = agreed_cipher(server)
    log(f"ciphers: ssh/openssh {ssh_desc}; paramiko {paramiko_desc}")

    log(f"warm-up: {warm // MB} MB through each forward")
    for t in tunnels:
        measure(t, warm, sshd_pid)
    log(f"measuring: {reps} rounds x {nbytes // MB} MB through each of {len(tunnels)} forwards")
    for rep in range(reps):
        for t in tunnels:
            t.runs.append(measure(t, nbytes, sshd_pid))
        log(f"  round {rep}: " + ", ".join(f"{t.name} {t.runs[-1]['mb_s']:.0f}" for t in tunnels) + " MB/s")

    by = {t.name: t for t in tunnels}

    def best(name: str) -> float:
        return max(r["mb_s"] for r in by[name].runs)

    def median(name: str) -> float:
        return statistics.median(r["mb_s"] for r in by[name].runs)

    def cpu_per_gb(name: str, key: str) -> float:
        runs = by[name].runs
        return sum(r[key] for r in runs) / (len(runs) * nbytes / 1e9)

    base = "ssh -L"
    rows = [
        ratio_row(f"MB/s sshtunnel (a), best of {reps}", best("sshtunnel"), best(base)),
        ratio_row("  median", median("sshtunnel"), median(base)),
        ratio_row(f"MB/s openssh (b), best of {reps}", best("openssh"), best(base)),
        ratio_row("  median", median("openssh"), median(base)),
        ratio_row(
            "MB/s sshtunnel, client in-process*", best("sshtunnel, client in this process"), best(base)
        ),
        ratio_row(
            "MB/s paramiko channel, no forward.py*",
            best("paramiko channel read in this process"),
            best(base),
        ),
        ratio_row(
            "MB/s sshtunnel vs ssh -L same cipher", best("sshtunnel"), best("ssh -L, paramiko's cipher")
        ),
        ratio_row("MB/s direct TCP, no SSH (reference)", best("direct"), None),
        ratio_row(
            "client-side CPU s/GB: sshtunnel",
            cpu_per_gb("sshtunnel", "forwarder_cpu_s"),
            cpu_per_gb(base, "forwarder_cpu_s"),
            digits=2,
        ),
    ]
    if by["openssh"].cpu is not None:
        rows.append(
            ratio_row(
                "client-side CPU s/GB: openssh master",
                cpu_per_gb("openssh", "forwarder_cpu_s"),
                cpu_per_gb(base, "forwarder_cpu_s"),
                digits=2,
            )
        )
    rows.append(
        ratio_row(
            "sshd CPU s/GB: sshtunnel",
            cpu_per_gb("sshtunnel", "sshd_cpu_s"),
            cpu_per_gb(base, "sshd_cpu_s"),
            digits=2,
        )
    )
    details = {
        "bytes_per_run": nbytes,
        "rounds": reps,
        "ciphers": {"ssh": ssh_desc, "paramiko": paramiko_desc},
        "forwards": {t.name: t.runs for t in tunnels},
    }
    return rows, details


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds of 200 MB: about 10 s (full: 5 x 500 MB)")
    p.add_argument("--rounds", type=int, help="rounds (every forward once per round)")
    p.add_argument("--mb", type=int, help="MB (10^6 bytes) per transfer")
    p.add_argument("--json-out", type=Path, help="write the results as JSON here")
    p.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client-child", nargs=2, type=int, help=argparse.SUPPRESS)
    cfg = p.parse_args(argv)
    if cfg.serve_child:
        return serve_child()
    if cfg.client_child:
        return client_child(*cfg.client_child)
    if not Path("/usr/sbin/sshd").exists() or shutil.which("ssh") is None:
        log("needs OpenSSH: /usr/sbin/sshd and ssh (apt-get install openssh-server openssh-client)")
        return 2
    # SIGTERM unwinds like Ctrl-C, so the cleanup below runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"note: load average is {load:.1f} before starting; other work on this machine skews the numbers")
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="vidcap-tunnel-"))
    try:
        with contextlib.ExitStack() as stack:
            os.environ["VIDCAP_HOME"] = str(tmp / "home")  # never the real state dir
            rows, details = bench(cfg, tmp, stack)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    print_table(rows, baseline="ssh -L")
    ciphers = details["ciphers"]
    print("* informative: the client shares this process's GIL with paramiko's threads, or reads a")
    print("  paramiko channel directly with recv(4 MiB) (no local socket, no vidcap.forward).")
    print(f"ciphers: ssh -L and openssh {ciphers['ssh']}; paramiko {ciphers['paramiko']}")
    finish(
        rows,
        details,
        quick=cfg.quick,
        total=total,
        load_before=load,
        load_after=load_after,
        json_out=cfg.json_out,
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything was stopped and removed")
        sys.exit(130)
