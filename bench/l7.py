"""L7 benchmark: keep-alive HTTP load on the backend directly, through nginx, and through meshd's waypoint path.

Side by side in one run, all on loopback (127.56.0.0/24):
  direct        wrk -> backend nginx
  nginx         wrk -> nginx reverse proxy (proxy_pass, upstream keep-alive) -> backend nginx
  meshd         wrk -> alpha's [[upstream]] listener -> HBONE -> waypoint "wp" (HTTP parse, route) -> HBONE
                -> beta (destination node) -> backend nginx
  meshd+filters the same, on a route with the `headers` and `ratelimit` filters (a rate that never limits)
  meshd+headers the same, on a route with only the Python `headers` filter        (--paths ...,meshd+headers)
  meshd+wasm    the same, on a route with the proxy-wasm header filter tests/wasm/headers (needs
                meshd-ambient[wasm]); the report gives each filter's added CPU per request over `meshd`
  *-h2          HTTP/2 (h2load -m10) to the backend nginx's h2c port: direct-h2, nginx-h2 (grpc_pass),
                meshd-h2 (a service port of protocol "http2": HTTP/2 on both sides of the waypoint)
  *-grpc        gRPC unary calls (h2load -m10 posting one length-prefixed message) to a grpcio server
                (bench/_grpc_backend.py): direct-grpc, nginx-grpc (grpc_pass), meshd-grpc (a service
                port of protocol "grpc")

See bench/README.md ("L7") for what each figure means. Usage:

    .venv/bin/python bench/l7.py [--quick] [--repeat N] [--seconds S] [--profile]

Writes bench/results/l7-<timestamp>.json and prints a table. If the meshd waypoint path is not
available (a daemon refuses its config, or a request does not pass through the waypoint), the
direct and nginx columns are still measured, the reason is printed, and the exit status is 0.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c
import _l7_common as h
from _grpc_backend import METHOD as GRPC_METHOD
from l4 import Procs, http_get, meshd, wait_until

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

NET = "127.56.0"  # l4.py uses 127.55.0.x, `make demo` 127.0.0.2/3, the tests 127.20-220.x.y
ALPHA_IP = f"{NET}.2"  # meshd alpha (client node): the [[upstream]] listener
BETA_IP = f"{NET}.3"  # meshd beta (destination node); the backend nginx listens here too
PROXY_IP = f"{NET}.4"  # the nginx reverse proxy
WP_IP = f"{NET}.5"  # meshd waypoint "wp"
BACKEND_L4_IP = f"{NET}.6"  # the same backend nginx, as a second workload on beta not bound to the waypoint
BACKEND_PORT = 8080
PROXY_PORT = 8080
UPSTREAM_PORT = 18080  # alpha's listener for SERVICE (through the waypoint)
UPSTREAM_L4_PORT = 18081  # alpha's listener for SERVICE_L4 (same backend, no waypoint): --paths ...,meshd-l4
BACKEND_H2_PORT = 8082  # the backend's h2c (prior knowledge) listener: SERVICE_H2, protocol "http2"
PROXY_H2_PORT = 8082  # nginx's h2c listener, grpc_pass to the backend's h2c port
UPSTREAM_H2_PORT = 18082  # alpha's listener for SERVICE_H2 (through the waypoint, HTTP/2 on both sides)
H2_STREAMS = 10  # h2load -m: concurrent streams per connection on the *-h2 and *-grpc paths
BACKEND_GRPC_PORT = 8083  # the grpcio backend (bench/_grpc_backend.py): SERVICE_GRPC, protocol "grpc"
PROXY_GRPC_PORT = 8083  # nginx's h2c listener, grpc_pass to the grpcio backend
UPSTREAM_GRPC_PORT = 18083  # alpha's listener for SERVICE_GRPC
GRPC_MESSAGE = b"x" * 64  # each call's request message (echoed back)
TD = "bench.arpa"
SERVICE = "web.default"
SERVICE_L4 = "web-l4.default"
SERVICE_H2 = "web-h2.default"
SERVICE_GRPC = "web-grpc.default"
FILTERED_PREFIX = "/filtered"  # requests under this path take the route with two filters
FILTER_HEADER = "x-bench-filters"  # set on responses by the `headers` filter: proof the chain ran

HEADERS_PREFIX = "/py-headers"  # the route with the Python `headers` filter alone
WASM_PREFIX = "/wasm"  # the route with the proxy-wasm header filter
WASM_MODULE = ROOT / "tests" / "wasm" / "headers" / "build" / "filter.wasm"
WASM_HEADER = "x-wasm-filter"  # set on responses by that module: proof it ran

PATH_NAMES = ("direct", "nginx", "meshd", "meshd+filters")  # the default set
# HTTP/2 end to end (h2load -m H2_STREAMS; the service port is protocol "http2"): optional
H2_PATHS = ("direct-h2", "nginx-h2", "meshd-h2")
# gRPC unary (h2load -m H2_STREAMS posting GRPC_MESSAGE; the service port is protocol "grpc"): optional
GRPC_PATHS = ("direct-grpc", "nginx-grpc", "meshd-grpc")
FILTER_PATHS = ("meshd+headers", "meshd+wasm")  # one filter each: added CPU per request over `meshd`
ALL_PATHS = (
    *PATH_NAMES,
    *FILTER_PATHS,
    "meshd-l4",
    *H2_PATHS,
    *GRPC_PATHS,
)  # meshd-l4: alpha -> beta -> backend, no waypoint
WAYPOINT_PATHS = ("meshd", "meshd+filters", *FILTER_PATHS)


@dataclass
class Path_:
    name: str
    url: str
    proxies: dict[str, int]  # role -> pid (their CPU is the path's cost)
    samples: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    cpu_proxy: float = 0.0
    cpu_backend: float = 0.0
    cpu_loadgen: float = 0.0
    requests: int = 0
    backend_conns: int = 0  # TCP connections the backend accepted while this path was measured
    non_2xx: int = 0
    socket_errors: int = 0
    cpu_share: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    h2: bool = False  # HTTP/2 prior knowledge (h2load -m H2_STREAMS)
    grpc_body: Path | None = None  # gRPC calls: the request body h2load posts (length-prefixed message)
    backend_pids: dict[str, int] | None = None  # the path's own backend (else the nginx backend)


# ---------------------------------------------------------------------------------------------------
# set-up: nginx


def start_nginx(
    procs: Procs, work: Path, name: str, conf_for: Any, listen: tuple[str, int] | None
) -> list[int]:
    """Start one nginx (master + workers); wait until it answers 200 (or, `listen` None, an h2c-only
    one: until its pid file is written); return [master, *workers]."""
    prefix = work / name
    conf = conf_for(prefix)
    (prefix / "error.log").touch()
    p = procs.start(name, h.nginx_cmd(prefix, conf), work / f"{name}.log")
    if listen is not None:
        url = f"http://{listen[0]}:{listen[1]}/"
        wait_until(f"{name} answers", lambda: http_get(url)[0] == 200, p, prefix / "error.log", timeout=15)
    else:
        wait_until(f"{name} started", (prefix / "nginx.pid").exists, p, prefix / "error.log", timeout=15)
    workers: list[int] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not workers:  # workers are forked right after start
        workers = h.children(p.pid)
        if not workers:
            time.sleep(0.05)
    return [p.pid, *workers]


# ---------------------------------------------------------------------------------------------------
# set-up: meshd (two nodes + a waypoint)


def daemon_config(
    name: str, ip: str, ca: Path, peers: list[str], body: str, work: Path, role: str = "node"
) -> Path:
    top = f'role = "{role}"\n' if role != "node" else ""
    return c.daemon_config(name, ip, ca, peers, body, work, trust_domain=TD, top=top)


def routes_toml(rate: int) -> str:
    """Two routes for the service: the first (under FILTERED_PREFIX) with two filters, the second bare.

    Routes are tried in order, so a request to "/" skips the first (path prefix mismatch) and takes
    the second, which has no filters and no backends list (every endpoint of the service).
    """
    return (
        "[[route]]\n"
        'name = "bench-filtered"\n'
        f'service = "{SERVICE}"\n'
        f'match = [{{ path = {{ prefix = "{FILTERED_PREFIX}" }} }}]\n'
        "filters = [\n"
        '  { name = "headers", settings = { request = { set = { x-bench = "1" } }, '
        f'response = {{ set = {{ {FILTER_HEADER} = "headers,ratelimit" }} }} }} }},\n'
        f'  {{ name = "ratelimit", settings = {{ max_tokens = {rate}, fill_interval = "1s" }} }},\n'
        "]\n\n"
        "[[route]]\n"
        'name = "bench-headers"\n'
        f'service = "{SERVICE}"\n'
        f'match = [{{ path = {{ prefix = "{HEADERS_PREFIX}" }} }}]\n'
        'filters = [{ name = "headers", settings = { request = { add = { x-wasm-config = "" } }, '
        f'response = {{ add = {{ {WASM_HEADER} = "headers" }} }} }} }}]\n\n'
        + (
            "[[route]]\n"
            'name = "bench-wasm"\n'
            f'service = "{SERVICE}"\n'
            f'match = [{{ path = {{ prefix = "{WASM_PREFIX}" }} }}]\n'
            f'filters = [{{ name = "wasm", settings = {{ module = "{WASM_MODULE}", root_id = "headers" }} }}]\n\n'
            if wasm_available()
            else ""
        )
        + "[[route]]\n"
        'name = "bench-plain"\n'
        f'service = "{SERVICE}"\n'
    )


def wasm_available() -> bool:
    try:
        import wasmtime  # noqa: F401
    except ImportError:
        return False
    return True


def added_cpu(results: dict[str, dict[str, Any] | None]) -> list[str]:
    """Each one-filter path's CPU per request (all three daemons) over the bare `meshd` path."""
    base = results.get("meshd")
    if not base or base.get("cpu_s_per_1k_proxies") is None:
        return []
    out = []
    for name in FILTER_PATHS:
        r = results.get(name)
        if r and r.get("cpu_s_per_1k_proxies") is not None:
            added = (r["cpu_s_per_1k_proxies"] - base["cpu_s_per_1k_proxies"]) * 1000  # s/1k req -> us/req
            aim = " (aim <= 50 us)" if name == "meshd+wasm" else ""
            out.append(f"added CPU per request over meshd: {name} {added:.0f} us{aim}")
    return out


