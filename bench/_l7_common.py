"""Helpers for bench/l7.py: nginx configs, the HTTP load generator (wrk or h2load) and its output parsers.

Everything here binds and dials loopback addresses only; every wait is bounded in time.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

WRK = shutil.which("wrk")
H2LOAD = shutil.which("h2load")
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)
BODY = "meshd l7 bench: a small static response from the backend nginx\n"  # 64 bytes


# ---------------------------------------------------------------------------------------------------
# nginx (Debian `nginx`): our own instance, `daemon off`, everything under a prefix in the work dir


def _nginx_common(prefix: Path, workers: str) -> str:
    # As root the workers would switch to `nobody`, who cannot read the 0700 work dir: stay root then.
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = "".join(
        f"{k}_temp_path {prefix}/tmp-{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"daemon off;\nmaster_process on;\nworker_processes {workers};\n{user}"
        f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        "  access_log off;\n"
        "  keepalive_requests 1000000;\n  keepalive_timeout 120s;\n"
        f"  {temps}"
    )


def nginx_backend_conf(prefix: Path, listen: list[str], workers: str) -> Path:
    """The backend: a fixed 64-byte 200 from memory (`return`), no disk, no logging."""
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        _nginx_common(prefix, workers)
        + "  server {\n"
        + "".join(f"    listen {a};\n" for a in listen)
        + "    location = /__nginx_status { stub_status; }\n"
        + '    location / {\n      default_type text/plain;\n      return 200 "'
        + BODY.replace("\n", "\\n")
        + '";\n'
        "    }\n  }\n}\n"
    )
    return conf


def nginx_proxy_conf(prefix: Path, listen: str, backend: str, workers: str) -> Path:
    """The yardstick reverse proxy: `proxy_pass` with pooled keep-alive connections to the backend."""
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        _nginx_common(prefix, workers) + f"  upstream backend {{\n    server {backend};\n    keepalive 64;\n"
        "    keepalive_requests 1000000;\n  }\n"
        f"  server {{\n    listen {listen};\n    location / {{\n      proxy_pass http://backend;\n"
        '      proxy_http_version 1.1;\n      proxy_set_header Connection "";\n    }\n  }\n}\n'
    )
    return conf


def nginx_grpc_proxy_conf(prefix: Path, listen: str, backend: str, workers: str) -> Path:
    """The HTTP/2 yardstick: h2c in, `grpc_pass` (HTTP/2 with pooled connections) to the backend's h2c port."""
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        _nginx_common(prefix, workers) + f"  upstream backend {{\n    server {backend};\n    keepalive 64;\n"
        "    keepalive_requests 1000000;\n  }\n"
        f"  server {{\n    listen {listen} http2;\n    location / {{\n      grpc_pass grpc://backend;\n    }}\n  }}\n}}\n"
    )
    return conf


def nginx_cmd(prefix: Path, conf: Path) -> list[str]:
    assert NGINX is not None
    return [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]


def backend_accepts(host: str, port: int) -> int | None:
    """Connections the backend nginx has accepted so far (stub_status), or None if unreadable."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/__nginx_status", timeout=2) as r:
            m = re.search(r"^\s*(\d+)\s+\d+\s+\d+\s*$", r.read().decode(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (all processes, all cores)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    hz = os.sysconf("SC_CLK_TCK")
    return (total - idle) / hz, total / hz


def children(pid: int) -> list[int]:
    """Direct children of a process (nginx's workers), from /proc/<pid>/task/*/children."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


# ---------------------------------------------------------------------------------------------------
# load generator


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int = 0
    socket_errors: int = 0
    loadgen_cpu_s: float = 0.0
    raw: str = field(default="", repr=False)


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot read latency {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(out: str) -> Load:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"cannot parse wrk output:\n{out[-2000:]}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return Load(
        rps=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        requests=int(total.group(1)),
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(x) for x in sock.groups()) if sock else 0,
        raw=out,
    )


def parse_h2load(out: str, pct: dict[str, float]) -> Load:
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(
        r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out
    )
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not (rps and done and codes and pct):
        raise RuntimeError(f"cannot parse h2load output:\n{out[-2000:]}")
    return Load(
        rps=float(rps.group(1)),
        p50_ms=pct["50"],
        p99_ms=pct["99"],
        requests=int(done.group(1)),
        non_2xx=int(codes.group(3)) + int(codes.group(4)),
        socket_errors=int(done.group(3)) + int(done.group(4)),
        raw=out,
    )


def _h2load_percentiles(log: Path) -> dict[str, float]:
    """p50/p99 from h2load's per-request log (`--log-file`: start, status, duration in us)."""
    durs: list[float] = []
    if log.exists():
        for line in log.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[2].strip().isdigit():
                durs.append(int(parts[2]) / 1000)
    if not durs:
        return {}
    durs.sort()
    return {"50": durs[len(durs) // 2], "99": durs[min(len(durs) - 1, int(len(durs) * 0.99))]}


def which_loadgen(prefer: str) -> str | None:
    if prefer in ("wrk", "auto") and WRK:
        return "wrk"
    if prefer in ("h2load", "auto") and H2LOAD:
        return "h2load"
    return None


def run_load(
    tool: str,
    url: str,
    seconds: float,
    threads: int,
    conns: int,
    work: Path,
    h2_streams: int = 0,
    grpc_body: Path | None = None,
) -> Load:
    """Keep-alive HTTP/1.1 load for `seconds` (HTTP/2 prior knowledge with h2load when `h2_streams`:
    that many concurrent streams per connection; with `grpc_body`, each request a gRPC call: POST of
    that length-prefixed message with gRPC's headers). The load generator's own CPU comes from wait4's
    rusage."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    log = work / "h2load-requests.log"
    if h2_streams:
        tool = "h2load"
    if tool == "wrk":
        cmd = [
            WRK or "wrk",
            f"-t{threads}",
            f"-c{conns}",
            f"-d{seconds:g}s",
            "--latency",
            "--timeout",
            "10s",
            url,
        ]
    else:
        log.unlink(missing_ok=True)
        cmd = [
            H2LOAD or "h2load",
            *(("-m", str(h2_streams)) if h2_streams else ("--h1",)),
            *(
                ("-d", str(grpc_body), "-H", "content-type: application/grpc", "-H", "te: trailers")
                if grpc_body is not None
                else ()
            ),
            f"-t{threads}",
            f"-c{conns}",
            f"-D{seconds:g}",
            "--log-file",
            str(log),
            url,
        ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"{tool} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-1000:]}")
    load = parse_wrk(p.stdout) if tool == "wrk" else parse_h2load(p.stdout, _h2load_percentiles(log))
    load.loadgen_cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return load
