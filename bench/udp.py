"""UDP benchmark: iperf3 -u direct vs through meshd node -> node (connect-udp over HBONE), side by side.

All on loopback (127.56.0.0/24). For each path and 1 and 8 flows, iperf3 offers a fixed total rate of
1,200-byte datagrams (split evenly over the flows) for a few seconds; the report gives what the
receiver got (packets/s, Mbit/s), the loss iperf3 counted, and meshd's CPU per million datagrams, as
medians of --repeat runs. Usage:

    .venv/bin/python bench/udp.py [--quick] [--repeat N] [--seconds S] [--rate MBIT]

Writes bench/results/udp-<timestamp>.json and prints a table. Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c
from l4 import Procs, http_get, meshd, wait_until

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

NET = "127.56.0"
ALPHA_IP = f"{NET}.2"  # meshd alpha: the TCP + UDP upstream for iperf3
BETA_IP = f"{NET}.3"  # meshd beta; iperf3's server listens here too
IPERF_PORT = 5201
LISTEN_PORT = 15201
TD = "bench.arpa"
IPERF3 = shutil.which("iperf3")
PAYLOAD = 1200  # bytes per datagram (-l)


def start_meshd(procs: Procs, work: Path, ca: Path) -> dict[str, int]:
    # iperf3 -u keeps a TCP control connection beside its UDP data: one TCP and one UDP upstream on
    # the same address, both to the service port (an explicit upstream does not check its protocol).
    alpha = c.daemon_config(
        "alpha",
        ALPHA_IP,
        ca,
        [BETA_IP],
        f'[[workload]]\nname = "client"\naddress = "{ALPHA_IP}"\nports = [8000]\n'
        f'[[upstream]]\nservice = "iperf.default"\nport = {IPERF_PORT}\nlisten = "{ALPHA_IP}:{LISTEN_PORT}"\n'
        f'[[upstream]]\nservice = "iperf.default"\nport = {IPERF_PORT}\nprotocol = "udp"\n'
        f'listen = "{ALPHA_IP}:{LISTEN_PORT}"\n',
        work,
        trust_domain=TD,
    )
    beta = c.daemon_config(
        "beta",
        BETA_IP,
        ca,
        [ALPHA_IP],
        f'[[workload]]\nname = "iperf"\naddress = "{BETA_IP}"\nports = [{IPERF_PORT}]\nservices = ["iperf"]\n'
        f'[[service]]\nname = "iperf"\nports = [{{ port = {IPERF_PORT}, protocol = "udp" }}]\n',
        work,
        trust_domain=TD,
    )
    pids, started = {}, {}
    for name, cfg, ip in (("beta", beta, BETA_IP), ("alpha", alpha, ALPHA_IP)):
        log = work / f"meshd-{name}.log"
        p = procs.start(f"meshd-{name}", [sys.executable, "-m", "meshd", "run", "-c", str(cfg)], log)
        started[name] = (p, ip, log)
        pids[name] = p.pid
    for name, (p, ip, log) in started.items():
        url = f"http://{ip}:15021/healthz/ready"
        wait_until(f"meshd {name} ready", lambda u=url: http_get(u)[0] == 200, p, log)
    p, ip, log = started["alpha"]

    def catalog_lists_iperf() -> bool:
        dump = json.loads(http_get(f"http://{ip}:15000/config_dump")[1])
        return "iperf.default" in dump["catalog"]["services"]

    wait_until("alpha's catalog lists iperf.default", catalog_lists_iperf, p, log)
    return pids


def iperf3_udp(addr: tuple[str, int], flows: int, mbit: float, seconds: float) -> dict[str, float]:
    """`iperf3 -u` at `mbit` Mbit/s in total over `flows` streams; what the receiver saw."""
    assert IPERF3 is not None
    host, port = addr
    per_flow = f"{mbit / flows:g}M"
    cmd = [IPERF3, "-c", host, "-p", str(port), "-u", "-b", per_flow, "-l", str(PAYLOAD)]
    cmd += ["-P", str(flows), "-t", f"{seconds:g}", "-J"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    report = json.loads(out.stdout or "{}")
    if out.returncode != 0 or "error" in report:
        raise RuntimeError(f"iperf3 -u to {host}:{port} failed: {report.get('error') or out.stderr.strip()}")
    s = report["end"]["sum"]
    packets, lost = int(s["packets"]), int(s["lost_packets"])
    received = packets - lost
    secs = float(s["seconds"])
    return {
        "sent_pps": packets / secs,
        "received_pps": received / secs,
        "received_mbps": received * PAYLOAD * 8 / secs / 1e6,
        "loss_percent": 100.0 * lost / packets if packets else 0.0,
        "received": received,
    }


def kernel_drops() -> int:
    """Datagrams the kernel dropped for a full socket buffer (this network namespace, every socket)."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines() if ln.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")]) + int(lines[1][lines[0].index("SndbufErrors")])