def first_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"error|invalid|unknown|refus|traceback|exception|not ", ln, re.I):
            return ln[:300]
    return lines[0][:300] if lines else "(no output)"


def start_meshd(procs: Procs, work: Path, ca: Path, rate: int) -> dict[str, int]:
    """alpha (client node) -> wp (waypoint) -> beta (destination node, hosts the backend).

    Raises RuntimeError with a one-line reason if a daemon refuses its config or does not get ready.
    """
    alpha = daemon_config(
        "alpha",
        ALPHA_IP,
        ca,
        [BETA_IP, WP_IP],
        f'[[workload]]\nname = "client"\naddress = "{ALPHA_IP}"\nports = [8000]\n'
        f'[[upstream]]\nservice = "{SERVICE}"\nport = {BACKEND_PORT}\nlisten = "{ALPHA_IP}:{UPSTREAM_PORT}"\n'
        f'[[upstream]]\nservice = "{SERVICE_L4}"\nport = {BACKEND_PORT}\nlisten = "{ALPHA_IP}:{UPSTREAM_L4_PORT}"\n'
        f'[[upstream]]\nservice = "{SERVICE_H2}"\nport = {BACKEND_H2_PORT}\nlisten = "{ALPHA_IP}:{UPSTREAM_H2_PORT}"\n'
        f'[[upstream]]\nservice = "{SERVICE_GRPC}"\nport = {BACKEND_GRPC_PORT}\n'
        f'listen = "{ALPHA_IP}:{UPSTREAM_GRPC_PORT}"\n',
        work,
    )
    beta = daemon_config(
        "beta",
        BETA_IP,
        ca,
        [ALPHA_IP, WP_IP],
        f'[[workload]]\nname = "web"\naddress = "{BETA_IP}"\n'
        f"ports = [{BACKEND_PORT}, {BACKEND_H2_PORT}, {BACKEND_GRPC_PORT}]\n"
        'services = ["web", "web-h2", "web-grpc"]\n'
        f'[[workload]]\nname = "web-l4"\naddress = "{BACKEND_L4_IP}"\nports = [{BACKEND_PORT}]\n'
        'services = ["web-l4"]\n'
        f'[[service]]\nname = "web"\nwaypoint = "wp"\n'
        f'ports = [{{ port = {BACKEND_PORT}, protocol = "http" }}]\n'
        f'[[service]]\nname = "web-l4"\nports = [{{ port = {BACKEND_PORT} }}]\n'
        f'[[service]]\nname = "web-h2"\nwaypoint = "wp"\n'
        f'ports = [{{ port = {BACKEND_H2_PORT}, protocol = "http2" }}]\n'
        f'[[service]]\nname = "web-grpc"\nwaypoint = "wp"\n'
        f'ports = [{{ port = {BACKEND_GRPC_PORT}, protocol = "grpc" }}]\n',
        work,
    )
    wp = daemon_config("wp", WP_IP, ca, [ALPHA_IP, BETA_IP], "", work, role="waypoint")
    (work / "wp-policy" / "routes.toml").write_text(routes_toml(rate))
    # Refused configs (e.g. route keys the waypoint does not know yet) are reported by `config check`.
    for name, cfg in (("beta", beta), ("wp", wp), ("alpha", alpha)):
        chk = subprocess.run(
            [sys.executable, "-m", "meshd", "config", "check", "-c", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if chk.returncode != 0:
            raise RuntimeError(f"meshd {name} config refused: {first_error_line(chk.stderr + chk.stdout)}")
    started = {}
    for name, cfg, ip in (("beta", beta, BETA_IP), ("wp", wp, WP_IP), ("alpha", alpha, ALPHA_IP)):
        log = work / f"meshd-{name}.log"
        p = procs.start(f"meshd-{name}", [sys.executable, "-m", "meshd", "run", "-c", str(cfg)], log)
        started[name] = (p, ip, log)
    for name, (p, ip, log) in started.items():
        url = f"http://{ip}:15021/healthz/ready"
        try:
            wait_until(f"meshd {name} ready", lambda u=url: http_get(u)[0] == 200, p, log)
        except RuntimeError as exc:
            raise RuntimeError(
                f"meshd {name} did not start: {first_error_line(log.read_text() or str(exc))}"
            ) from exc
    p, ip, log = started["alpha"]

    def catalog_lists_service() -> bool:
        dump = json.loads(http_get(f"http://{ip}:15000/config_dump")[1])
        return {SERVICE, SERVICE_L4, SERVICE_H2, SERVICE_GRPC} <= set(dump["catalog"]["services"])

    try:
        wait_until(f"alpha's catalog lists {SERVICE}", catalog_lists_service, p, log, timeout=20)
    except RuntimeError as exc:
        raise RuntimeError(f"alpha's catalog never listed {SERVICE}: {first_error_line(str(exc))}") from exc
    return {name: s[0].pid for name, s in started.items()}


def metric_sum(ip: str, counts: Callable[[str], bool]) -> float:
    """The sum of the samples on a daemon's /metrics whose line `counts` accepts."""
    _, body = http_get(f"http://{ip}:15020/metrics")
    total = 0.0
    for line in body.decode(errors="replace").splitlines():
        if counts(line):
            with contextlib.suppress(ValueError):
                total += float(line.rsplit(" ", 1)[1])
    return total


def waypoint_request_count(ip: str) -> float:
    """Requests (L7) or tunnels (L4) the waypoint daemon has counted: proof that traffic went through it."""
    return metric_sum(
        ip, lambda line: line.startswith(("istio_requests_total", "istio_tcp_connections_opened_total"))
    )


def waypoint_grpc_ok(ip: str) -> float:
    """gRPC calls the waypoint counted with grpc-status 0 (OK): proof that h2load's calls succeeded as
    gRPC, which its own HTTP status count cannot show (a gRPC error is an HTTP 200 too)."""
    return metric_sum(
        ip, lambda line: line.startswith("istio_requests_total{") and 'grpc_response_status="0"' in line
    )


# ---------------------------------------------------------------------------------------------------
# set-up: the gRPC backend


def grpc_missing() -> str | None:
    """What the *-grpc paths lack on this machine, or None."""
    if h.H2LOAD is None:
        return "h2load (apt-get install nghttp2-client)"
    try:
        import grpc  # noqa: F401
    except ImportError:
        return "grpcio (pip install grpcio; the test extra has it)"
    return None


def grpc_url(ip: str, port: int) -> str:
    return f"http://{ip}:{port}{GRPC_METHOD}"


def start_grpc_backend(procs: Procs, work: Path) -> dict[str, int]:
    log = work / "grpc-backend.log"
    address = f"{BETA_IP}:{BACKEND_GRPC_PORT}"
    p = procs.start("grpc-backend", [sys.executable, str(ROOT / "bench" / "_grpc_backend.py"), address], log)
    wait_until("the gRPC backend listens", lambda: "ready" in log.read_text(), p, log, timeout=20)
    return {"grpc-backend": p.pid}


def probe_grpc(name: str, ip: str, port: int, timeout: float = 15.0) -> None:
    """One call through the path with a real gRPC client: the echo must come back. Retried for up
    to `timeout` seconds (the nodes may not know the waypoint yet), then the last reason is raised."""
    import grpc

    options = [("grpc.enable_http_proxy", 0)]
    deadline = time.monotonic() + timeout
    reason = "no attempt made"
    for _ in range(1000):  # bounded by the deadline, and by count
        with grpc.insecure_channel(f"{ip}:{port}", options=options) as channel:
            try:
                reply = channel.unary_unary(GRPC_METHOD)(GRPC_MESSAGE, timeout=5)
                if reply == GRPC_MESSAGE:
                    return
                reason = f"the probe call answered {reply[:40]!r}, not the echo"
            except grpc.RpcError as exc:
                reason = f"the probe call failed: {exc.code()} {exc.details()}"
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)  # retry interval while the catalog settles
    raise RuntimeError(f"{name}: {reason}")


def failure_flags(ip: str) -> dict[str, float]:
    """Counts of failed connections by response flag on one daemon (a hint at which hop refused)."""
    with contextlib.suppress(OSError, ValueError):
        _, body = http_get(f"http://{ip}:15020/metrics")
        out: dict[str, float] = collections.defaultdict(float)
        for line in body.decode(errors="replace").splitlines():
            if line.startswith("meshd_tcp_connections_failed_total{") or (
                line.startswith("istio_requests_total{") and 'response_flags="-"' not in line
            ):
                m = re.search(r'(?:reason|response_flags)="([^"]*)"', line)
                if m:
                    out[m.group(1)] += float(line.rsplit(" ", 1)[1])
        return {k: v for k, v in out.items() if v}
    return {}


FLAG_MEANING = {
    "NR": "no route / no workload for that address at that hop",
    "UH": "no healthy upstream (the next hop answered 503)",
    "UF": "upstream connect failure",
    "UAEX": "denied by policy",
    "UO": "circuit breaker overflow",
    "PLUGIN_ERROR": "a filter raised",
}


def probe_l4(timeout: float = 10.0) -> None:
    """The no-waypoint reference path answers with the backend's body (bounded retries)."""
    url = f"http://{ALPHA_IP}:{UPSTREAM_L4_PORT}/"
    deadline = time.monotonic() + timeout
    for _ in range(1000):
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200 and resp.read().decode(errors="replace") == h.BODY:
                    return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"GET / via alpha's meshd-l4 listener: {exc}") from exc
        if time.monotonic() >= deadline:
            raise RuntimeError("GET / via alpha's meshd-l4 listener: wrong answer")
        time.sleep(0.25)


