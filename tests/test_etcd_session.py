"""EtcdDiscovery in-process against a real etcd member reached through a TCP relay the test can cut:
failover past a dead endpoint, a broken watch resumed from its revision (no new listing), a
compacted revision listed again, and the lease revoked on drain."""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import trio

from meshd.config.model import EtcdConfig
from meshd.discovery.etcd import EtcdDiscovery
from meshd.identity.ca import LocalCA
from meshd.units import Address
from tests.support.etcd import Etcdctl, EtcdMember, EtcdPki, Relay, etcd_cluster
from tests.support.procs import unique_loopback

pytestmark = pytest.mark.slow
BASE = "/meshd/home.arpa/nodes/"


async def until(condition: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.05)  # polling a condition, with a deadline
        return
    raise AssertionError(f"not within {timeout}s: {what}")


def entry(node: str, ip: str) -> str:
    return json.dumps(
        {"v": 1, "td": "home.arpa", "node": node, "role": "node", "hbone": f"{ip}:15008", "rev": "ab"}
    )


async def test_failover_resume_compaction_and_drain(tmp_path: Path) -> None:
    LocalCA.init(tmp_path / "ca", "home.arpa")
    pki = EtcdPki.create(tmp_path / "pki", tmp_path / "ca" / "ca.crt")
    relay_ip = unique_loopback()
    member = EtcdMember("m1", unique_loopback(), tmp_path / "etcd-m1", pki, extra_ips=[relay_ip])
    ctl = Etcdctl([member.client_url], pki)
    client_cert, client_key = pki.issue("client", cn="node-self")

    def tls() -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.load_cert_chain(str(client_cert), str(client_key))
        return ctx

    async def etcdctl(*args: str) -> str:
        return await trio.to_thread.run_sync(lambda: ctl.run(*args))

    seen: list[str] = []
    gone: list[str] = []
    with etcd_cluster([member]):
        await trio.to_thread.run_sync(lambda: ctl.wait_healthy(members=[member]))
        relay = Relay(relay_ip, (member.ip, member.client_port))
        try:
            dead = f"https://{unique_loopback()}:2379"  # nothing listens there
            settings = EtcdConfig(endpoints=(dead, relay.url), lease_ttl=timedelta(seconds=3))
            disc = EtcdDiscovery(
                settings,
                trust_domain="home.arpa",
                node="self",
                role="node",
                hbone=Address("127.0.0.9", 15008),
                revision="0a",
                on_peer=lambda node, address, rev: seen.append(node),
                on_gone=gone.append,
                ssl_context=tls,
            )
            stats = disc.statistics
            async with trio.open_nursery() as nursery:
                await nursery.start(disc.run)
                await until(lambda: stats().connected, "connected through the second endpoint")
                assert stats().endpoint == relay.url and stats().failures >= 1 and stats().listings == 1
                assert json.loads(await etcdctl("get", BASE + "self", "--print-value-only"))["rev"] == "0a"
                disc.set_revision("0b")
                await until(lambda: stats().published.get("revision") == "0b", "republished")

                await etcdctl("put", BASE + "p1", entry("p1", "127.0.0.11"))
                await until(lambda: "p1" in seen, "p1 seen through the watch")

                # Cut: the watch breaks; changes made meanwhile arrive by resuming, not by a listing.
                relay.cut()
                await until(lambda: not stats().connected or stats().watch_resumes > 0, "the cut noticed")
                await etcdctl("put", BASE + "p2", entry("p2", "127.0.0.12"))
                await etcdctl("del", BASE + "p1")
                relay.restore()
                await until(lambda: "p2" in seen and "p1" in gone, "changes during the cut delivered")
                assert stats().listings == 1

                # Cut again and compact past what we saw: the resumed watch is refused; list again.
                relay.cut()
                await until(lambda: not stats().connected or stats().watch_resumes > 1, "the cut noticed")
                await etcdctl("put", BASE + "p3", entry("p3", "127.0.0.13"))
                await etcdctl("del", BASE + "p2")
                revision = json.loads(await etcdctl("get", "x", "-w", "json"))["header"]["revision"]
                await etcdctl("compact", str(revision))
                relay.restore()
                await until(lambda: "p3" in seen and "p2" in gone, "changes after compaction delivered")
                assert stats().listings == 2
                assert sorted(stats().entries) == ["p3"]

                disc.drain()
                await until(
                    lambda: ctl.run("get", BASE + "self", "--print-value-only") == "",
                    "lease revoked on drain",
                )
                nursery.cancel_scope.cancel()
        finally:
            relay.close()
