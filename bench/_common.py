"""Helpers for bench/l4.py: target servers (run in their own process), load generators, /proc readers.

Everything here binds and dials loopback addresses only; every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from meshd.tools.echo import EchoHandler, ThreadedServer

T = TypeVar("T")

BULK_CHUNK = 1 << 20  # 1 MiB per sendall / recv_into
MSG = 100  # request/response message size (bytes)
IO_TIMEOUT = 30.0  # no single socket operation in the benchmark may block longer than this


def check_loopback(host: str) -> str:
    if not host.startswith("127."):
        raise SystemExit(f"refusing non-loopback address {host!r}: the benchmark runs on 127.0.0.0/8 only")
    return host


# ---------------------------------------------------------------------------------------------------
# Target servers: a discarding sink and a threaded echo. Run in a child process (`l4.py _serve ...`)
# so the load generator's GIL does not cap the receiving side.


class _Sink(socketserver.BaseRequestHandler):
    """Count and discard everything; on EOF answer with the byte count (ASCII) and close."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(120)
        buf = bytearray(BULK_CHUNK)
        total = 0
        try:
            while n := sock.recv_into(buf):
                total += n
            sock.sendall(b"%d\n" % total)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve(host: str, sink_port: int, echo_port: int) -> None:
    """Child-process entry: serve sink and echo until stdin closes (the parent exited or is done)."""
    check_loopback(host)
    threading.stack_size(256 * 1024)  # 1,000 idle echo connections = 1,000 threads
    servers = [ThreadedServer((host, sink_port), _Sink), ThreadedServer((host, echo_port), EchoHandler)]
    for s in servers:
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    with contextlib.suppress(KeyboardInterrupt):
        sys.stdin.read()  # EOF when the parent closes the pipe or dies
    for s in servers:
        s.shutdown()
        s.server_close()


# ---------------------------------------------------------------------------------------------------
# Load generators (client side). Addresses are (host, port) tuples on loopback.


