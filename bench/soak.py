"""Soak: mixed L4 and L7 traffic through real meshd daemons for a configurable time, with connection and
peer churn; samples each daemon's RSS, open fds and trio tasks, and fails if any grows without bound.

All on loopback (127.57.0.0/24):
  L4  client -> alpha's [[upstream]] 17000 -> HBONE -> beta -> echo          (hash-checked echo transfers)
      client -> alpha's [[upstream]] 17001 -> HBONE -> gamma -> echo         (gamma is restarted: peer churn)
  L7  client -> alpha's [[upstream]] 18080 -> HBONE -> waypoint wp -> HBONE -> beta -> HTTP backend
Every transfer opens a new connection; HTTP connections are closed every few requests; gamma gets SIGTERM
and is started again every --restart-every seconds; wp and beta get SIGHUP (policy reload) every
--reload-every seconds. See bench/README.md ("Soak"). Usage:

    .venv/bin/python bench/soak.py [--minutes 2] [--sample-seconds S] [--restart-every S] [--reload-every S]

Writes bench/results/soak-<stamp>.json and .png (and copies the JSON to build/soak.json); exit status 0
if the run passed (no unbounded growth, no byte lost, no daemon died, no stall), 1 if it failed, 2 if the
mesh could not be set up.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c
import _soak_common as s
from l4 import Procs, http_get, meshd, wait_until

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

NET = "127.57.0"  # l4.py uses 127.55.0.x, l7.py 127.56.0.x, `make demo` 127.0.0.2/3
ALPHA_IP = f"{NET}.2"  # client node: the [[upstream]] listeners
BETA_IP = f"{NET}.3"  # destination node: echo + HTTP backend workloads
WP_IP = f"{NET}.5"  # waypoint
GAMMA_IP = f"{NET}.6"  # the churned node (restarted with SIGTERM)
GAMMA_WL_IP = f"{NET}.7"  # gamma's workload (the same backend process listens there)
ECHO_PORT, WEB_PORT = 7000, 8080
UP_ECHO, UP_CHURN, UP_WEB = 17000, 17001, 18080
TD = "bench.arpa"
LONG_LIVED = ("alpha", "beta", "wp")  # gamma restarts, so its resources reset: not slope-tested


@dataclass
class Daemon:
    name: str
    ip: str
    cfg: Path
    proc: subprocess.Popen[bytes]
    log: Path


def config(name: str, ip: str, ca: Path, peers: list[str], body: str, work: Path, top: str = "") -> Path:
    return c.daemon_config(name, ip, ca, peers, body, work, trust_domain=TD, top=top)


ROUTES = '[[route]]\nname = "soak"\nservice = "web.default"\n'


def write_configs(work: Path, ca: Path) -> dict[str, tuple[str, Path]]:
    up = "".join(
        f'[[upstream]]\nservice = "{svc}"\nport = {port}\nlisten = "{ALPHA_IP}:{listen}"\n'
        for svc, port, listen in (
            ("echo.default", ECHO_PORT, UP_ECHO),
            ("churn.default", ECHO_PORT, UP_CHURN),
            ("web.default", WEB_PORT, UP_WEB),
        )
    )
    alpha = config(
        "alpha",
        ALPHA_IP,
        ca,
        [BETA_IP, WP_IP, GAMMA_IP],
        f'[[workload]]\nname = "client"\naddress = "{ALPHA_IP}"\nports = [8000]\n' + up,
        work,
    )
    beta = config(
        "beta",
        BETA_IP,
        ca,
        [ALPHA_IP, WP_IP],
        f'[[workload]]\nname = "backend"\naddress = "{BETA_IP}"\nports = [{ECHO_PORT}, {WEB_PORT}]\n'
        'services = ["echo", "web"]\n'
        f'[[service]]\nname = "echo"\nports = [{{ port = {ECHO_PORT} }}]\n'
        f'[[service]]\nname = "web"\nwaypoint = "wp"\nports = [{{ port = {WEB_PORT}, protocol = "http" }}]\n',
        work,
    )
    wp = config("wp", WP_IP, ca, [ALPHA_IP, BETA_IP], "", work, top='role = "waypoint"\n')
    (work / "wp-policy" / "routes.toml").write_text(ROUTES)
    gamma = config(
        "gamma",
        GAMMA_IP,
        ca,
        [ALPHA_IP],
        f'[[workload]]\nname = "churn"\naddress = "{GAMMA_WL_IP}"\nports = [{ECHO_PORT}]\n'
        'services = ["churn"]\n'
        f'[[service]]\nname = "churn"\nports = [{{ port = {ECHO_PORT} }}]\n',
        work,
        top='drain_timeout = "5s"\n',
    )
    return {
        "beta": (BETA_IP, beta),
        "wp": (WP_IP, wp),
        "gamma": (GAMMA_IP, gamma),
        "alpha": (ALPHA_IP, alpha),
    }


def start_daemon(
    procs: Procs, work: Path, name: str, ip: str, cfg: Path, gen: int = 0, trace_frames: int = 0
) -> Daemon:
    log = work / (f"meshd-{name}.log" if not gen else f"meshd-{name}-{gen}.log")
    env = {**os.environ, "PYTHONTRACEMALLOC": str(trace_frames)} if trace_frames else None
    p = procs.start(f"meshd-{name}", [sys.executable, "-m", "meshd", "run", "-c", str(cfg)], log, env=env)
    return Daemon(name, ip, cfg, p, log)


def memory_report(d: Daemon) -> str:
    """The daemon's /debug/memory (tracemalloc: largest sites, growth since the previous call)."""
    try:
        with urllib.request.urlopen(f"http://{d.ip}:15000/debug/memory", timeout=120) as resp:
            return str(resp.read().decode())
    except OSError as exc:
        return f"/debug/memory failed: {exc}\n"