def probe_meshd(timeout: float = 15.0) -> None:
    """One request per meshd path; RuntimeError (one line) unless it is served by the backend via the waypoint.

    Retried for up to `timeout` seconds (discovery of the waypoint may lag the service), then the last
    reason is raised.
    """
    deadline = time.monotonic() + timeout
    reason = "no attempt made"
    path = "/"
    for _ in range(1000):  # bounded by the deadline, and by count
        try:
            before = waypoint_request_count(WP_IP)
            for path in (
                "/",
                FILTERED_PREFIX + "/x",
                HEADERS_PREFIX + "/x",
                *([WASM_PREFIX + "/x"] if wasm_available() else []),
            ):
                url = f"http://{ALPHA_IP}:{UPSTREAM_PORT}{path}"
                with urllib.request.urlopen(url, timeout=5) as resp:
                    body = resp.read().decode(errors="replace")
                    if resp.status != 200 or body != h.BODY:
                        raise RuntimeError(f"GET {path} -> {resp.status} {body[:80]!r}")
                    proof = FILTER_HEADER if path.startswith(FILTERED_PREFIX) else WASM_HEADER
                    if path != "/" and resp.headers.get(proof) is None:
                        raise RuntimeError(
                            f"GET {path} reached the backend but without the `{proof}` header the "
                            "route's `headers` filter sets: the request did not pass through the waypoint's filters"
                        )
            if waypoint_request_count(WP_IP) <= before:
                raise RuntimeError(
                    "requests reached the backend, but the waypoint's /metrics counted nothing: "
                    "they bypassed the waypoint"
                )
            return
        except Exception as exc:  # the reason is reported, not swallowed
            first = f"{type(exc).__name__}: {exc}".splitlines()[0]
            reason = f"GET {path} via alpha's [[upstream]] listener: {first}"[:300]
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)  # retry interval while the catalog settles
    hints = []
    for name, ip in (("alpha", ALPHA_IP), ("wp", WP_IP), ("beta", BETA_IP)):
        for flag, n in failure_flags(ip).items():
            hints.append(f"{name} {flag} x{n:.0f} ({FLAG_MEANING.get(flag, '?')})")
    raise RuntimeError(reason + ("; failed-connection flags: " + ", ".join(hints) if hints else ""))