def _connect(addr: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(addr, timeout=IO_TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def bulk(addr: tuple[str, int], conns: int, seconds: float, max_bytes: int) -> tuple[int, float]:
    """`conns` parallel one-way sends to the sink, each for `seconds` (or `max_bytes`, if > 0).

    Returns (bytes the sink counted, seconds from start to the last sink's acknowledgement), so bytes
    still buffered inside a proxy are not counted as delivered.
    """
    block = memoryview(os.urandom(BULK_CHUNK))
    socks = [_connect(addr) for _ in range(conns)]
    counted = [0] * conns
    errors: list[BaseException] = []
    start_gate = threading.Barrier(conns + 1, timeout=IO_TIMEOUT)
    t0 = [0.0]

    def run(i: int) -> None:
        s = socks[i]
        try:
            start_gate.wait()
            deadline = t0[0] + seconds
            sent = 0
            # bounded: by time, by bytes, and by a hard count of chunks
            for _ in range(1 << 22):
                s.sendall(block)
                sent += BULK_CHUNK
                if time.perf_counter() >= deadline or (max_bytes and sent >= max_bytes):
                    break
            s.shutdown(socket.SHUT_WR)
            reply = b""
            for _ in range(100):
                chunk = s.recv(64)
                if not chunk:
                    break
                reply += chunk
            counted[i] = int(reply.strip() or b"0")
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(conns)]
    for t in threads:
        t.start()
    t0[0] = time.perf_counter()
    start_gate.wait()
    for t in threads:
        t.join(seconds + 2 * IO_TIMEOUT)
    elapsed = time.perf_counter() - t0[0]
    for s in socks:
        s.close()
    if errors:
        raise RuntimeError(f"bulk send to {addr} failed: {errors[0]!r}")
    return sum(counted), elapsed


def latency(addr: tuple[str, int], rounds: int, warmup: int = 200) -> list[float]:
    """Round-trip times (microseconds) of `MSG`-byte messages on one connection to the echo."""
    msg = b"x" * MSG
    out: list[float] = []
    with _connect(addr) as s:
        for i in range(warmup + rounds):
            t = time.perf_counter_ns()
            s.sendall(msg)
            got = 0
            for _ in range(MSG):
                chunk = s.recv(MSG - got)
                if not chunk:
                    raise RuntimeError(f"echo at {addr} closed mid-message")
                got += len(chunk)
                if got == MSG:
                    break
            if i >= warmup:
                out.append((time.perf_counter_ns() - t) / 1000)
    return out


def round_trip(s: socket.socket) -> None:
    s.sendall(b"y" * MSG)
    got = 0
    for _ in range(MSG):
        chunk = s.recv(MSG - got)
        if not chunk:
            raise RuntimeError("echo closed mid-message")
        got += len(chunk)
        if got == MSG:
            return


def conn_rate(addr: tuple[str, int], seconds: float, max_conns: int) -> float:
    """Connections per second: connect, one round trip, close; sequential, one at a time."""
    t0 = time.perf_counter()
    n = 0
    for n in range(1, max_conns + 1):  # noqa: B007 - n is the count done
        with _connect(addr) as s:
            round_trip(s)
        if time.perf_counter() - t0 >= seconds:
            break
    return n / (time.perf_counter() - t0)


def hold_idle(addr: tuple[str, int], count: int) -> list[socket.socket]:
    """Open `count` connections, each after one round trip; the caller closes them."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = _connect(addr)
            socks.append(s)
            round_trip(s)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


# ---------------------------------------------------------------------------------------------------
# /proc readers

_CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + sys CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK


def status_kib(pid: int, key: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


@dataclass
class Percentiles:
    p50: float
    p99: float


def percentiles(samples: list[float]) -> Percentiles:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return Percentiles(p50=statistics.median(samples), p99=q[98])


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main_with_cleanup(run: Callable[[], int]) -> int:
    """Run a benchmark so that SIGTERM and Ctrl-C unwind it (its `finally` blocks stop every child)."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    try:
        return run()
    except KeyboardInterrupt:
        print("\ninterrupted; child processes stopped", file=sys.stderr)
        return 130


def daemon_config(
    name: str, ip: str, ca: Path, peers: list[str], body: str, work: Path, *, trust_domain: str, top: str = ""
) -> Path:
    """A benchmark daemon's config: every listener on `ip`, static peers, quiet logs, its own policy folder."""
    pol = work / f"{name}-policy"
    pol.mkdir(exist_ok=True)
    cfg = work / f"{name}.toml"
    peer_list = ", ".join(f'"{p}:15008"' for p in peers)
    cfg.write_text(
        top + f'trust_domain = "{trust_domain}"\nnode_name = "{name}"\n'
        f'[listen]\nhbone = "{ip}:15008"\nadmin = "{ip}:15000"\nmetrics = "{ip}:15020"\n'
        f'readiness = "{ip}:15021"\nplaintext = "{ip}:15006"\n'
        f'[identity]\nca_dir = "{ca}"\n'
        f'[discovery]\nmdns = false\npeers = [{peer_list}]\nrefresh = "1s"\n'
        f'[log]\nlevel = "warning"\naccess_log = false\n'
        f'[policy]\ndir = "{pol}"\n' + body
    )
    return cfg


def print_aligned(lines: list[list[str]]) -> None:
    """A text table: the first row is the header (underlined), the first column left-aligned."""
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    for i, r in enumerate(lines):
        print("  ".join(x.ljust(widths[j]) if j == 0 else x.rjust(widths[j]) for j, x in enumerate(r)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def py_spy_record(
    pids: dict[str, int], seconds: float, rate: int, output: Callable[[str], Path], load: Callable[[], T]
) -> tuple[T, dict[str, Path]] | None:
    """Run `load` while `py-spy record` (non-blocking, raw format) samples each process; None if py-spy
    is not installed. Returns the load's result and each role's raw output file."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        print("  --profile: py-spy not found (.venv/bin/pip install py-spy); skipped")
        return None
    spies = {}
    for role, pid in pids.items():
        out = output(role)
        cmd = [pyspy, "record", "--pid", str(pid), "--nonblocking", "--rate", str(rate)]
        cmd += ["--duration", str(int(seconds)), "--format", "raw", "--output", str(out)]
        spies[role] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
    time.sleep(0.5)  # py-spy attaches
    try:
        result = load()
    finally:
        for p, _ in spies.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
    return result, {role: out for role, (_, out) in spies.items() if out.exists()}


def py_spy_leaves(raw: Path) -> Iterator[tuple[str, str, int]]:
    """(function, file, samples) of the innermost frame of each stack in a py-spy raw file."""
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        yield leaf.split(" (")[0], leaf.split(" (")[-1].split(":")[0].rstrip(")"), int(n)


def short_function(func: str, where: str) -> str:
    """`func (dir/file.py)`: the last two parts of the file path."""
    return f"{func} ({'/'.join(where.split('/')[-2:])})"