def wait_ready(d: Daemon, timeout: float = 30) -> None:
    url = f"http://{d.ip}:15021/healthz/ready"
    wait_until(f"meshd {d.name} ready", lambda: http_get(url)[0] == 200, d.proc, d.log, timeout=timeout)


def start_backend(procs: Procs, work: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_serve"]
    p = procs.start("backend", cmd, work / "backend.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdout is not None
    if p.stdout.readline().strip() != b"ready":
        raise RuntimeError(f"backend failed: {(work / 'backend.log').read_text()[-2000:]}")
    return p


def probe(timeout: float = 20.0) -> None:
    """Each path carries bytes before the clock starts (bounded retries)."""
    deadline = time.monotonic() + timeout
    checks = {
        "L4 via beta": lambda: s.echo_transfer((ALPHA_IP, UP_ECHO), b"probe") == b"probe",
        "L4 via gamma": lambda: s.echo_transfer((ALPHA_IP, UP_CHURN), b"probe") == b"probe",
        "L7 via wp": lambda: http_get(f"http://{ALPHA_IP}:{UP_WEB}/bytes/64", 5)[1] == s.pattern(64),
    }
    for what, check in checks.items():
        last = ""
        for _ in range(1000):
            try:
                if check():
                    break
                last = "wrong answer"
            except OSError as exc:
                last = repr(exc)
            if time.monotonic() >= deadline:
                raise RuntimeError(f"probe {what} failed: {last}")
            time.sleep(0.25)


# ---------------------------------------------------------------------------------------------------
# churn of peers: restart gamma (SIGTERM, start again), SIGHUP policy reloads on wp and beta


class Churn:
    def __init__(self, procs: Procs, work: Path, daemons: dict[str, Daemon], args: argparse.Namespace):
        self.procs, self.work, self.daemons, self.args = procs, work, daemons, args
        self.restarts: list[dict[str, Any]] = []
        self.reloads = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def restart_gamma(self, t0: float) -> None:
        d = self.daemons["gamma"]
        t = time.monotonic()
        rec: dict[str, Any] = {"t": t - t0}
        d.proc.send_signal(signal.SIGTERM)
        try:
            rec["exit_code"] = d.proc.wait(15)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            rec["exit_code"] = d.proc.wait(5)
            rec["needed_sigkill"] = True
            self.failures.append("gamma did not exit within 15 s of SIGTERM")
        rec["stop_s"] = time.monotonic() - t
        new = start_daemon(self.procs, self.work, "gamma", d.ip, d.cfg, gen=len(self.restarts) + 1)
        with self.lock:
            self.daemons["gamma"] = new
        try:
            wait_ready(new, timeout=30)
            rec["down_s"] = time.monotonic() - t
        except RuntimeError as exc:
            rec["error"] = str(exc).splitlines()[0]
            self.failures.append(f"gamma not ready again after restart {len(self.restarts) + 1}")
        self.restarts.append(rec)

    def reload(self) -> None:
        self.reloads += 1
        (self.work / "wp-policy" / "routes.toml").write_text(ROUTES + f"# reload {self.reloads}\n")
        for name in ("wp", "beta"):
            with contextlib.suppress(OSError):
                self.daemons[name].proc.send_signal(signal.SIGHUP)

    def run(self, t0: float, deadline: float, stop: threading.Event) -> None:
        next_restart = t0 + self.args.restart_every
        next_reload = t0 + self.args.reload_every
        for _ in range(int((deadline - t0) / 0.2) + 10):  # bounded: one pass per 0.2 s
            if stop.wait(0.2) or time.monotonic() >= deadline - 2:
                return
            now = time.monotonic()
            if self.args.reload_every and now >= next_reload:
                self.reload()
                next_reload = now + self.args.reload_every
            if self.args.restart_every and now >= next_restart:
                self.restart_gamma(t0)
                next_restart = time.monotonic() + self.args.restart_every


# ---------------------------------------------------------------------------------------------------
# sampling


def sample_daemon(d: Daemon) -> dict[str, Any]:
    out: dict[str, Any] = {"pid": d.proc.pid, "rss_kib": s.rss_kib(d.proc.pid), "fds": s.fd_count(d.proc.pid)}
    out["tasks"] = out["proxied"] = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        dump = json.loads(http_get(f"http://{d.ip}:15000/config_dump", 5)[1])
        out["tasks"] = dump.get("trio_tasks")
        out["proxied"] = dump["connections"]["proxied"]
    return out


def rate(n: int, d: int) -> float:
    return n / d if d else 0.0


def interval(prev: dict[str, int], cur: dict[str, int], dt: float) -> dict[str, float]:
    d = {k: cur[k] - prev[k] for k in cur}
    steady_err = d["l4_err"] - d["churn_err"] + d["l7_err"]
    steady_ok = d["l4_ok"] - d["churn_ok"] + d["l7_ok"]
    return {
        "l4_mbps": d["l4_bytes"] / dt / 1e6,
        "l4_tps": d["l4_ok"] / dt,
        "l7_rps": d["l7_ok"] / dt,
        "steady_ok": steady_ok,
        "steady_error_rate": rate(steady_err, steady_ok + steady_err),
        "churn_error_rate": rate(d["churn_err"], d["churn_ok"] + d["churn_err"]),
    }


# ---------------------------------------------------------------------------------------------------


def analyse(doc: dict[str, Any], args: argparse.Namespace) -> list[str]:
    failures: list[str] = []
    samples = doc["samples"]
    ts = [x["t"] for x in samples]
    resources: dict[str, dict[str, Any]] = {}
    for d in LONG_LIVED:
        resources[d] = {}
        for metric, key, scale in (("rss_mib", "rss_kib", 1024), ("fds", "fds", 1), ("tasks", "tasks", 1)):
            ys = [x["daemons"][d][key] for x in samples]
            ys = [y / scale if y is not None else None for y in ys]
            r = s.slope_test(ts, ys, metric)
            resources[d][metric] = r
            if r["grows"]:
                failures.append(
                    f"{d} {metric} grows: {r['slope_per_min']:+.2f}/min over the second half "
                    f"(+{r['projected_growth']:.1f} > {r['allowed_growth']:.1f} allowed)"
                )
    doc["resources"] = resources
    tot = doc["totals"]
    if tot["bytes_lost"]:
        failures.append(f"{tot['bytes_lost']} bytes lost (truncated or corrupted)")
    steady_ops = tot["steady_ok"] + tot["steady_errors"]
    if steady_ops == 0:
        failures.append("no traffic went through")
    elif tot["steady_errors"] / steady_ops > args.max_error_rate:
        failures.append(
            f"steady-path error rate {100 * tot['steady_errors'] / steady_ops:.2f}% "
            f"> {100 * args.max_error_rate:g}%"
        )
    # stall: the longest stretch of sample intervals without one good steady-path operation
    gap = longest = 0.0
    for prev, cur in itertools.pairwise(samples):
        gap = gap + (cur["t"] - prev["t"]) if cur["steady_ok"] == 0 else 0.0
        longest = max(longest, gap)
    doc["longest_stall_s"] = longest
    if longest >= args.stall_seconds:
        failures.append(f"no steady-path progress for {longest:.0f} s")
    for name, code in doc["daemon_exits"].items():
        failures.append(f"{name} exited during the run (status {code})")
    failures += doc["churn"]["failures"]
    if len(samples) < 8:
        failures.append(f"only {len(samples)} samples: too short to judge")
    return failures


def run(args: argparse.Namespace) -> int:
    for ip in (ALPHA_IP, BETA_IP, WP_IP, GAMMA_IP, GAMMA_WL_IP):
        s.check_loopback(ip)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="meshd-soak-"))
    procs = Procs()
    stop = threading.Event()
    t_setup = time.monotonic()
    load_before = os.getloadavg()
    keep_work = False
    threads: list[threading.Thread] = []
    try:
        try:
            ca = work / "ca"
            meshd("ca", "init", "--dir", str(ca), "--trust-domain", TD)
            start_backend(procs, work)
            cfgs = write_configs(work, ca)
            daemons = {
                n: start_daemon(
                    procs, work, n, ip, cfg, trace_frames=args.trace_memory if n in LONG_LIVED else 0
                )
                for n, (ip, cfg) in cfgs.items()
            }
            for d in daemons.values():
                wait_ready(d)
            probe()
        except (RuntimeError, subprocess.SubprocessError) as exc:
            print(f"ERROR: set-up failed: {exc}", file=sys.stderr)
            keep_work = True
            return 2
        setup_s = time.monotonic() - t_setup
        counters = s.Counters()
        churn = Churn(procs, work, daemons, args)
        t0 = time.monotonic()
        deadline = t0 + args.minutes * 60
        print(
            f"set-up done in {setup_s:.1f}s; soaking {args.minutes:g} min: {args.l4_workers} L4 + "
            f"{args.l7_workers} L7 workers, gamma restart every {args.restart_every:g}s, "
            f"SIGHUP every {args.reload_every:g}s, a sample every {args.sample_seconds:g}s",
            flush=True,
        )
        for i in range(args.l4_workers):
            threads.append(
                threading.Thread(
                    target=s.l4_worker,
                    args=(counters, (ALPHA_IP, UP_ECHO), (ALPHA_IP, UP_CHURN), 0.25, deadline, stop, i),
                    daemon=True,
                )
            )
        for i in range(args.l7_workers):
            threads.append(
                threading.Thread(
                    target=s.l7_worker,
                    args=(counters, (ALPHA_IP, UP_WEB), args.requests_per_conn, deadline, stop, 100 + i),
                    daemon=True,
                )
            )
        threads.append(threading.Thread(target=churn.run, args=(t0, deadline, stop), daemon=True))
        for th in threads:
            th.start()

        samples: list[dict[str, Any]] = []
        exits: dict[str, int] = {}
        memory_marks: dict[str, str] = {}
        prev, t_prev = counters.snapshot(), t0
        n_samples = int(args.minutes * 60 / args.sample_seconds) + 2
        for k in range(n_samples):  # bounded: one pass per sample
            wake = min(t0 + (k + 1) * args.sample_seconds, deadline)
            time.sleep(max(0.0, wake - time.monotonic()))
            now = time.monotonic()
            cur = counters.snapshot()
            with churn.lock:
                current = dict(daemons)
            row: dict[str, Any] = {"t": now - t0, **interval(prev, cur, max(now - t_prev, 1e-3))}
            row["daemons"] = {n: sample_daemon(d) for n, d in current.items()}
            row["daemons"]["loadgen"] = {"rss_kib": s.rss_kib(os.getpid()), "fds": s.fd_count(os.getpid())}
            samples.append(row)
            prev, t_prev = cur, now
            for n in LONG_LIVED:
                code = current[n].proc.poll()
                if code is not None and n not in exits:
                    exits[n] = code
            if k % max(1, int(30 / args.sample_seconds)) == 0 or now >= deadline:
                a = row["daemons"]["alpha"]
                print(
                    f"  {row['t'] / 60:5.1f} min  L4 {row['l4_mbps']:6.1f} MB/s  L7 {row['l7_rps']:6.0f} req/s  "
                    f"errors {100 * row['steady_error_rate']:.2f}% (gamma {100 * row['churn_error_rate']:.0f}%)  "
                    f"RSS "
                    + "/".join(f"{(row['daemons'][n]['rss_kib'] or 0) / 1024:.0f}" for n in LONG_LIVED)
                    + f" MiB  alpha fds {a['fds']} tasks {a['tasks']}",
                    flush=True,
                )
            if args.trace_memory and not memory_marks and now - t0 >= args.minutes * 30:
                # The slope test's window starts here: growth from now on is what the second call shows.
                memory_marks.update({n: memory_report(current[n]) for n in LONG_LIVED})
            if exits or now >= deadline:
                break
        stop.set()
        if args.trace_memory:
            out_dir = Path(args.out)
            out_dir.mkdir(parents=True, exist_ok=True)
            for n in LONG_LIVED:
                report = memory_report(daemons[n])  # second call: what grew over the second half
                (out_dir / f"soak-{stamp}-memory-{n}.txt").write_text(
                    memory_marks.get(n, "") + "\n---- at the end ----\n" + report
                )
            print(f"tracemalloc reports: {out_dir}/soak-{stamp}-memory-*.txt", flush=True)
        for th in threads:
            th.join(s.IO_TIMEOUT + 20)
        hung = [th.name for th in threads if th.is_alive()]
        duration = time.monotonic() - t0
        snap = counters.snapshot()
        doc: dict[str, Any] = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": {
                "nproc": os.cpu_count(),
                "kernel": platform.release(),
                "python": platform.python_version(),
            },
            "args": vars(args),
            "setup_s": setup_s,
            "duration_s": duration,
            "topology": {
                "alpha": ALPHA_IP,
                "beta": BETA_IP,
                "wp": WP_IP,
                "gamma": GAMMA_IP,
                "paths": {
                    "l4 steady": f"{ALPHA_IP}:{UP_ECHO} -> beta -> echo",
                    "l4 churned": f"{ALPHA_IP}:{UP_CHURN} -> gamma (restarted) -> echo",
                    "l7": f"{ALPHA_IP}:{UP_WEB} -> wp -> beta -> HTTP backend",
                },
            },
            "totals": {
                "l4_transfers": snap["l4_ok"],
                "l4_errors": snap["l4_err"],
                "l4_bytes": snap["l4_bytes"],
                "l7_requests": snap["l7_ok"],
                "l7_errors": snap["l7_err"],
                "l7_bytes": snap["l7_bytes"],
                "churned_peer_transfers": snap["churn_ok"],
                "churned_peer_errors": snap["churn_err"],
                "steady_ok": snap["l4_ok"] - snap["churn_ok"] + snap["l7_ok"],
                "steady_errors": snap["l4_err"] - snap["churn_err"] + snap["l7_err"],
                "bytes_sent": snap["bytes_sent"],
                "bytes_lost": snap["bytes_lost"],
                "error_kinds": dict(counters.kinds),
                "error_examples": counters.examples,
                "losses": [{"t": t - t0, "kind": k, "detail": d} for t, k, d in counters.losses],
            },
            "throughput": {
                "l4_mbps": snap["l4_bytes"] / duration / 1e6,
                "l4_transfers_per_s": snap["l4_ok"] / duration,
                "l7_rps": snap["l7_ok"] / duration,
            },
            "churn": {"restarts": churn.restarts, "reloads": churn.reloads, "failures": list(churn.failures)},
            "daemon_exits": exits,
            "limits": {m: {"floor": f, "share": sh} for m, (f, sh) in s.LIMITS.items()},
            "samples": samples,
            "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        }
        failures = analyse(doc, args)
        if hung:
            failures.append(f"load threads still running after the deadline: {hung}")
        doc["failures"] = failures
        doc["verdict"] = "fail" if failures else "pass"
        json_path = out_dir / f"soak-{stamp}.json"
        png_path = out_dir / f"soak-{stamp}.png"
        try:
            s.plot(doc, png_path, LONG_LIVED)
            doc["plot"] = str(png_path.relative_to(ROOT) if png_path.is_relative_to(ROOT) else png_path)
        except ImportError:
            doc["plot"] = None
            print("NOTE: matplotlib not installed (.venv/bin/pip install -e '.[test]'): no plot")
        doc["json"] = str(json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path)
        if failures:
            keep_work = True
            doc["work_dir"] = str(work)
        text = json.dumps(doc, indent=2, default=str) + "\n"
        json_path.write_text(text)
        if args.build_json:
            Path(args.build_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.build_json).write_text(text)
        print_summary(doc)
        return 1 if failures else 0
    finally:
        stop.set()
        procs.close()
        if keep_work:
            print(f"daemon logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def print_summary(doc: dict[str, Any]) -> None:
    t, th = doc["totals"], doc["throughput"]
    print(
        f"\n{doc['duration_s'] / 60:.1f} min: {t['l4_transfers']} L4 transfers ({th['l4_mbps']:.1f} MB/s, "
        f"{t['l4_errors']} errors, {t['churned_peer_errors']} of them to the restarted peer), "
        f"{t['l7_requests']} L7 requests ({th['l7_rps']:.0f} req/s, {t['l7_errors']} errors); "
        f"bytes lost {t['bytes_lost']} of {t['bytes_sent']} sent"
    )
    print(
        f"churn: {len(doc['churn']['restarts'])} gamma restarts, {doc['churn']['reloads']} SIGHUP reloads "
        f"(wp + beta); error kinds: {t['error_kinds'] or 'none'}"
    )
    for d, metrics in doc["resources"].items():
        print(
            f"  {d:5s} "
            + "  ".join(
                f"{m} {r['start']:.0f}->{r['end']:.0f} ({r['slope_per_min']:+.2f}/min{' GROWS' if r['grows'] else ''})"
                for m, r in metrics.items()
                if "start" in r
            )
        )
    print(
        f"verdict: {doc['verdict'].upper()}" + (f": {'; '.join(doc['failures'])}" if doc["failures"] else "")
    )
    print(f"wrote {doc['json']}" + (f" and {doc['plot']}" if doc["plot"] else ""))


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=2.0, help="length of the loaded run [2]")
    ap.add_argument("--sample-seconds", type=float, help="sampling interval [minutes x 60 / 120, 2..10 s]")
    ap.add_argument(
        "--restart-every", type=float, default=20.0, help="restart gamma every S s (0: never) [20]"
    )
    ap.add_argument(
        "--reload-every", type=float, default=5.0, help="SIGHUP wp + beta every S s (0: never) [5]"
    )
    ap.add_argument("--l4-workers", type=int, default=2, help="L4 echo threads [2]")
    ap.add_argument("--l7-workers", type=int, default=2, help="HTTP client threads [2]")
    ap.add_argument("--requests-per-conn", type=int, default=20, help="HTTP requests per connection [20]")
    ap.add_argument(
        "--max-error-rate", type=float, default=0.01, help="steady-path error fraction that fails [0.01]"
    )
    ap.add_argument("--stall-seconds", type=float, default=10.0, help="no progress this long fails [10]")
    ap.add_argument(
        "--trace-memory",
        type=int,
        default=0,
        metavar="FRAMES",
        help="run alpha, beta and wp with PYTHONTRACEMALLOC=FRAMES and write where their memory grew over the "
        "second half (soak-<stamp>-memory-<daemon>.txt); slows them down [0 = off]",
    )
    ap.add_argument("--out", default=str(RESULTS), help="directory for the JSON and PNG [bench/results]")
    ap.add_argument(
        "--build-json", default=str(ROOT / "build" / "soak.json"), help="copy of the JSON ('' = none)"
    )
    a = ap.parse_args(argv)
    if not 0.2 <= a.minutes <= 7 * 24 * 60:
        ap.error("--minutes must be in [0.2, 10080]")
    if a.sample_seconds is None:
        a.sample_seconds = min(10.0, max(2.0, a.minutes * 60 / 120))
    if not 0.5 <= a.sample_seconds <= 600 or not (0 < a.l4_workers <= 32 and 0 < a.l7_workers <= 32):
        ap.error("--sample-seconds in [0.5, 600]; workers in [1, 32]")
    return a


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        s.serve([(BETA_IP, ECHO_PORT), (GAMMA_WL_IP, ECHO_PORT)], (BETA_IP, WEB_PORT))
        return 0
    return c.main_with_cleanup(lambda: run(parse_args(sys.argv[1:])))


if __name__ == "__main__":
    sys.exit(main())