# ---------------------------------------------------------------------------------------------------
# measurement


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for k, pid in pids.items():
        try:
            out[k] = c.cpu_seconds(pid)
        except OSError:
            out[k] = 0.0
    return out


def path_load(path: Path_, args: argparse.Namespace, seconds: float, work: Path) -> h.Load:
    """One load run on `path` as its protocol wants it (HTTP/1.1, HTTP/2 streams, gRPC calls)."""
    return h.run_load(
        args.loadgen,
        path.url,
        seconds,
        args.threads,
        args.connections,
        work,
        H2_STREAMS if path.h2 else 0,
        path.grpc_body,
    )


def measure(
    path: Path_, backend: dict[str, int], args: argparse.Namespace, work: Path, seconds: float
) -> h.Load:
    if path.backend_pids is not None:
        backend = path.backend_pids
    nginx_backend = path.backend_pids is None  # its stub_status counts the connections it accepted
    accepts = h.backend_accepts(BETA_IP, BACKEND_PORT) if nginx_backend else None
    before_p, before_b = cpu_of(path.proxies), cpu_of(backend)
    machine = h.machine_cpu()
    t = time.perf_counter()
    load = path_load(path, args, seconds, work)
    wall = time.perf_counter() - t
    after_p, after_b = cpu_of(path.proxies), cpu_of(backend)
    machine_after = h.machine_cpu()
    accepts_after = h.backend_accepts(BETA_IP, BACKEND_PORT) if nginx_backend else None
    if accepts is not None and accepts_after is not None:
        path.backend_conns += accepts_after - accepts - 1  # minus the status request itself
    path.samples["rps"].append(load.rps)
    path.samples["p50_ms"].append(load.p50_ms)
    path.samples["p99_ms"].append(load.p99_ms)
    path.requests += load.requests
    path.non_2xx += load.non_2xx
    path.socket_errors += load.socket_errors
    path.cpu_proxy += sum(after_p[k] - before_p[k] for k in after_p)
    path.cpu_backend += sum(after_b[k] - before_b[k] for k in after_b)
    path.cpu_loadgen += load.loadgen_cpu_s
    for k in after_p:
        path.cpu_share[k].append((after_p[k] - before_p[k]) / wall)
    path.cpu_share["backend"].append(sum(after_b[k] - before_b[k] for k in after_b) / wall)
    path.cpu_share["loadgen"].append(load.loadgen_cpu_s / wall)
    # every process on the machine (cores): shows whether the machine, or something else, was the limit
    path.cpu_share["machine"].append((machine_after[0] - machine[0]) / wall)
    return load


