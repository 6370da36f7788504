"""The etcd catalog benchmark: 200 simulated nodes publishing and watching through one etcd member.

    .venv/bin/python bench/etcd_catalog.py [--nodes 200] [--changes 10] [--idle 10] [--repeat 3] [--quick]

Each simulated node is meshd's own `EtcdDiscovery` (meshd/discovery/etcd.py: lease, keepalive, put,
watch, over httpx under trio, TLS with a client certificate), all in this one process, with a
callback in place of the peer poller. Side by side, in the same run and against the same etcd, the
alternative a rendezvous without watches would use: every node lists the prefix once a second
(`--poll`, default 1 s) with the same pure layer. Reported, medians of `--repeat` runs:

- converge: from start until every node has seen every other's entry;
- change -> all: one node's catalog revision changes (`set_revision`), until every other node holds
  it (p50 and max over `--changes` changes, one at a time);
- CPU while idle (keepalives only) and per change: etcd's (from /proc) and the nodes' (this
  process), in CPU-seconds per second and CPU-milliseconds per change.

etcd listens on 127.58.0.1 (loopback only); it is started here and stopped on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshd.config.model import EtcdConfig  # noqa: E402
from meshd.discovery import etcd_wire as wire  # noqa: E402
from meshd.discovery.etcd import EtcdDiscovery  # noqa: E402
from meshd.identity.ca import LocalCA  # noqa: E402
from meshd.units import Address  # noqa: E402
from tests.support.etcd import Etcdctl, EtcdMember, EtcdPki  # noqa: E402

IP = "127.58.0.1"
TD = "bench.arpa"
PREFIX = wire.default_prefix(TD)
HZ = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def own_cpu() -> float:
    return time.process_time()


@dataclass
class Tracker:
    """Who holds which revision of whose entry."""

    nodes: int
    held: dict[str, dict[str, str]] = field(default_factory=dict)  # receiver -> node -> revision
    waiting: tuple[str, str] | None = None  # (node, revision) a change is waiting for
    reached: set[str] = field(default_factory=set)
    done: trio.Event = field(default_factory=trio.Event)

    def seen(self, receiver: str, node: str, revision: str) -> None:
        self.held.setdefault(receiver, {})[node] = revision
        if self.waiting == (node, revision) and receiver != node:
            self.reached.add(receiver)
            if len(self.reached) == self.nodes - 1:
                self.done.set()

    def converged(self) -> bool:
        return len(self.held) == self.nodes and all(len(h) == self.nodes - 1 for h in self.held.values())

    def expect(self, node: str, revision: str) -> None:
        self.waiting, self.reached, self.done = (node, revision), set(), trio.Event()
        for receiver, held in self.held.items():
            if held.get(node) == revision:
                self.reached.add(receiver)


class Poller:
    """The alternative: publish with a lease like meshd, but list the prefix every `interval`
    instead of watching it."""

    def __init__(self, name: str, url: str, ctx: ssl.SSLContext, interval: float, tracker: Tracker) -> None:
        self.name, self.url, self.ctx, self.interval, self.tracker = name, url, ctx, interval, tracker
        self.revision = "0"
        self.view = wire.EtcdView(PREFIX, TD, name)
        self._wake = trio.Event()

    def set_revision(self, revision: str) -> None:
        self.revision = revision
        self._wake.set()

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, verify=self.ctx, timeout=10) as client:

            async def call(req: wire.Request) -> Any:
                return (await client.post(req[0], json=req[1])).json()

            lease = wire.parse_grant(await call(wire.grant(30)))

            async def publish() -> None:
                entry = wire.NodeEntry(TD, self.name, "node", Address("127.58.1.1", 15008), self.revision)
                await call(wire.put(wire.node_key(PREFIX, self.name), entry.encode(), lease.id))

            async def keepalive() -> None:
                while True:
                    await trio.sleep(10)
                    await call(wire.keepalive(lease.id))

            async def republish() -> None:
                while True:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    await publish()

            await publish()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keepalive)
                nursery.start_soon(republish)
                while True:
                    for hint in self.view.reset(
                        wire.parse_range(await call(wire.range_prefix(PREFIX.encode())))
                    ):
                        if isinstance(hint, wire.Seen):
                            self.tracker.seen(self.name, hint.node, hint.revision)
                    await trio.sleep(self.interval)


async def one_run(
    mode: str, args: argparse.Namespace, url: str, ctx: ssl.SSLContext, etcd_pid: int
) -> dict[str, Any]:
    tracker = Tracker(args.nodes)
    nodes: list[Any] = []
    for i in range(args.nodes):
        name = f"n{i:03d}"
        if mode == "watch":
            settings = EtcdConfig(endpoints=(url,), prefix=PREFIX, lease_ttl=timedelta(seconds=30))

            def on_peer(node: str, address: Address, revision: str, me: str = name) -> None:
                tracker.seen(me, node, revision)

            nodes.append(
                EtcdDiscovery(
                    settings,
                    trust_domain=TD,
                    node=name,
                    role="node",
                    hbone=Address("127.58.1.1", 15008),
                    revision="0",
                    on_peer=on_peer,
                    on_gone=lambda node: None,
                    ssl_context=lambda: ctx,
                )
            )
        else:
            nodes.append(Poller(name, url, ctx, args.poll, tracker))
    out: dict[str, Any] = {"mode": mode}
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        for node in nodes:
            nursery.start_soon(node.run)
        with trio.fail_after(120):
            while not tracker.converged():
                await trio.sleep(0.02)
        out["converge_s"] = trio.current_time() - start
        await trio.sleep(1)  # let the start-up burst settle before measuring idle CPU
        etcd0, own0, t0 = cpu_of(etcd_pid), own_cpu(), time.monotonic()
        await trio.sleep(args.idle)
        wall = time.monotonic() - t0
        out["idle_etcd_cpu"] = (cpu_of(etcd_pid) - etcd0) / wall
        out["idle_nodes_cpu"] = (own_cpu() - own0) / wall
        latencies = []
        etcd0, own0 = cpu_of(etcd_pid), own_cpu()
        for k in range(args.changes):
            changer = nodes[(k * 37) % len(nodes)]
            revision = f"{k + 1:x}"
            tracker.expect(changer.node if mode == "watch" else changer.name, revision)
            t = trio.current_time()
            changer.set_revision(revision)
            with trio.fail_after(60):
                await tracker.done.wait()
            latencies.append(trio.current_time() - t)
        out["change_p50_ms"] = statistics.median(latencies) * 1000
        out["change_max_ms"] = max(latencies) * 1000
        out["etcd_cpu_ms_per_change"] = (cpu_of(etcd_pid) - etcd0) * 1000 / args.changes
        out["nodes_cpu_ms_per_change"] = (own_cpu() - own0) * 1000 / args.changes
        nursery.cancel_scope.cancel()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle (keepalives only) measured")
    ap.add_argument("--poll", type=float, default=1.0, help="the polling alternative's interval")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 50 nodes, 3 changes, 3 s idle")
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.nodes, args.changes, args.idle = 1, 50, 3, 3.0
    if shutil.which("etcd") is None:
        raise SystemExit("etcd not installed: apt-get install etcd-server etcd-client")
    args.load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="meshd-bench-etcd-"))
    LocalCA.init(tmp / "ca", TD)
    pki = EtcdPki.create(tmp / "pki", tmp / "ca" / "ca.crt")
    member = EtcdMember("bench", IP, tmp / "etcd", pki)
    member.start([member])
    try:
        Etcdctl([member.client_url], pki).wait_healthy(members=[member])
        assert member.proc is not None
        client_cert, client_key = pki.issue("client", cn="bench-client")
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.load_cert_chain(str(client_cert), str(client_key))
        runs: list[dict[str, Any]] = []
        for r in range(args.repeat):
            for mode in ("watch", "poll"):  # interleaved, so drift hits both alike
                result = trio.run(one_run, mode, args, member.client_url, ctx, member.proc.pid)
                print(
                    f"run {r + 1} {mode}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})}",
                    flush=True,
                )
                runs.append(result)
    finally:
        member.stop()
    report(runs, args)
    shutil.rmtree(tmp, ignore_errors=True)


def report(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["mode"] == mode)

    rows: list[tuple[str, str, Callable[[float], str]]] = [
        ("converge (all see all)", "converge_s", lambda v: f"{v:.2f} s"),
        ("change -> all, p50", "change_p50_ms", lambda v: f"{v:.0f} ms"),
        ("change -> all, max", "change_max_ms", lambda v: f"{v:.0f} ms"),
        ("etcd CPU, idle", "idle_etcd_cpu", lambda v: f"{v * 100:.1f} % of a core"),
        ("nodes' CPU, idle", "idle_nodes_cpu", lambda v: f"{v * 100:.1f} % of a core"),
        ("etcd CPU during the changes, per change", "etcd_cpu_ms_per_change", lambda v: f"{v:.0f} ms"),
        ("nodes' CPU during the changes, per change", "nodes_cpu_ms_per_change", lambda v: f"{v:.0f} ms"),
    ]
    print(
        f"\n{args.nodes} nodes, {args.changes} changes, idle {args.idle:g} s, poll every {args.poll:g} s; "
        f"medians of {args.repeat}; load average before/after: {args.load_before:.2f}/{os.getloadavg()[0]:.2f}"
    )
    print("| | watch (meshd) | poll the prefix | watch / poll |\n| --- | --- | --- | --- |")
    for label, key, fmt in rows:
        w, p = med("watch", key), med("poll", key)
        ratio = f"{w / p:.2f}x" if p else "-"
        print(f"| {label} | {fmt(w)} | {fmt(p)} | {ratio} |")


if __name__ == "__main__":
    main()
