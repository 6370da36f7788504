"""L4 benchmark: direct TCP vs a stunnel mutual-TLS pair vs meshd node -> node, side by side in one run.

All on loopback (127.55.0.0/24). See bench/README.md for what each figure means. Usage:

    .venv/bin/python bench/l4.py [--quick] [--repeat N] [--seconds S] [--profile]

Writes bench/results/l4-<timestamp>.json and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

NET = "127.55.0"
ALPHA_IP = f"{NET}.2"  # meshd alpha: upstream listeners
BETA_IP = f"{NET}.3"  # meshd beta; also where the target workload (sink + echo) listens
STUNNEL_C_IP = f"{NET}.4"  # stunnel client side (accepts plaintext)
STUNNEL_S_IP = f"{NET}.5"  # stunnel server side (accepts TLS)
SINK_PORT, ECHO_PORT = 7001, 7000
IPERF_PORT = 5201  # iperf3's server on the target host (--iperf3): each path carries it too
TD = "bench.arpa"
STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
IPERF3 = shutil.which("iperf3")


@dataclass
class Path_:
    """One measured path: where its sink and echo are reached, and which processes do the proxying."""

    name: str
    sink: tuple[str, int]
    echo: tuple[str, int]
    proxies: dict[str, int]  # role -> pid (empty for direct)
    endpoints: dict[str, int]  # load generator + target server pids
    iperf: tuple[str, int]  # where iperf3's client dials for this path
    samples: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    cpu_proxy: float = 0.0
    cpu_endpoints: float = 0.0
    bytes_moved: int = 0
    cpu_share: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))


class Procs:
    """Every child process this run starts; all are stopped in `close()` (try/finally, Ctrl-C too)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            p = subprocess.Popen(cmd, stdout=kw.pop("stdout", out), stderr=out, **kw)
        self.procs.append((name, p))
        return p

    def close(self) -> None:
        for _name, p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _name, p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(what: str, cond: Any, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited {proc.returncode}\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError, ValueError, KeyError):
            if cond():
                return
        time.sleep(0.05)  # polling the condition itself, not a stand-in for it
    raise RuntimeError(f"{what}: not met within {timeout}s\n{log.read_text()[-3000:]}")


# ---------------------------------------------------------------------------------------------------
# set-up


def meshd(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "meshd", *args], check=True, capture_output=True, timeout=60)