def profile(
    path: Path_, backend: dict[str, int], args: argparse.Namespace, work: Path, stamp: str
) -> dict[str, Any]:
    """py-spy record (non-blocking) on each meshd daemon during one extra load run of `path`; top
    self-time functions."""
    secs = max(5.0, args.seconds)
    recorded = c.py_spy_record(
        path.proxies,
        secs,
        200,
        lambda role: RESULTS / f"l7-{stamp}-pyspy-{role}.txt",
        lambda: path_load(path, args, secs, work),
    )
    if recorded is None:
        return {}
    load, raws = recorded
    top: dict[str, Any] = {"under_py_spy_rps": load.rps}
    for role, raw in raws.items():
        self_time: collections.Counter[str] = collections.Counter()
        module_time: collections.Counter[str] = collections.Counter()
        for func, where, n in c.py_spy_leaves(raw):
            self_time[c.short_function(func, where)] += n
            module_time[_area(where)] += n
        total = sum(self_time.values())
        top[role] = {
            "self": [(f, 100 * n / max(total, 1)) for f, n in self_time.most_common(12)],
            "by_area": [(f, 100 * n / max(total, 1)) for f, n in module_time.most_common(12)],
        }
    return top


AREAS = (  # (path fragment, area) for the "where the time goes" summary; first match wins
    ("/h11/", "h11 (HTTP/1.1)"),
    ("/h2/", "h2/hpack/hyperframe"),
    ("/hpack/", "h2/hpack/hyperframe"),
    ("/hyperframe/", "h2/hpack/hyperframe"),
    ("ssl.py", "TLS (ssl)"),
    ("/trio/_socket.py", "socket syscalls + epoll"),
    ("/trio/_highlevel_socket.py", "socket syscalls + epoll"),
    ("_io_epoll.py", "socket syscalls + epoll"),
    ("/trio/", "trio scheduler"),
    ("/outcome/", "trio scheduler"),
    ("/prometheus_client/", "metrics (prometheus_client)"),
    ("logging/", "logging"),
)


def _area(filename: str) -> str:
    """Which library or meshd package a frame's file belongs to."""
    w = "/" + filename
    for frag, area in AREAS:
        if frag in w:
            return area
    if "/meshd/" in w:
        parts = w.split("/meshd/")[-1].split("/")
        return "meshd/" + parts[0]
    return "other"


# ---------------------------------------------------------------------------------------------------
# report


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(path: Path_) -> dict[str, Any]:
    k = path.requests / 1000
    out: dict[str, Any] = {k_: med(v) for k_, v in path.samples.items()}
    out["samples"] = dict(path.samples)
    out["requests"] = path.requests
    out["non_2xx"] = path.non_2xx
    out["socket_errors"] = path.socket_errors
    out["backend_conns_per_1k"] = path.backend_conns / k if k else None
    out["cpu_s_per_1k_proxies"] = path.cpu_proxy / k if path.proxies and k else None
    out["cpu_s_per_1k_backend"] = path.cpu_backend / k if k else None
    out["cpu_s_per_1k_loadgen"] = path.cpu_loadgen / k if k else None
    out["cpu_cores_busy"] = {k_: med(v) for k_, v in path.cpu_share.items()}
    out["peak_rss_mib"] = {}
    for role, pid in path.proxies.items():
        with contextlib.suppress(OSError):
            out["peak_rss_mib"][role] = c.status_kib(pid, "VmHWM") / 1024
    return out


ROWS = [
    ("rps", "req/s", "{:.0f}"),
    ("p50_ms", "latency p50 (ms)", "{:.2f}"),
    ("p99_ms", "latency p99 (ms)", "{:.2f}"),
    ("cpu", "proxy CPU s / 1k req", "{:.3f}"),
    ("cpu_backend", "backend CPU s / 1k req", "{:.3f}"),
    ("backend_conns_per_1k", "backend conns / 1k req", "{:.1f}"),
    ("errors", "non-2xx / socket errors", "{}"),
]


def cell(res: dict[str, Any] | None, key: str, fmt: str) -> tuple[str, float | None]:
    if res is None:
        return "missing", None
    if key == "cpu":
        v = res["cpu_s_per_1k_proxies"]
        return ("-" if v is None else fmt.format(v)), v
    if key == "cpu_backend":
        v = res["cpu_s_per_1k_backend"]
        return ("-" if v is None else fmt.format(v)), v
    if key == "errors":
        return f"{res['non_2xx']} / {res['socket_errors']}", None
    v = res.get(key)
    return ("n/a" if v is None else fmt.format(v)), v


def print_table(results: dict[str, dict[str, Any] | None]) -> None:
    names = [n for n in ALL_PATHS if n in results]

    # Each meshd path against its nginx yardstick: HTTP/2 and gRPC paths against nginx's grpc_pass.
    def yardstick(name: str) -> str:
        return next((f"nginx{s}" for s in ("-h2", "-grpc") if name.endswith(s)), "nginx")

    ratio_of = [(n, yardstick(n)) for n in names if n.startswith("meshd") and yardstick(n) in results]
    head = ["", *names, *(f"{n.replace('filters', 'f')}/{base}" for n, base in ratio_of)]
    lines = [head]
    for key, label, fmt in ROWS:
        row = [label]
        vals = {}
        for name in names:
            text, vals[name] = cell(results.get(name), key, fmt)
            row.append(text)
        for name, base in ratio_of:
            a, b = vals[name], vals[base]
            if key == "backend_conns_per_1k":  # nginx's ~0 makes a ratio meaningless
                a = None
            row.append(f"{a / b:.2f}x" if a is not None and b else "-")
        lines.append(row)
    c.print_aligned(lines)


