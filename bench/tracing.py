"""What trace export costs the waypoint: CPU per proxied request with tracing off, and on (every
request sampled, spans sent to a local OTLP receiver), side by side.

    .venv/bin/python bench/tracing.py [--requests 400] [--runs 3]

Each run starts two nodes and a waypoint (tests/support/mesh.py) once per case, sends `--requests`
sequential keep-alive requests through client -> alpha -> wp -> beta -> backend, and reads the waypoint's
CPU time (utime + stime from /proc/PID/stat) before and after. The receiver decodes every export with
the official protos (tests/support/otlp_receiver.py), in this process. Medians of `--runs`; loopback
only, bounded by the request count and socket timeouts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.mesh import three_daemons  # noqa: E402
from tests.support.otlp_receiver import otlp_receiver  # noqa: E402
from tests.support.procs import unique_loopback, wait_for  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def run(requests: int, tracing: str) -> tuple[float, float]:
    """(waypoint CPU microseconds per request, wall seconds) for one case."""
    with tempfile.TemporaryDirectory(prefix="meshd-bench-tracing-") as tmp:
        cfg = {"alpha": tracing, "wp": tracing, "beta": tracing}
        with three_daemons(
            Path(tmp), extra=cfg, routes='[[route]]\nname = "all"\nservice = "reviews.default"\n'
        ) as mesh:
            assert mesh.wp.proc is not None
            conn = mesh.client()
            for _ in range(20):  # warm: pooled tunnels and connections open
                conn.request("GET", "/warm")
                conn.getresponse().read()
            before, started = cpu_seconds(mesh.wp.proc.pid), time.monotonic()
            for i in range(requests):
                conn.request("GET", f"/r/{i}")
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200
            wall = time.monotonic() - started
            if tracing:  # the exporter's work belongs to the requests: wait until it was done
                wait_for(
                    lambda: mesh.wp.metric("meshd_tracing_spans_exported_total") >= 2 * (requests + 20),
                    mesh.wp,
                )
            cpu = cpu_seconds(mesh.wp.proc.pid) - before
            conn.close()
            return cpu / requests * 1e6, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print(f"command: {' '.join(sys.argv)}  (medians of {args.runs}; a shared, loaded 2-core machine)")
    with otlp_receiver(unique_loopback()) as rx:
        on = f'[tracing]\notlp = "{rx.url}"\ninterval = "200ms"\n'
        results = {}
        for name, cfg in (("tracing off", ""), ("tracing on, 100% sampled", on)):
            runs = [run(args.requests, cfg) for _ in range(args.runs)]
            results[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        assert not rx.errors, rx.errors
    base = results["tracing off"][0]
    print(f"{'case':<28} {'wp CPU us/request':>18} {'ratio':>6} {'wall s':>7}")
    for name, (cpu, wall) in results.items():
        print(f"{name:<28} {cpu:>18.0f} {cpu / base:>6.2f} {wall:>7.2f}")


if __name__ == "__main__":
    main()