def start_targets(procs: Procs, work: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_serve", BETA_IP, str(SINK_PORT), str(ECHO_PORT)]
    p = procs.start("targets", cmd, work / "targets.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdout is not None
    line = p.stdout.readline()
    if line.strip() != b"ready":
        raise RuntimeError(f"target servers failed: {(work / 'targets.log').read_text()}")
    return p


def start_stunnel(procs: Procs, work: Path, ca: Path) -> dict[str, int]:
    for who in ("stunnel-client", "stunnel-server"):
        meshd(
            "ca",
            "issue",
            "--dir",
            str(ca),
            "--id",
            f"spiffe://{TD}/ns/bench/sa/{who}",
            "--out",
            str(work / who),
        )
    pids = {}
    for who, listen_ip, to_ip, port_off, to_off, client in (
        ("stunnel-server", STUNNEL_S_IP, BETA_IP, 28000, 7000, "no"),
        ("stunnel-client", STUNNEL_C_IP, STUNNEL_S_IP, 27000, 28000, "yes"),
    ):
        d = work / who
        services = ""
        for svc, port in (("echo", ECHO_PORT), ("sink", SINK_PORT), ("iperf", IPERF_PORT)):
            to_port = to_off + port % 1000 if client == "yes" else port  # the server dials the real port
            services += (
                f"[{svc}]\nclient = {client}\naccept = {listen_ip}:{port_off + port % 1000}\n"
                f"connect = {to_ip}:{to_port}\n"
                f"cert = {d}/cert.pem\nkey = {d}/key.pem\nCAfile = {d}/ca.crt\n"
                "verifyChain = yes\nsslVersionMin = TLSv1.3\n"
                "socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
            )
        conf = work / f"{who}.conf"
        conf.write_text(f"foreground = yes\npid =\nsyslog = no\ndebug = err\n{services}")
        assert STUNNEL is not None
        p = procs.start(who, [STUNNEL, str(conf)], work / f"{who}.log")
        pids[who] = p.pid
        addr = (listen_ip, port_off + ECHO_PORT % 1000)
        wait_until(f"{who} listening", lambda a=addr: c._connect(a).close() is None, p, work / f"{who}.log")
    return pids


def node_config(name: str, ip: str, ca: Path, peer: str, body: str, work: Path) -> Path:
    pol = work / f"{name}-policy"
    pol.mkdir(exist_ok=True)
    cfg = work / f"{name}.toml"
    cfg.write_text(
        f'trust_domain = "{TD}"\nnode_name = "{name}"\n'
        f'[listen]\nhbone = "{ip}:15008"\nadmin = "{ip}:15000"\nmetrics = "{ip}:15020"\n'
        f'readiness = "{ip}:15021"\nplaintext = "{ip}:15006"\n'
        f'[identity]\nca_dir = "{ca}"\n'
        f'[discovery]\nmdns = false\npeers = ["{peer}:15008"]\nrefresh = "1s"\n'
        f'[log]\nlevel = "warning"\naccess_log = false\n'
        f'[policy]\ndir = "{pol}"\n' + body
    )
    return cfg


def start_meshd(procs: Procs, work: Path, ca: Path) -> dict[str, int]:
    alpha = node_config(
        "alpha",
        ALPHA_IP,
        ca,
        BETA_IP,
        f'[[workload]]\nname = "client"\naddress = "{ALPHA_IP}"\nports = [8000]\n'
        + "".join(
            f'[[upstream]]\nservice = "target.default"\nport = {p}\nlisten = "{ALPHA_IP}:1{p}"\n'
            for p in (ECHO_PORT, SINK_PORT, IPERF_PORT)
        ),
        work,
    )
    beta = node_config(
        "beta",
        BETA_IP,
        ca,
        ALPHA_IP,
        f'[[workload]]\nname = "target"\naddress = "{BETA_IP}"\nports = [{ECHO_PORT}, {SINK_PORT}, {IPERF_PORT}]\n'
        f'services = ["target"]\n'
        f'[[service]]\nname = "target"\nports = [{{ port = {ECHO_PORT} }}, {{ port = {SINK_PORT} }}, '
        f"{{ port = {IPERF_PORT} }}]\n",
        work,
    )
    pids = {}
    started = {}
    for name, cfg, ip in (("beta", beta, BETA_IP), ("alpha", alpha, ALPHA_IP)):
        log = work / f"meshd-{name}.log"
        started[name] = (
            procs.start(f"meshd-{name}", [sys.executable, "-m", "meshd", "run", "-c", str(cfg)], log),
            ip,
            log,
        )
        pids[name] = started[name][0].pid
    for name, (p, ip, log) in started.items():
        url = f"http://{ip}:15021/healthz/ready"
        wait_until(f"meshd {name} ready", lambda u=url: http_get(u)[0] == 200, p, log)
    p, ip, log = started["alpha"]

    def catalog_lists_target() -> bool:
        dump = json.loads(http_get(f"http://{ip}:15000/config_dump")[1])
        return "target.default" in dump["catalog"]["services"]

    wait_until("alpha's catalog lists target.default", catalog_lists_target, p, log)
    return pids


# ---------------------------------------------------------------------------------------------------
# measurement


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    return {k: (c.cpu_seconds(pid) if pid != os.getpid() else sum(os.times()[:2])) for k, pid in pids.items()}


def measure_bulk(path: Path_, conns: int, args: argparse.Namespace) -> None:
    before_p, before_e = cpu_of(path.proxies), cpu_of(path.endpoints)
    n, secs = c.bulk(path.sink, conns, args.seconds, args.max_mib << 20)
    after_p, after_e = cpu_of(path.proxies), cpu_of(path.endpoints)
    path.samples[f"mbps_{conns}"].append(n / secs / 1e6)
    path.bytes_moved += n
    path.cpu_proxy += sum(after_p[k] - before_p[k] for k in after_p)
    path.cpu_endpoints += sum(after_e[k] - before_e[k] for k in after_e)
    for k in after_p:
        path.cpu_share[f"{k}_{conns}"].append((after_p[k] - before_p[k]) / secs)
    path.cpu_share[f"endpoints_{conns}"].append(sum(after_e[k] - before_e[k] for k in after_e) / secs)


def iperf3_gbps(addr: tuple[str, int], streams: int, seconds: float) -> float:
    """`iperf3 -c` through a path: Gbit/s the server received (JSON end.sum_received)."""
    assert IPERF3 is not None
    host, port = addr
    cmd = [IPERF3, "-c", host, "-p", str(port), "-t", f"{seconds:g}", "-P", str(streams), "-J"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    report = json.loads(out.stdout or "{}")
    if out.returncode != 0 or "error" in report:
        raise RuntimeError(f"iperf3 to {host}:{port} failed: {report.get('error') or out.stderr.strip()}")
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9


def measure_round(path: Path_, args: argparse.Namespace) -> None:
    if args.iperf3:
        for streams in (1, 4):
            path.samples[f"iperf3_gbps_{streams}"].append(iperf3_gbps(path.iperf, streams, args.seconds))
    for conns in (1, 4):
        measure_bulk(path, conns, args)
    lat = c.percentiles(c.latency(path.echo, args.rounds))
    path.samples["p50_us"].append(lat.p50)
    path.samples["p99_us"].append(lat.p99)
    path.samples["conn_per_s"].append(c.conn_rate(path.echo, args.conn_seconds, args.conn_max))


def idle_growth(path: Path_, count: int) -> dict[str, Any]:
    before = {k: c.status_kib(pid, "VmRSS") for k, pid in path.proxies.items()}
    socks = c.hold_idle(path.echo, count)
    try:
        time.sleep(1.0)  # let the daemons settle (buffers, GC) before reading RSS
        after = {k: c.status_kib(pid, "VmRSS") for k, pid in path.proxies.items()}
    finally:
        for s in socks:
            s.close()
    return {
        k: {
            "before_kib": before[k],
            "after_kib": after[k],
            "growth_mib": (after[k] - before[k]) / 1024,
            "kib_per_tunnel": (after[k] - before[k]) / count,
        }
        for k in before
    }


def profile(path: Path_, args: argparse.Namespace, stamp: str) -> dict[str, list[tuple[str, float]]]:
    """py-spy record (non-blocking) on each meshd while one bulk stream runs; top self-time functions."""
    secs = max(3.0, args.seconds)
    recorded = c.py_spy_record(
        path.proxies,
        secs,
        250,
        lambda role: RESULTS / f"l4-{stamp}-pyspy-{role}.txt",
        lambda: c.bulk(path.sink, 1, secs, 0),
    )
    if recorded is None:
        return {}
    top: dict[str, list[tuple[str, float]]] = {}
    for role, raw in recorded[1].items():
        self_time: collections.Counter[str] = collections.Counter()
        for func, where, n in c.py_spy_leaves(raw):
            self_time[c.short_function(func, where)] += n
        total = sum(self_time.values())
        top[role] = [(f, 100 * n / max(total, 1)) for f, n in self_time.most_common(8)]
    return top


# ---------------------------------------------------------------------------------------------------
# report


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(path: Path_, args: argparse.Namespace) -> dict[str, Any]:
    gb = path.bytes_moved / 1e9
    out: dict[str, Any] = {k: med(v) for k, v in path.samples.items()}
    out["samples"] = {k: v for k, v in path.samples.items()}
    out["cpu_s_per_gb_proxies"] = path.cpu_proxy / gb if path.proxies and gb else None
    out["cpu_s_per_gb_endpoints"] = path.cpu_endpoints / gb if gb else None
    out["cpu_cores_busy"] = {k: med(v) for k, v in path.cpu_share.items()}
    out["peak_rss_mib"] = {k: c.status_kib(pid, "VmHWM") / 1024 for k, pid in path.proxies.items()}
    return out


ROWS = [
    ("iperf3_gbps_1", "iperf3, 1 stream (Gbit/s)", "{:.2f}"),
    ("iperf3_gbps_4", "iperf3, 4 streams (Gbit/s)", "{:.2f}"),
    ("mbps_1", "throughput, 1 conn (MB/s)", "{:.0f}"),
    ("mbps_4", "throughput, 4 conns (MB/s)", "{:.0f}"),
    ("p50_us", "100 B round trip p50 (us)", "{:.0f}"),
    ("p99_us", "100 B round trip p99 (us)", "{:.0f}"),
    ("conn_per_s", "connect+1 RTT+close (/s)", "{:.0f}"),
    ("cpu", "proxy CPU s per GB", "{:.2f}"),
    ("rss", "peak RSS per daemon (MiB)", "{:.1f}"),
]


def cell(res: dict[str, Any] | None, key: str, fmt: str) -> tuple[str, float | None]:
    if res is None:
        return "skipped", None
    if not res:
        return "not run", None
    if key == "cpu":
        v = res["cpu_s_per_gb_proxies"]
        if v is None:
            e = res["cpu_s_per_gb_endpoints"]
            return ("(" + fmt.format(e) + " ends)" if e is not None else "n/a"), None
        return fmt.format(v), v
    if key == "rss":
        rss = res["peak_rss_mib"]
        if not rss:
            return "n/a", None
        v = max(rss.values())
        return "/".join(fmt.format(x) for x in rss.values()), v
    v = res.get(key)
    return ("n/a" if v is None else fmt.format(v)), v


def print_table(results: dict[str, dict[str, Any] | None]) -> None:
    head = ["", "direct", "stunnel", "meshd", "meshd/stunnel", "meshd/direct"]
    lines = [head]
    for key, label, fmt in ROWS:
        row = [label]
        vals = {}
        for name in ("direct", "stunnel", "meshd"):
            text, vals[name] = cell(results.get(name, {}), key, fmt)
            row.append(text)
        for other in ("stunnel", "direct"):
            a, b = vals["meshd"], vals[other]
            row.append(f"{a / b:.2f}x" if a is not None and b else "-")
        lines.append(row)
    c.print_aligned(lines)


# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="~1 minute: 1 repeat, 2 s bulk phases, fewer samples"
    )
    ap.add_argument("--repeat", type=int, help="runs per figure; the median is reported [3, quick: 1]")
    ap.add_argument("--seconds", type=float, help="duration of each bulk phase [5, quick: 2]")
    ap.add_argument(
        "--max-mib", type=int, default=0, help="also stop each bulk connection after this many MiB"
    )
    ap.add_argument("--rounds", type=int, help="100 B round trips per latency run [5000, quick: 2000]")
    ap.add_argument("--conn-seconds", type=float, help="connection-rate phase length [2, quick: 1]")
    ap.add_argument("--conn-max", type=int, default=1000, help="connection-rate phase: at most this many")
    ap.add_argument("--idle", type=int, default=1000, help="idle tunnels held for the meshd RSS figure")
    ap.add_argument("--paths", default="direct,stunnel,meshd", help="comma-separated subset to run")
    ap.add_argument("--profile", action="store_true", help="py-spy the meshd daemons during one bulk run")
    ap.add_argument(
        "--iperf3",
        action="store_true",
        help="also measure iperf3 (-P 1 and -P 4, --seconds each) through every path (apt-get install iperf3)",
    )
    a = ap.parse_args(argv)
    q = a.quick
    a.repeat = a.repeat or (1 if q else 3)
    a.seconds = a.seconds or (2.0 if q else 5.0)
    a.rounds = a.rounds or (2000 if q else 5000)
    a.conn_seconds = a.conn_seconds or (1.0 if q else 2.0)
    return a


def run(args: argparse.Namespace) -> int:
    wanted = set(args.paths.split(","))
    stamp = time.strftime("%Y%m%dT%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="meshd-bench-"))
    procs = Procs()
    t_start = time.monotonic()
    load_before = os.getloadavg()
    try:
        ca = work / "ca"
        meshd("ca", "init", "--dir", str(ca), "--trust-domain", TD)
        targets = start_targets(procs, work)
        if args.iperf3:
            if IPERF3 is None:
                raise SystemExit("--iperf3 needs iperf3 (apt-get install iperf3)")
            server = procs.start(
                "iperf3", [IPERF3, "-s", "-B", BETA_IP, "-p", str(IPERF_PORT)], work / "iperf3.log"
            )
            wait_until(
                "iperf3 listening",
                lambda: c._connect((BETA_IP, IPERF_PORT)).close() is None,
                server,
                work / "iperf3.log",
            )
        ends = {"client": os.getpid(), "targets": targets.pid}
        paths: list[Path_] = []
        if "direct" in wanted:
            paths.append(
                Path_("direct", (BETA_IP, SINK_PORT), (BETA_IP, ECHO_PORT), {}, ends, (BETA_IP, IPERF_PORT))
            )
        stunnel_skipped = None
        if "stunnel" in wanted:
            if STUNNEL is None:
                stunnel_skipped = "stunnel4 not installed (apt-get install stunnel4)"
                print(f"NOTE: {stunnel_skipped}; the stunnel column is skipped.")
            else:
                pids = start_stunnel(procs, work, ca)
                paths.append(
                    Path_(
                        "stunnel",
                        (STUNNEL_C_IP, 27000 + SINK_PORT % 1000),
                        (STUNNEL_C_IP, 27000 + ECHO_PORT % 1000),
                        {"client": pids["stunnel-client"], "server": pids["stunnel-server"]},
                        ends,
                        (STUNNEL_C_IP, 27000 + IPERF_PORT % 1000),
                    )
                )
        if "meshd" in wanted:
            pids = start_meshd(procs, work, ca)
            paths.append(
                Path_(
                    "meshd",
                    (ALPHA_IP, 10000 + SINK_PORT),
                    (ALPHA_IP, 10000 + ECHO_PORT),
                    {"alpha": pids["alpha"], "beta": pids["beta"]},
                    ends,
                    (ALPHA_IP, 10000 + IPERF_PORT),
                )
            )
        for p in paths:  # warm-up: first connection (handshakes, pools), and bytes through each sink
            c.latency(p.echo, 50, warmup=0)
            c.bulk(p.sink, 1, 0.3, 0)
        print(
            f"set-up done in {time.monotonic() - t_start:.1f}s; measuring {[p.name for p in paths]}, "
            f"repeat={args.repeat}, bulk {args.seconds:g}s"
        )
        for r in range(args.repeat):
            for p in paths:  # interleaved, so drift over the run hits every path alike
                t = time.monotonic()
                measure_round(p, args)
                print(
                    f"  run {r + 1}/{args.repeat} {p.name:8s} {time.monotonic() - t:5.1f}s  "
                    + "  ".join(f"{k}={v[-1]:.0f}" for k, v in p.samples.items())
                )
        results: dict[str, dict[str, Any] | None] = {p.name: summarize(p, args) for p in paths}
        if stunnel_skipped:
            results["stunnel"] = None
        mesh = next((p for p in paths if p.name == "meshd"), None)
        idle = None
        if mesh is not None and args.idle:
            idle = idle_growth(mesh, args.idle)
        top = profile(mesh, args, stamp) if mesh is not None and args.profile else {}

        print()
        print_table(results)
        if idle:
            print(
                f"\nmeshd holding {args.idle} idle tunnels: "
                + "; ".join(
                    f"{k} RSS +{v['growth_mib']:.1f} MiB ({v['kib_per_tunnel']:.1f} KiB/tunnel)"
                    for k, v in idle.items()
                )
            )
        if mesh is not None and results.get("meshd"):
            busy = results["meshd"]["cpu_cores_busy"]  # type: ignore[index]
            print(
                f"CPU during meshd bulk (cores busy; nproc={os.cpu_count()}): "
                + ", ".join(f"{k}={v:.2f}" for k, v in busy.items())
            )
        for role, funcs in top.items():
            print(f"py-spy {role} self time: " + "; ".join(f"{f} {pct:.0f}%" for f, pct in funcs[:5]))
        doc = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": {
                "nproc": os.cpu_count(),
                "kernel": platform.release(),
                "python": platform.python_version(),
            },
            "args": vars(args),
            "units": {"mbps": "10^6 bytes/s of payload", "us": "microseconds", "rss": "MiB (VmHWM)"},
            "results": results,
            "idle_tunnels": {"count": args.idle, "rss": idle},
            "profile_top_self": top,
            "stunnel_skipped": stunnel_skipped,
            "elapsed_s": time.monotonic() - t_start,
        }
        out = RESULTS / f"l4-{stamp}.json"
        out.write_text(json.dumps(doc, indent=2, default=str))
        la = os.getloadavg()[0]
        print(
            f"load average (1 min) before/after: {load_before[0]:.2f}/{la:.2f}; other busy processes skew figures"
        )
        print(f"\nwrote {out.relative_to(ROOT)} ({time.monotonic() - t_start:.0f}s)")
        return 0
    finally:
        procs.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        c.serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    return c.main_with_cleanup(lambda: run(parse_args(sys.argv[1:])))


if __name__ == "__main__":
    sys.exit(main())