def target_verdict(results: dict[str, dict[str, Any] | None]) -> list[str]:
    """Issue 5's target: meshd's full L7 path >= 0.5x nginx's req/s at p99 <= 2x nginx's."""
    ng = results.get("nginx")
    out = []
    for name in WAYPOINT_PATHS:
        r = results.get(name)
        if not (r and ng and ng.get("rps") and ng.get("p99_ms")):
            continue
        rr, pr = r["rps"] / ng["rps"], r["p99_ms"] / ng["p99_ms"]
        ok = rr >= 0.5 and pr <= 2.0
        out.append(
            f"target (>= 0.5x nginx req/s at p99 <= 2x): {name} {rr:.2f}x req/s, p99 {pr:.2f}x -> "
            + ("met" if ok else "NOT met")
        )
    return out


# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~30 s: 1 repeat, 3 s load phases")
    ap.add_argument("--repeat", type=int, help="runs per figure; the median is reported [3, quick: 1]")
    ap.add_argument("--seconds", type=float, help="duration of each load phase [10, quick: 3]")
    ap.add_argument("--threads", type=int, default=2, help="load generator threads [2]")
    ap.add_argument("--connections", type=int, default=50, help="keep-alive connections [50]")
    ap.add_argument(
        "--loadgen", choices=("auto", "wrk", "h2load"), default="auto", help="[auto: wrk, else h2load]"
    )
    ap.add_argument("--nginx-workers", default="auto", help="worker_processes of both nginx instances [auto]")
    ap.add_argument(
        "--rate",
        type=int,
        default=10_000_000,
        help="ratelimit filter's max_tokens per second (never limits) [1e7]",
    )
    ap.add_argument(
        "--paths",
        default=",".join(PATH_NAMES),
        help=f"comma-separated, of {','.join(ALL_PATHS)} [{','.join(PATH_NAMES)}]",
    )
    ap.add_argument(
        "--profile", action="store_true", help="py-spy the meshd daemons during one extra load run"
    )
    ap.add_argument(
        "--profile-path",
        choices=ALL_PATHS[2:],
        help="which meshd path --profile records [meshd+filters, else meshd, else meshd-l4]",
    )
    ap.add_argument(
        "--scan",
        help="concurrency scan instead of the table: comma-separated connection counts (e.g. 1,10,50,200); "
        "each path at each count, --repeat times, with cores busy per process",
    )
    ap.add_argument(
        "--keep-work",
        action="store_true",
        help="keep the work directory (daemon configs and logs) and print its path, to see why a path failed",
    )
    a = ap.parse_args(argv)
    q = a.quick
    a.repeat = a.repeat or (1 if q else 3)
    a.seconds = a.seconds or (3.0 if q else 10.0)
    if not 0 < a.seconds <= 3600 or not 0 < a.repeat <= 100:
        ap.error("--seconds must be in (0, 3600] and --repeat in [1, 100]")
    try:
        a.scan = [int(n) for n in a.scan.split(",")] if a.scan else []
    except ValueError:
        ap.error(f"--scan takes connection counts like 1,10,50,200, not {a.scan!r}")
    if any(not 1 <= n <= 1000 for n in a.scan):
        ap.error("--scan connection counts must be in [1, 1000]")
    return a


def scan(
    paths: list[Path_], backend: dict[str, int], args: argparse.Namespace, work: Path
) -> dict[str, dict[str, Any]]:
    """Each path at each connection count (interleaved, --repeat times); medians per (count, path)."""
    cells: dict[tuple[int, str], Path_] = {}
    threads = args.threads
    for conns in args.scan:
        args.connections = conns
        args.threads = min(threads, conns)  # wrk needs a connection per thread
        for r in range(args.repeat):
            for p in paths:
                fresh = Path_(
                    p.name, p.url, p.proxies, h2=p.h2, grpc_body=p.grpc_body, backend_pids=p.backend_pids
                )
                cell_ = cells.setdefault((conns, p.name), fresh)
                load = measure(cell_, backend, args, work, args.seconds)
                print(
                    f"  -c{conns:<4d} run {r + 1}/{args.repeat} {p.name:13s} {load.rps:9.0f} req/s  "
                    f"p50 {load.p50_ms:6.2f} ms  p99 {load.p99_ms:6.2f} ms"
                )
    lines = [["-c", "path", "req/s", "p50 ms", "p99 ms", "CPU us/req", "cores busy (per process, machine)"]]
    out: dict[str, dict[str, Any]] = {}
    for (conns, name), cell_ in cells.items():
        res = summarize(cell_)
        out[f"{name}@c{conns}"] = res
        cpu = res["cpu_s_per_1k_proxies"]
        busy = ", ".join(f"{k}={v:.2f}" for k, v in res["cpu_cores_busy"].items() if v is not None)
        lines.append(
            [
                str(conns),
                name,
                f"{res['rps']:.0f}",
                f"{res['p50_ms']:.2f}",
                f"{res['p99_ms']:.2f}",
                "-" if cpu is None else f"{cpu * 1000:.0f}",
                busy,
            ]
        )
    print()
    c.print_aligned(lines)
    return out


