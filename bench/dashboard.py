"""Dashboard rendering in headless Chromium: a mesh of 50 services and 200 edges (the issue's target:
under 1 s), side by side with an empty mesh (Chromium's own start and page load) and with the cose
force layout forced (the default switches to breadthfirst above 120 elements).

    .venv/bin/python bench/dashboard.py [--services 50] [--edges 200] [--runs 3]

Each run starts Debian's chromium (`--headless --dump-dom`), which loads the page from a loopback
server that inlines the mesh (`window.__MESH__`: the page draws it at load, no /api/mesh fetch).
Reported per case, median of the runs: `render` = the page's own measure of building the graph and
laying it out (performance.now() around cytoscape's construction; the canvas paints on the next frame),
`wall` = Chromium's whole run (start, load, script, DOM dump), `cpu` = Chromium's CPU time (all its
processes) for the run. Loopback only; bounded: `--runs` runs of a 60 s timeout each.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from meshd.dashboard import FILES, STATIC  # noqa: E402
from meshd.observe.graph import BUCKETS, mesh_graph  # noqa: E402
from tests.support.chromium import dump_dom  # noqa: E402


def synthetic_mesh(services: int, edges: int, seed: int = 15) -> dict[str, Any]:
    """`services` services on 10 nodes (one workload each, two for every third), 2 waypoints, and
    `edges` client -> service edges (HTTP and TCP), as /api/mesh answers it."""
    rnd = random.Random(seed)
    nodes = [f"node{i}" for i in range(10)]
    reports: dict[str, dict[str, Any]] = {
        n: {"node": n, "role": "node", "workloads": [], "services": [], "edges": [], "routes": [], "peers": [],
            "certificates": [], "policy": {"files": [], "dir": None}, "reload": {"last": None, "refused": None},
            "version": "bench", "ready": True, "uptime_s": 60}
        for n in nodes
    }  # fmt: skip
    for wp in ("wp-a", "wp-b"):
        reports[wp] = {
            **reports[nodes[0]],
            "node": wp,
            "role": "waypoint",
            "workloads": [],
            "services": [],
            "edges": [],
        }
    workloads: list[dict[str, Any]] = []
    entries = []
    for i in range(services):
        key = f"svc{i}.default"
        http = i % 2 == 0
        waypoint = ("wp-a", "wp-b")[i % 2] if http else None
        host = reports[nodes[i % len(nodes)]]
        host["services"].append(
            {
                "key": key,
                "ports": [{"port": 80, "target_port": 80, "protocol": "http" if http else "tcp"}],
                "waypoint": waypoint,
            }
        )
        entries.append(
            {
                "service": key,
                "ports": [{"port": 80, "target_port": 80, "protocol": "http" if http else "tcp"}],
                "waypoint": waypoint,
            }
        )
        for j in range(2 if i % 3 == 0 else 1):
            w = {
                "name": f"w{i}-{j}",
                "namespace": "default",
                "service_account": "sa",
                "address": f"10.0.{i}.{j + 1}",
                "ports": [80],
                "services": [key],
            }
            host["workloads"].append(w)
            workloads.append(
                {
                    "node": host["node"],
                    "workload": f"w{i}-{j}.default",
                    "address": w["address"],
                    "ports": [80],
                    "services": [key],
                }
            )
    for k in range(edges):
        i = rnd.randrange(services)
        src = rnd.choice(workloads)["workload"]
        dst = f"w{i}-0.default"
        if i % 2 == 0:
            buckets = [0.0] * len(BUCKETS)
            buckets[rnd.randrange(8)] = 60.0
            reports[("wp-a", "wp-b")[i % 2]]["edges"].append(
                {
                    "protocol": "http",
                    "source": src,
                    "service": f"svc{i}.default",
                    "destination": dst,
                    "security": "mutual_tls",
                    "rps": rnd.uniform(0.1, 50),
                    "error_rate": rnd.choice([0, 0, 0.01, 0.2]),
                    "requests_total": 100 + k,
                    "buckets": buckets,
                }
            )
        else:
            reports[nodes[i % len(nodes)]]["edges"].append(
                {"protocol": "tcp", "source": src, "service": f"svc{i}.default", "destination": dst,
                 "security": rnd.choice(["mutual_tls", "none"]), "cps": rnd.uniform(0.1, 5), "bytes_per_s": rnd.uniform(1e3, 1e7),
                 "connections_total": k, "bytes_total": 1000 * k})  # fmt: skip
    ordered = [reports[k] for k in sorted(reports)]
    return {
        "generated_at": time.time(), "from": "node0", "reports": ordered, "errors": {},
        "catalog": {"service_entries": entries, "workloads": workloads, "waypoints": {e["service"]: {"waypoint": e["waypoint"], "binding": "service"} for e in entries if e["waypoint"]}},
        "graph": mesh_graph(ordered),
    }  # fmt: skip


def serve(mesh: dict[str, Any]) -> tuple[ThreadingHTTPServer, str]:
    page = (STATIC / "index.html").read_text().replace("<!--STATUS-->", "<p>bench</p>")
    page = page.replace(
        '<script src="/dashboard.js">',
        f'<script>window.__MESH__ = {json.dumps(mesh)};</script>\n<script src="/dashboard.js">',
    )
    files = {path: (STATIC / name).read_bytes() for path, (name, _) in FILES.items()}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            body = page.encode() if path == "/" else files.get(path)
            self.send_response(200 if body is not None else 404)
            self.send_header("content-length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def run_once(url: str) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    dom = dump_dom(url, timeout=60)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.search(r'data-render-ms="([0-9.]+)"', dom)
    n = re.search(r'data-elements="(\d+)"', dom)
    assert m and n, "the page did not draw the mesh"
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"render_ms": float(m[1]), "wall_s": wall, "cpu_s": cpu, "elements": float(n[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=50)
    ap.add_argument("--edges", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    cases = [
        ("1 service, no edges (Chromium + page alone)", synthetic_mesh(1, 0), ""),
        (
            f"{args.services} services / {args.edges} edges, default layout",
            synthetic_mesh(args.services, args.edges),
            "",
        ),
        (
            f"{args.services} services / {args.edges} edges, cose forced",
            synthetic_mesh(args.services, args.edges),
            "?layout=cose",
        ),
    ]
    print(
        f"command: {' '.join(sys.argv)}  (headless Debian chromium, medians of {args.runs}; a shared, loaded machine)"
    )
    results = []
    for name, mesh, query in cases:
        server, url = serve(mesh)
        try:
            runs = [run_once(url + query) for _ in range(args.runs)]
        finally:
            server.shutdown()
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results.append((name, med))
    base = results[0][1]
    print(f"{'case':<48} {'elements':>8} {'render ms':>10} {'wall s':>7} {'cpu s':>6} {'wall - empty':>12}")
    for name, med in results:
        print(
            f"{name:<48} {med['elements']:>8.0f} {med['render_ms']:>10.1f} {med['wall_s']:>7.2f} {med['cpu_s']:>6.2f} {med['wall_s'] - base['wall_s']:>11.2f}s"
        )
    target = results[1][1]
    verdict = "meets" if target["render_ms"] < 1000 else "MISSES"
    print(
        f"target: render < 1000 ms at {args.services} services / {args.edges} edges: {target['render_ms']:.0f} ms, {verdict} it"
    )


if __name__ == "__main__":
    main()
