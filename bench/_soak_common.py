"""Helpers for bench/soak.py: backend servers, the mixed L4/L7 load, /proc samplers, the slope test, the plot.

Everything here binds and dials loopback addresses only; every loop is bounded in count and time.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.client
import os
import random
import select
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from meshd.tools.echo import EchoHandler, ThreadedServer

IO_TIMEOUT = 30.0  # no single socket operation may block longer than this
CHUNK = 64 * 1024  # L4 sends in chunks and reads back what has arrived in between (no echo deadlock)
L4_SIZES = (64, 1024, 16 * 1024, 256 * 1024, 1024 * 1024)  # bytes per echo transfer
L4_WEIGHTS = (4, 4, 3, 2, 1)
L7_SIZES = (0, 100, 1024, 16 * 1024)  # POST body bytes (echoed back) or GET /bytes/<n>
MAX_OPS_PER_S = 5000  # hard count bound of every load loop: duration x this


def check_loopback(host: str) -> str:
    if not host.startswith("127."):
        raise SystemExit(f"refusing non-loopback address {host!r}: the soak runs on 127.0.0.0/8 only")
    return host


# ---------------------------------------------------------------------------------------------------
# Backend (a child process, `soak.py _serve ...`): a threaded TCP echo and an HTTP/1.1 keep-alive server


def pattern(n: int) -> bytes:
    """The deterministic body of GET /bytes/<n>, so the client can check every byte."""
    unit = b"meshd-soak-0123456789abcdef\n"
    return (unit * (n // len(unit) + 1))[:n]


class HttpBackend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = 120  # an idle keep-alive connection is closed after this

    def log_message(self, format: str, *args: Any) -> None:
        pass

    disable_nagle_algorithm = True

    def _reply(self, body: bytes) -> None:
        # one write for head + body: two small writes would meet Nagle + delayed ACK (40 ms per request)
        head = f"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {len(body)}\r\n\r\n"
        self.wfile.write(head.encode() + body)

    def do_GET(self) -> None:
        try:
            n = min(int(self.path.rsplit("/", 1)[-1]), 1 << 24)
        except ValueError:
            n = 0
        self._reply(pattern(n))

    def do_POST(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        self._reply(self.rfile.read(min(n, 1 << 24)))


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    block_on_close = False


def serve(echo: Sequence[tuple[str, int]], web: tuple[str, int]) -> None:
    """Child-process entry: serve until stdin closes (the parent exited or is done)."""
    for host, _ in (*echo, web):
        check_loopback(host)
    threading.stack_size(256 * 1024)
    servers: list[Any] = [ThreadedServer(a, EchoHandler) for a in echo]
    servers.append(_HttpServer(web, HttpBackend))
    for s in servers:
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    with contextlib.suppress(KeyboardInterrupt):
        sys.stdin.read()
    for s in servers:
        s.shutdown()
        s.server_close()


# ---------------------------------------------------------------------------------------------------
# Counters shared by the load threads and the sampler


@dataclass
class Counters:
    lock: threading.Lock = field(default_factory=threading.Lock)
    l4_ok: int = 0
    l4_err: int = 0
    l4_bytes: int = 0  # payload bytes echoed back intact (counted once per transfer)
    l7_ok: int = 0
    l7_err: int = 0
    l7_bytes: int = 0  # request + response body bytes of good exchanges
    churn_ok: int = 0  # L4 transfers to the service on the churned peer (part of l4_*)
    churn_err: int = 0
    bytes_sent: int = 0  # payload of every transfer/request attempted
    bytes_lost: int = 0  # bytes of transfers that ended cleanly but short or different (silent loss)
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)
    losses: list[tuple[float, str, str]] = field(default_factory=list)  # (monotonic time, kind, detail)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {
                k: getattr(self, k)
                for k in (
                    "l4_ok",
                    "l4_err",
                    "l4_bytes",
                    "l7_ok",
                    "l7_err",
                    "l7_bytes",
                    "churn_ok",
                    "churn_err",
                    "bytes_sent",
                    "bytes_lost",
                )
            }

    def error(self, kind: str, detail: str, lost: bool = False) -> None:
        with self.lock:
            self.kinds[kind] += 1
            self.examples.setdefault(kind, detail[:300])
            if lost and len(self.losses) < 100:  # bounded: when each loss happened, to line up with churn
                self.losses.append((time.monotonic(), kind, detail[:300]))


def _connect(addr: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(addr, timeout=IO_TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def echo_transfer(addr: tuple[str, int], payload: bytes) -> bytes:
    """One connection: send `payload` in chunks (reading back what has arrived in between), half-close,
    read to EOF. Returns what came back."""
    got = bytearray()
    view = memoryview(payload)
    with _connect(addr) as s:
        poller = select.poll()
        poller.register(s, select.POLLIN)
        for off in range(0, len(payload), CHUNK):
            s.sendall(view[off : off + CHUNK])
            for _ in range(64):  # what is readable now, bounded
                if not poller.poll(0):
                    break
                data = s.recv(1 << 18)
                if not data:
                    return bytes(got)
                got += data
        s.shutdown(socket.SHUT_WR)
        for _ in range(len(payload) // 512 + 64):  # recv returns >= 1 byte or EOF; bounded anyway
            data = s.recv(1 << 18)
            if not data:
                break
            got += data
    return bytes(got)


def l4_worker(
    counters: Counters,
    steady: tuple[str, int],
    churned: tuple[str, int],
    churn_share: float,
    deadline: float,
    stop: threading.Event,
    seed: int,
) -> None:
    """Echo transfers of varied sizes, one new connection each, hash-checked, until `deadline`."""
    rng = random.Random(seed)
    max_ops = int((deadline - time.monotonic()) * MAX_OPS_PER_S) + 1
    for _ in range(max_ops):
        if stop.is_set() or time.monotonic() >= deadline:
            return
        size = rng.choices(L4_SIZES, L4_WEIGHTS)[0]
        to_churned = rng.random() < churn_share
        addr = churned if to_churned else steady
        payload = rng.randbytes(size)
        try:
            back = echo_transfer(addr, payload)
        except (OSError, ValueError) as exc:
            kind = f"l4 {type(exc).__name__}" + (" (churned peer)" if to_churned else "")
            counters.error(kind, repr(exc))
            with counters.lock:
                counters.l4_err += 1
                counters.churn_err += to_churned
                counters.bytes_sent += size
            time.sleep(0.05)  # do not spin on a refusing listener
            continue
        ok = hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
        lost = 0
        kind = ""
        if not ok:
            if not back:
                kind = "l4 closed before any byte came back"  # refused by the mesh: an error, not a loss
            elif payload.startswith(back):
                kind, lost = "l4 TRUNCATED (clean EOF)", size - len(back)
            else:
                kind, lost = "l4 CORRUPTED", size
            counters.error(
                kind + (" (churned peer)" if to_churned else ""), f"{len(back)} of {size} bytes", lost > 0
            )
        with counters.lock:
            counters.bytes_sent += size
            counters.bytes_lost += lost
            if ok:
                counters.l4_ok += 1
                counters.l4_bytes += size
                counters.churn_ok += to_churned
            else:
                counters.l4_err += 1
                counters.churn_err += to_churned
        if not ok:
            time.sleep(0.05)


def l7_worker(
    counters: Counters,
    addr: tuple[str, int],
    per_conn: int,
    deadline: float,
    stop: threading.Event,
    seed: int,
) -> None:
    """HTTP/1.1 keep-alive requests through the waypoint path: POST (echoed) and GET (a known pattern),
    every body checked; each connection is closed after `per_conn` requests (connection churn)."""
    rng = random.Random(seed)
    conn: http.client.HTTPConnection | None = None
    on_conn = 0
    max_ops = int((deadline - time.monotonic()) * MAX_OPS_PER_S) + 1
    for i in range(max_ops):
        if stop.is_set() or time.monotonic() >= deadline:
            break
        if conn is None:
            conn = http.client.HTTPConnection(addr[0], addr[1], timeout=IO_TIMEOUT)
            on_conn = 0
            try:
                conn.connect()
                assert conn.sock is not None
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                counters.error(f"l7 connect {type(exc).__name__}", repr(exc))
                with counters.lock:
                    counters.l7_err += 1
                conn.close()
                conn = None
                time.sleep(0.05)
                continue
        size = rng.choice(L7_SIZES)
        post = rng.random() < 0.7
        body = rng.randbytes(size) if post else b""
        want = body if post else pattern(size)
        try:
            if post:
                conn.request("POST", f"/echo/{i}", body=body, headers={"content-type": "x/y"})
            else:
                conn.request("GET", f"/bytes/{size}")
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            counters.error(f"l7 {type(exc).__name__}", repr(exc))
            with counters.lock:
                counters.l7_err += 1
                counters.bytes_sent += len(body)
            conn.close()
            conn = None
            time.sleep(0.05)
            continue
        on_conn += 1
        lost = 0
        if resp.status != 200:
            ok = False
            counters.error(f"l7 HTTP {resp.status}", data[:200].decode(errors="replace"))
        elif data != want:
            ok = False
            lost = len(want)
            counters.error("l7 BODY MISMATCH", f"{len(data)} of {len(want)} bytes", True)
        else:
            ok = True
        with counters.lock:
            counters.bytes_sent += len(body)
            counters.bytes_lost += lost
            if ok:
                counters.l7_ok += 1
                counters.l7_bytes += len(body) + len(want)
            else:
                counters.l7_err += 1
        if on_conn >= per_conn or resp.will_close or not ok:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


# ---------------------------------------------------------------------------------------------------
# /proc readers


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------
# The slope test

# (metric, absolute floor, fraction of the level): a metric "grows without bound" when its robust slope
# over the run's second half, projected over that window, exceeds max(floor, fraction x median level),
# and the last quarter of the window really sits above the first (not one late outlier). See bench/README.md.
LIMITS: dict[str, tuple[float, float]] = {
    "rss_mib": (12.0, 0.15),
    "fds": (16.0, 0.25),
    "tasks": (32.0, 0.25),
}


def theil_sen(ts: Sequence[float], ys: Sequence[float], max_points: int = 600) -> float:
    """Median of pairwise slopes (robust to outliers and steps); thinned to `max_points` for long runs."""
    if len(ts) < 2:
        return 0.0
    step = max(1, len(ts) // max_points)
    pts = list(zip(ts[::step], ys[::step], strict=True))
    slopes = [(y2 - y1) / (t2 - t1) for i, (t1, y1) in enumerate(pts) for t2, y2 in pts[i + 1 :] if t2 > t1]
    return statistics.median(slopes) if slopes else 0.0


def ols(ts: Sequence[float], ys: Sequence[float]) -> float:
    if len(ts) < 2:
        return 0.0
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den if den else 0.0


def slope_test(ts_s: Sequence[float], ys: Sequence[float], metric: str) -> dict[str, Any]:
    """Slope (per minute) over the second half of the run, and whether it means unbounded growth."""
    pts = [(t / 60, y) for t, y in zip(ts_s, ys, strict=True) if y is not None]
    if len(pts) < 4:
        return {"grows": False, "note": "too few samples"}
    t_end = pts[-1][0]
    mid = pts[0][0] + (t_end - pts[0][0]) / 2
    half = [(t, y) for t, y in pts if t >= mid]
    ts, vs = [t for t, _ in half], [y for _, y in half]
    window = ts[-1] - ts[0]
    slope = theil_sen(ts, vs)
    floor, frac = LIMITS[metric]
    level = statistics.median(vs)
    allowed = max(floor, frac * level)
    q = max(1, len(vs) // 4)
    rise = statistics.median(vs[-q:]) - statistics.median(vs[:q])
    grows = slope * window > allowed and rise > allowed / 2
    return {
        "start": pts[0][1],
        "end": pts[-1][1],
        "min": min(y for _, y in pts),
        "max": max(y for _, y in pts),
        "second_half_start": vs[0],
        "slope_per_min": slope,
        "ols_slope_per_min": ols(ts, vs),
        "window_min": window,
        "projected_growth": slope * window,
        "allowed_growth": allowed,
        "last_minus_first_quarter": rise,
        "grows": grows,
    }


# ---------------------------------------------------------------------------------------------------
# The plot


def plot(doc: dict[str, Any], out: Path, daemons: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = doc["samples"]
    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(5, 1, figsize=(10, 13), sharex=True)
    half = t[-1] / 2 if t else 0

    def series(d: str, key: str, scale: float = 1.0) -> list[float]:
        return [
            (s["daemons"][d][key] / scale if s["daemons"].get(d, {}).get(key) is not None else float("nan"))
            for s in samples
        ]

    panels: list[tuple[str, Callable[[Any], None]]] = []

    def rss(ax: Any) -> None:
        for d in daemons:
            ax.plot(t, series(d, "rss_kib", 1024), label=d)

    def fds(ax: Any) -> None:
        for d in daemons:
            ax.plot(t, series(d, "fds"), label=d)

    def tasks(ax: Any) -> None:
        for d in daemons:
            ax.plot(t, series(d, "tasks"), label=d)

    def thr(ax: Any) -> None:
        ax.plot(t, [s["l4_mbps"] for s in samples], label="L4 echo MB/s", color="tab:blue")
        ax.set_ylabel("L4 MB/s")
        ax2 = ax.twinx()
        ax2.plot(t, [s["l7_rps"] for s in samples], label="L7 req/s", color="tab:orange")
        ax2.set_ylabel("L7 req/s")
        ax2.set_ylim(bottom=0)
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right", fontsize=8)

    def err(ax: Any) -> None:
        ax.plot(t, [100 * s["steady_error_rate"] for s in samples], label="steady paths (beta, waypoint)")
        ax.plot(t, [100 * s["churn_error_rate"] for s in samples], label="to the restarted peer (gamma)")

    panels = [
        ("RSS (MiB)", rss),
        ("open fds", fds),
        ("trio tasks", tasks),
        ("throughput", thr),
        ("errors (% of ops)", err),
    ]
    for ax, (label, fn) in zip(axes, panels, strict=True):
        fn(ax)
        if label != "throughput":
            ax.set_ylabel(label)
            ax.legend(loc="upper left", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.axvspan(half, t[-1] if t else 0, color="0.93", zorder=0)
        for r in doc["churn"]["restarts"]:
            ax.axvline(r["t"] / 60, color="0.6", linestyle=":", linewidth=0.8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes (shaded: second half, where the slope test runs; dotted: gamma restarts)")
    v = doc["verdict"]
    fig.suptitle(
        f"meshd soak {doc['when']}: {doc['duration_s'] / 60:.1f} min, verdict {v.upper()}"
        + (f" ({'; '.join(doc['failures'])[:90]})" if doc["failures"] else ""),
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