def run(args: argparse.Namespace) -> int:
    wanted = set(args.paths.split(","))
    unknown = wanted - set(ALL_PATHS)
    if unknown:
        raise SystemExit(f"unknown --paths {sorted(unknown)}; choose from {', '.join(ALL_PATHS)}")
    tool = h.which_loadgen(args.loadgen)
    if tool is None:
        print(
            "ERROR: no load generator: install Debian's `wrk` (or `nghttp2-client` for h2load): "
            "apt-get install wrk nghttp2-client",
            file=sys.stderr,
        )
        return 2
    args.loadgen = tool
    if h.NGINX is None:
        print(
            "ERROR: nginx not installed (apt-get install nginx): it is both the backend and the yardstick",
            file=sys.stderr,
        )
        return 2
    for ip in (ALPHA_IP, BETA_IP, PROXY_IP, WP_IP, BACKEND_L4_IP):
        c.check_loopback(ip)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="meshd-bench-l7-"))
    procs = Procs()
    t_start = time.monotonic()
    load_before = os.getloadavg()
    try:
        workers = args.nginx_workers
        backend_pids = start_nginx(
            procs,
            work,
            "nginx-backend",
            lambda p: h.nginx_backend_conf(
                p,
                [
                    f"{BETA_IP}:{BACKEND_PORT}",
                    f"{BACKEND_L4_IP}:{BACKEND_PORT}",
                    f"{BETA_IP}:{BACKEND_H2_PORT} http2",
                ],
                workers,
            ),
            (BETA_IP, BACKEND_PORT),
        )
        backend = {f"backend{i}": pid for i, pid in enumerate(backend_pids)}
        paths: list[Path_] = []
        if "direct" in wanted:
            paths.append(Path_("direct", f"http://{BETA_IP}:{BACKEND_PORT}/", {}))
        if "nginx" in wanted:
            pids = start_nginx(
                procs,
                work,
                "nginx-proxy",
                lambda p: h.nginx_proxy_conf(
                    p, f"{PROXY_IP}:{PROXY_PORT}", f"{BETA_IP}:{BACKEND_PORT}", workers
                ),
                (PROXY_IP, PROXY_PORT),
            )
            paths.append(
                Path_(
                    "nginx", f"http://{PROXY_IP}:{PROXY_PORT}/", {f"nginx{i}": p for i, p in enumerate(pids)}
                )
            )
        if wanted & set(H2_PATHS) and h.H2LOAD is None:
            print("\nNOTE: the *-h2 paths need h2load (apt-get install nghttp2-client): skipped\n")
            wanted -= set(H2_PATHS)
        if "direct-h2" in wanted:
            paths.append(Path_("direct-h2", f"http://{BETA_IP}:{BACKEND_H2_PORT}/", {}, h2=True))

        def start_grpc_pass(name: str, port: int, backend_port: int) -> dict[str, int]:
            """An h2c nginx on PROXY_IP:`port` that grpc_passes to the backend's `backend_port`."""
            pids = start_nginx(
                procs,
                work,
                name,
                lambda p: h.nginx_grpc_proxy_conf(
                    p, f"{PROXY_IP}:{port}", f"{BETA_IP}:{backend_port}", workers
                ),
                None,
            )
            return {f"nginx{i}": p for i, p in enumerate(pids)}

        if "nginx-h2" in wanted:
            nginx_pids = start_grpc_pass("nginx-h2-proxy", PROXY_H2_PORT, BACKEND_H2_PORT)
            paths.append(Path_("nginx-h2", f"http://{PROXY_IP}:{PROXY_H2_PORT}/", nginx_pids, h2=True))
        grpc_backend: dict[str, int] | None = None
        grpc_body = work / "grpc-request.bin"
        if wanted & set(GRPC_PATHS):
            missing = grpc_missing()
            if missing is not None:
                print(f"\nNOTE: the *-grpc paths need {missing}: skipped\n")
                wanted -= set(GRPC_PATHS)
            else:
                grpc_body.write_bytes(b"\0" + len(GRPC_MESSAGE).to_bytes(4, "big") + GRPC_MESSAGE)
                grpc_backend = start_grpc_backend(procs, work)
        grpc_path = {"h2": True, "grpc_body": grpc_body, "backend_pids": grpc_backend}
        if "direct-grpc" in wanted:
            probe_grpc("direct-grpc", BETA_IP, BACKEND_GRPC_PORT)
            paths.append(Path_("direct-grpc", grpc_url(BETA_IP, BACKEND_GRPC_PORT), {}, **grpc_path))
        if "nginx-grpc" in wanted:
            nginx_pids = start_grpc_pass("nginx-grpc-proxy", PROXY_GRPC_PORT, BACKEND_GRPC_PORT)
            probe_grpc("nginx-grpc", PROXY_IP, PROXY_GRPC_PORT)
            paths.append(Path_("nginx-grpc", grpc_url(PROXY_IP, PROXY_GRPC_PORT), nginx_pids, **grpc_path))
        meshd_missing: str | None = None
        mesh_pids: dict[str, int] = {}
        l4_missing: str | None = None
        if wanted & {"meshd", "meshd+filters", *FILTER_PATHS, "meshd-l4", "meshd-h2", "meshd-grpc"}:
            try:
                ca = work / "ca"
                meshd("ca", "init", "--dir", str(ca), "--trust-domain", TD)
                mesh_pids = start_meshd(procs, work, ca, args.rate)
                if wanted & set(WAYPOINT_PATHS):
                    probe_meshd()
            except RuntimeError as exc:
                meshd_missing = str(exc).splitlines()[0]
            if "meshd-l4" in wanted:
                try:
                    if not mesh_pids:
                        raise RuntimeError(meshd_missing or "meshd did not start")
                    probe_l4()
                    l4 = {k: v for k, v in mesh_pids.items() if k != "wp"}  # the waypoint is not on this path
                    paths.append(Path_("meshd-l4", f"http://{ALPHA_IP}:{UPSTREAM_L4_PORT}/", l4))
                except RuntimeError as exc:
                    l4_missing = str(exc).splitlines()[0]
                    print(f"\nNOTE: the meshd-l4 column is missing: {l4_missing}\n")
            if meshd_missing is None:
                base = f"http://{ALPHA_IP}:{UPSTREAM_PORT}"
                if "meshd" in wanted:
                    paths.append(Path_("meshd", base + "/", dict(mesh_pids)))
                if "meshd+filters" in wanted:
                    paths.append(Path_("meshd+filters", base + FILTERED_PREFIX + "/", dict(mesh_pids)))
                if "meshd+headers" in wanted:
                    paths.append(Path_("meshd+headers", base + HEADERS_PREFIX + "/", dict(mesh_pids)))
                if "meshd+wasm" in wanted:
                    if wasm_available():
                        paths.append(Path_("meshd+wasm", base + WASM_PREFIX + "/", dict(mesh_pids)))
                    else:
                        print(
                            "\nNOTE: meshd+wasm is missing: wasmtime is not installed (pip install 'meshd-ambient[wasm]')\n"
                        )
                if "meshd-h2" in wanted:
                    h2_url = f"http://{ALPHA_IP}:{UPSTREAM_H2_PORT}/"
                    paths.append(Path_("meshd-h2", h2_url, dict(mesh_pids), h2=True))
                if "meshd-grpc" in wanted:
                    try:
                        probe_grpc("meshd-grpc", ALPHA_IP, UPSTREAM_GRPC_PORT)
                        if not waypoint_grpc_ok(WP_IP):
                            raise RuntimeError("meshd-grpc: the probe call did not go through the waypoint")
                        url = grpc_url(ALPHA_IP, UPSTREAM_GRPC_PORT)
                        paths.append(Path_("meshd-grpc", url, dict(mesh_pids), **grpc_path))
                    except RuntimeError as exc:
                        print(f"\nNOTE: the meshd-grpc column is missing: {exc}\n")
            elif wanted & set(WAYPOINT_PATHS):
                print(f"\nNOTE: the meshd columns are missing: {meshd_missing}\n")
        paths.sort(key=lambda p: ALL_PATHS.index(p.name))
        warm = min(2.0, args.seconds)
        for p in paths:  # warm-up: connections, pools, caches (not recorded)
            path_load(p, args, warm, work)
        if args.scan:
            print(f"set-up done in {time.monotonic() - t_start:.1f}s; scanning -c {args.scan}")
            scanned = scan(paths, backend, args, work)
            out = RESULTS / f"l7-scan-{stamp}.json"
            doc = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args), "scan": scanned}
            out.write_text(json.dumps(doc, indent=2, default=str))
            print(f"load average (1 min) before/after: {load_before[0]:.2f}/{os.getloadavg()[0]:.2f}")
            print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
            return 0
        print(
            f"set-up done in {time.monotonic() - t_start:.1f}s; measuring {[p.name for p in paths]} with "
            f"{args.loadgen} -t{args.threads} -c{args.connections}, {args.seconds:g}s x {args.repeat}"
        )
        grpc_through_wp = next((p for p in paths if p.name == "meshd-grpc"), None)
        grpc_ok_before = waypoint_grpc_ok(WP_IP) if grpc_through_wp is not None else 0.0
        for r in range(args.repeat):
            for p in paths:  # interleaved, so drift over the run hits every path alike
                load = measure(p, backend, args, work, args.seconds)
                print(
                    f"  run {r + 1}/{args.repeat} {p.name:13s} {load.rps:9.0f} req/s  p50 {load.p50_ms:6.2f} ms  "
                    f"p99 {load.p99_ms:6.2f} ms  non-2xx {load.non_2xx}  socket errors {load.socket_errors}"
                )
        grpc_check = ""
        if grpc_through_wp is not None:
            ok = waypoint_grpc_ok(WP_IP) - grpc_ok_before
            grpc_check = (
                f"meshd-grpc: the waypoint counted {ok:.0f} calls answered with grpc-status 0 for the "
                f"{grpc_through_wp.requests} h2load completed"
            )
        results: dict[str, dict[str, Any] | None] = {p.name: summarize(p) for p in paths}
        if meshd_missing:
            for name in WAYPOINT_PATHS:
                if name in wanted:
                    results[name] = None
        if l4_missing:
            results["meshd-l4"] = None
        order = [args.profile_path] if args.profile_path else ["meshd+filters", "meshd", "meshd-l4"]
        mesh = next((p for name in order for p in paths if p.name == name), None)
        top = profile(mesh, backend, args, work, stamp) if mesh is not None and args.profile else {}

        print()
        print_table(results)
        for line in target_verdict(results) + added_cpu(results) + ([grpc_check] if grpc_check else []):
            print(line)
        if meshd_missing and wanted & set(WAYPOINT_PATHS):
            print(f"meshd columns missing: {meshd_missing}")
        for name, res in results.items():
            if res:
                busy = res["cpu_cores_busy"]
                print(
                    f"cores busy during {name} (nproc={os.cpu_count()}): "
                    + ", ".join(f"{k}={v:.2f}" for k, v in busy.items() if v is not None)
                )
        for role, prof in top.items():
            if isinstance(prof, dict):
                print(
                    f"py-spy {role} by area: "
                    + "; ".join(f"{f} {pct:.0f}%" for f, pct in prof["by_area"][:8])
                )
                print(
                    f"py-spy {role} self time: " + "; ".join(f"{f} {pct:.0f}%" for f, pct in prof["self"][:5])
                )
        if any(r and (r["non_2xx"] or r["socket_errors"]) for r in results.values()):
            print("WARNING: some responses were not 2xx or had socket errors (see the table); check the logs")
        doc = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": {
                "nproc": os.cpu_count(),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "nginx": subprocess.run([h.NGINX, "-v"], capture_output=True, text=True).stderr.strip(),
            },
            "args": vars(args),
            "units": {
                "rps": "requests/s",
                "ms": "milliseconds (load generator's latency distribution)",
                "cpu_s_per_1k": "user+sys CPU seconds per 1,000 requests",
                "rss": "MiB (VmHWM)",
            },
            "results": results,
            "meshd_missing": meshd_missing,
            "meshd_l4_missing": l4_missing,
            "profile": top,
            "load_average_before_after": [load_before[0], os.getloadavg()[0]],
            "elapsed_s": time.monotonic() - t_start,
        }
        out = RESULTS / f"l7-{stamp}.json"
        out.write_text(json.dumps(doc, indent=2, default=str))
        la = os.getloadavg()[0]
        print(
            f"load average (1 min) before/after: {load_before[0]:.2f}/{la:.2f}; other busy processes skew figures"
        )
        shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
        print(f"\nwrote {shown} ({time.monotonic() - t_start:.0f}s)")
        return 0
    finally:
        procs.close()
        if args.keep_work:
            print(f"work directory kept (configs, daemon logs): {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    return c.main_with_cleanup(lambda: run(parse_args(sys.argv[1:])))


if __name__ == "__main__":
    sys.exit(main())
