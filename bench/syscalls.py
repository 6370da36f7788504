"""Syscalls per request on the node path (meshd-l4 of l7.py: wrk -> alpha -> HBONE -> beta -> nginx),
or with `--path meshd` on the waypoint path (wrk -> alpha -> HBONE -> wp -> HBONE -> beta -> nginx).

Counts, per HTTP request and per daemon, the epoll_wait calls (trio calls it once per scheduler
batch), epoll_ctl (one per wait registration), recvfrom (and how many failed with EAGAIN), sendto and
the kernel's context switches and the CPU time (task-clock), with `perf stat` on syscall tracepoints attached to each daemon while
wrk runs (strace -c slows a daemon so much that the races it counts, such as a recv that comes before
the data, change). Contention on the machine changes req/s but hardly these counts, so they compare
designs across runs. Usage:

    .venv/bin/python bench/syscalls.py [--connections 1,50] [--seconds 5] [--path meshd-l4|meshd]

To compare with another checkout's meshd, run this script with that checkout's venv python: the
daemons are started as `sys.executable -m meshd`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c
import _l7_common as h
import l7
from l4 import Procs, meshd

# (column, perf event, filter): recvfrom's exits with ret == -EAGAIN are the reads that found nothing.
EVENTS = (
    ("epoll_wait", "syscalls:sys_enter_epoll_wait", None),
    ("epoll_ctl", "syscalls:sys_enter_epoll_ctl", None),
    ("recvfrom", "syscalls:sys_enter_recvfrom", None),
    ("recv EAGAIN", "syscalls:sys_exit_recvfrom", "ret == -11"),
    ("sendto", "syscalls:sys_enter_sendto", None),
    ("ctx switches", "context-switches", None),
    ("CPU us", "task-clock", None),  # perf reports milliseconds; shown as microseconds per request
)


SCALE = {"task-clock": 1000}  # perf reports milliseconds; shown as microseconds
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def kernel_seconds(pid: int) -> float:
    """CPU the kernel spent for this process (stime, /proc/PID/stat field 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / CLOCK_TICK


def perf_counts(text: str) -> dict[str, float]:
    """`perf stat -x,` lines -> {event: count} (an event perf could not count is left out)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and re.fullmatch(r"[\d.]+", parts[0]):
            out[parts[2]] = out.get(parts[2], 0.0) + float(parts[0])
    return out


def measure(pids: dict[str, int], url: str, conns: int, seconds: float, work: Path) -> list[list[str]]:
    tracers = {}
    for name, pid in pids.items():
        log = work / f"perf-{name}-{conns}.txt"
        cmd = ["perf", "stat", "-x,", "-o", str(log), "-p", str(pid)]
        for _col, event, flt in EVENTS:
            cmd += ["-e", event] + (["--filter", flt] if flt else [])
        tracers[name] = (subprocess.Popen(cmd, stderr=subprocess.DEVNULL), log)
    time.sleep(0.3)  # perf attaches asynchronously; a request before that is simply not counted
    kernel_before = {name: kernel_seconds(pid) for name, pid in pids.items()}
    load = h.run_load("wrk", url, seconds, min(2, conns), conns, work)
    kernel = {name: kernel_seconds(pid) - kernel_before[name] for name, pid in pids.items()}
    rows = []
    for name, (tracer, log) in tracers.items():
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
        counts = perf_counts(log.read_text())
        per = load.requests or 1
        row = [f"-c{conns}", name, f"{load.rps:.0f}"]
        row += [f"{counts.get(event, 0.0) * SCALE.get(event, 1) / per:.2f}" for _col, event, _flt in EVENTS]
        row.append(f"{kernel[name] * 1e6 / per:.2f}")
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", default="1,50", help="wrk -c values, comma-separated [1,50]")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each traced run [5]")
    ap.add_argument(
        "--path",
        choices=("meshd-l4", "meshd"),
        default="meshd-l4",
        help="node path or waypoint path [meshd-l4]",
    )
    args = ap.parse_args()
    if shutil.which("perf") is None or h.WRK is None or h.NGINX is None:
        print(
            "ERROR: needs perf, wrk and nginx (apt-get install linux-perf wrk nginx-light)", file=sys.stderr
        )
        return 2
    work = Path(tempfile.mkdtemp(prefix="meshd-bench-syscalls-"))
    procs = Procs()
    try:
        l7.start_nginx(
            procs,
            work,
            "nginx-backend",
            lambda p: h.nginx_backend_conf(
                p, [f"{l7.BETA_IP}:{l7.BACKEND_PORT}", f"{l7.BACKEND_L4_IP}:{l7.BACKEND_PORT}"], "1"
            ),
            (l7.BETA_IP, l7.BACKEND_PORT),
        )
        ca = work / "ca"
        meshd("ca", "init", "--dir", str(ca), "--trust-domain", l7.TD)
        pids = l7.start_meshd(procs, work, ca, 10_000_000)
        waypoint = args.path == "meshd"
        if waypoint:
            l7.probe_meshd()
        else:
            l7.probe_l4()
        port = l7.UPSTREAM_PORT if waypoint else l7.UPSTREAM_L4_PORT
        url = f"http://{l7.ALPHA_IP}:{port}/"
        h.run_load("wrk", url, 2.0, 2, 50, work)  # warm-up: pooled connections, caches
        lines = [["conns", "daemon", "req/s", *(f"{col}/req" for col, _e, _f in EVENTS), "kernel us/req"]]
        for conns in (int(n) for n in args.connections.split(",")):
            traced = {k: v for k, v in pids.items() if waypoint or k != "wp"}
            lines += measure(traced, url, conns, args.seconds, work)
        print(
            f"meshd from {sys.executable}, path {args.path}; perf stat on each daemon during wrk -cN -d{args.seconds:g}s"
        )
        c.print_aligned(lines)
        return 0
    finally:
        procs.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(c.main_with_cleanup(main))
