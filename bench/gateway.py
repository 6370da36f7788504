"""Gateway benchmark: what the gateway hop (double HBONE) costs against node -> node in one network,
side by side in one run.

Five daemons on loopback (127.236.56.0/24): alpha (network "a", the client side, one upstream listener
per path) and gwa (network a's gateway, for catalog exchange only); beta (network "a") hosts the
`near` target; gwb (network "b"'s gateway) and gamma (network "b") host the `far` target. The paths:

  direct   client -> alpha -> HBONE -> beta -> target
  gateway  client -> alpha -> outer HBONE -> gwb -> (inner HBONE, end to end) -> gamma -> target

Each path: bulk throughput over one connection (bytes the sink counted), 100 B round trips on one
connection (p50/p99), CPU seconds of the proxies per GB moved. Medians of `--repeat` rounds; the two
paths alternate inside each round. Usage:

    .venv/bin/python bench/gateway.py [--repeat 3] [--seconds 3] [--rounds 2000]

Writes bench/results/gateway-<timestamp>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c
from l4 import Procs, http_get, wait_until

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NET = "127.236.56"
IPS = {"alpha": f"{NET}.2", "beta": f"{NET}.3", "gamma": f"{NET}.4", "gwa": f"{NET}.5", "gwb": f"{NET}.6"}
SINK_PORT, ECHO_PORT = 7001, 7000
TD = "bench.arpa"
LISTEN = {"direct": (IPS["alpha"], 17100), "gateway": (IPS["alpha"], 17200)}  # + 0 echo, + 1 sink


def target(name: str, ip: str) -> str:
    return (
        f'[[workload]]\nname = "{name}"\naddress = "{ip}"\nports = [{ECHO_PORT}, {SINK_PORT}]\n'
        f'services = ["{name}"]\n'
        f'[[service]]\nname = "{name}"\nports = [{{ port = {ECHO_PORT} }}, {{ port = {SINK_PORT} }}]\n'
    )


def start(procs: Procs, work: Path) -> dict[str, int]:
    subprocess.run(
        [sys.executable, "-m", "meshd", "ca", "init", "--dir", str(work / "ca"), "--trust-domain", TD],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for ip in (IPS["beta"], IPS["gamma"]):
        cmd = [sys.executable, str(Path(__file__).resolve()), "_serve", ip]
        p = procs.start(
            f"targets-{ip}", cmd, work / f"targets-{ip}.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert p.stdout is not None
        if p.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"target servers on {ip} failed")
    ups = "".join(
        f'[[upstream]]\nservice = "{svc}.default"\nport = {port}\nlisten = "{LISTEN[path][0]}:{LISTEN[path][1] + i}"\n'
        for path, svc in (("direct", "near"), ("gateway", "far"))
        for i, port in enumerate((ECHO_PORT, SINK_PORT))
    )
    gw = '[gateway]\npublic = "{ip}:15008"\nremote = ["{other}:15008"]\n'
    configs = {
        "alpha": (
            "a",
            ["beta", "gwa"],
            f'[[workload]]\nname = "client"\naddress = "{IPS["alpha"]}"\nports = [8000]\n' + ups,
            "",
        ),
        "beta": ("a", ["alpha", "gwa"], target("near", IPS["beta"]), ""),
        "gwa": ("a", ["alpha", "beta"], gw.format(ip=IPS["gwa"], other=IPS["gwb"]), 'role = "gateway"\n'),
        "gwb": ("b", ["gamma"], gw.format(ip=IPS["gwb"], other=IPS["gwa"]), 'role = "gateway"\n'),
        "gamma": ("b", ["gwb"], target("far", IPS["gamma"]), ""),
    }
    started = {}
    for name, (network, peers, body, top) in configs.items():
        cfg = c.daemon_config(
            name,
            IPS[name],
            work / "ca",
            [IPS[p] for p in peers],
            body,
            work,
            trust_domain=TD,
            top=top + f'network = "{network}"\n',
        )
        log = work / f"meshd-{name}.log"
        started[name] = (procs.start(name, [sys.executable, "-m", "meshd", "run", "-c", str(cfg)], log), log)
    for name, (p, log) in started.items():
        url = f"http://{IPS[name]}:15021/healthz/ready"
        wait_until(f"meshd {name} ready", lambda u=url: http_get(u)[0] == 200, p, log, timeout=60)
    p, log = started["alpha"]

    def knows_both() -> bool:
        alpha = json.loads(http_get(f"http://{IPS['alpha']}:15000/config_dump")[1])["catalog"]
        gwb = json.loads(http_get(f"http://{IPS['gwb']}:15000/config_dump")[1])["catalog"]
        return {"near.default", "far.default"} <= set(alpha["services"]) and "alpha" in gwb["nodes"]

    wait_until("alpha knows far.default and gwb knows alpha", knows_both, p, log, timeout=60)
    return {name: proc.pid for name, (proc, _) in started.items()}


PROXIES = {"direct": ("alpha", "beta"), "gateway": ("alpha", "gwb", "gamma")}


def measure(path: str, pids: dict[str, int], args: argparse.Namespace) -> dict[str, float]:
    host, base = LISTEN[path]
    before = {n: c.cpu_seconds(pids[n]) for n in PROXIES[path]}
    moved, elapsed = c.bulk((host, base + 1), 1, args.seconds, 0)
    cpu = {n: c.cpu_seconds(pids[n]) - t for n, t in before.items()}
    rtt = c.percentiles(c.latency((host, base), args.rounds))
    gb = moved / 1e9 if moved else float("nan")
    return {
        "gbit_s": moved * 8 / elapsed / 1e9,
        "cpu_s_per_gb": sum(cpu.values()) / gb,
        **{f"cpu_s_per_gb_{n}": t / gb for n, t in cpu.items()},
        "rtt_p50_us": rtt.p50,
        "rtt_p99_us": rtt.p99,
    }


def run(args: argparse.Namespace) -> int:
    procs = Procs()
    work = Path(tempfile.mkdtemp(prefix="meshd-bench-gateway-"))
    try:
        pids = start(procs, work)
        samples: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
        for _ in range(args.repeat):
            for path in samples:
                samples[path].append(measure(path, pids, args))
    finally:
        procs.close()
    med = {
        path: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for path, runs in samples.items()
    }
    d, g = med["direct"], med["gateway"]
    ratios = {
        "throughput_gateway_over_direct": g["gbit_s"] / d["gbit_s"],
        "rtt_p50_added_us": g["rtt_p50_us"] - d["rtt_p50_us"],
        "rtt_p99_added_us": g["rtt_p99_us"] - d["rtt_p99_us"],
        "cpu_per_gb_gateway_over_direct": g["cpu_s_per_gb"] / d["cpu_s_per_gb"],
    }
    rows = [["path", "bulk Gbit/s", "CPU s/GB (proxies)", "RTT p50 us", "RTT p99 us"]]
    for path, m in med.items():
        rows.append(
            [
                path,
                f"{m['gbit_s']:.2f}",
                f"{m['cpu_s_per_gb']:.2f}",
                f"{m['rtt_p50_us']:.0f}",
                f"{m['rtt_p99_us']:.0f}",
            ]
        )
    c.print_aligned(rows)
    for path, m in med.items():
        shares = ", ".join(
            f"{k.removeprefix('cpu_s_per_gb_')} {v:.2f}"
            for k, v in m.items()
            if k.startswith("cpu_s_per_gb_")
        )
        print(f"{path}: CPU s/GB by daemon: {shares}")
    print(
        f"gateway/direct throughput {ratios['throughput_gateway_over_direct']:.2f}x, "
        f"CPU per GB {ratios['cpu_per_gb_gateway_over_direct']:.2f}x, "
        f"RTT p50 +{ratios['rtt_p50_added_us']:.0f} us, p99 +{ratios['rtt_p99_added_us']:.0f} us"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"gateway-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "samples": samples,
                "medians": med,
                "ratios": ratios,
            },
            indent=2,
        )
    )
    print(f"written {out}")
    return 0


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "_serve":
        c.serve(c.check_loopback(sys.argv[2]), SINK_PORT, ECHO_PORT)
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="bulk send time per measurement")
    parser.add_argument("--rounds", type=int, default=2000, help="100 B round trips per measurement")
    args = parser.parse_args()
    return c.main_with_cleanup(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