def meshd_drops() -> float:
    """meshd_udp_dropped_packets_total of both daemons (every reason)."""
    total = 0.0
    for ip in (ALPHA_IP, BETA_IP):
        for line in http_get(f"http://{ip}:15020/metrics")[1].decode().splitlines():
            if line.startswith("meshd_udp_dropped_packets_total{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 2 s runs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=200.0, help="offered Mbit/s in total (default 200)")
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.seconds = 1, 2.0
    if IPERF3 is None:
        raise SystemExit("iperf3 is not installed (Debian: apt-get install iperf3)")
    args.repeat = max(1, min(args.repeat, 10))
    args.seconds = max(1.0, min(args.seconds, 30.0))
    procs = Procs()
    results: dict[str, dict[int, dict[str, list[float]]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="meshd-bench-udp-") as tmp:
            work = Path(tmp)
            meshd("ca", "init", "--dir", str(work / "ca"), "--trust-domain", TD)
            server = procs.start(
                "iperf3", [IPERF3, "-s", "-B", BETA_IP, "-p", str(IPERF_PORT)], work / "iperf3.log"
            )
            wait_until(
                "iperf3 server",
                lambda: c._connect((BETA_IP, IPERF_PORT)).close() is None,
                server,
                work / "iperf3.log",
            )
            pids = start_meshd(procs, work, work / "ca")
            paths = {"direct": (BETA_IP, IPERF_PORT), "meshd": (ALPHA_IP, LISTEN_PORT)}
            for _ in range(args.repeat):
                for name, addr in paths.items():
                    for flows in (1, 8):
                        before = sum(c.cpu_seconds(p) for p in pids.values())
                        kernel_before, drops_before = kernel_drops(), meshd_drops()
                        r = iperf3_udp(addr, flows, args.rate, args.seconds)
                        cpu = sum(c.cpu_seconds(p) for p in pids.values()) - before
                        r["kernel_drops"] = kernel_drops() - kernel_before
                        r["meshd_drops"] = meshd_drops() - drops_before
                        if name == "meshd":
                            r["meshd_cpu_s_per_mpkt"] = cpu / max(r["received"], 1) * 1e6
                            r["meshd_cores"] = cpu / args.seconds
                        cell = results.setdefault(name, {}).setdefault(flows, {})
                        for k, v in r.items():
                            cell.setdefault(k, []).append(v)
                        time.sleep(0.5)  # let the previous test's flows drain from the kernel buffers
    finally:
        procs.close()
    summary = {
        name: {flows: {k: statistics.median(v) for k, v in cell.items()} for flows, cell in by_flows.items()}
        for name, by_flows in results.items()
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"udp-{stamp}.json"
    out.write_text(
        json.dumps(
            {"args": vars(args), "machine": platform.platform(), "samples": results, "medians": summary},
            indent=1,
        )
    )
    rows = [
        [
            "path",
            "flows",
            "offered pps",
            "received pps",
            "Mbit/s",
            "loss %",
            "kernel drops",
            "meshd drops",
            "meshd CPU s / M datagrams",
        ]
    ]
    for name, by_flows in summary.items():
        for flows, m in sorted(by_flows.items()):
            rows.append(
                [
                    name,
                    str(flows),
                    f"{m['sent_pps']:.0f}",
                    f"{m['received_pps']:.0f}",
                    f"{m['received_mbps']:.0f}",
                    f"{m['loss_percent']:.1f}",
                    f"{m['kernel_drops']:.0f}",
                    f"{m['meshd_drops']:.0f}" if name == "meshd" else "-",
                    f"{m['meshd_cpu_s_per_mpkt']:.0f}" if "meshd_cpu_s_per_mpkt" in m else "-",
                ]
            )
    c.print_aligned(rows)
    print(
        f"\n{args.rate:g} Mbit/s offered, {PAYLOAD}-byte datagrams, {args.seconds:g} s per run, medians of {args.repeat}"
    )
    print(f"results: {out.relative_to(ROOT)}")
    return 0


def _guard() -> int:
    return c.main_with_cleanup(main)


if __name__ == "__main__":
    sys.exit(_guard())
