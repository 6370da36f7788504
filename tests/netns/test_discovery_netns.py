"""Three hosts (network namespaces on one bridge), one meshd each, no address lists (mDNS) or only
static peers: discovery, a cross-host upstream, failover when a host stops, and a rogue announcer.

h1 runs the client and an upstream listener for echo.default:7000; h2 and h3 each host an echo
workload of that service (each answers with its host's label, so the test sees who served it).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest

from meshd.identity.ca import LocalCA, write_issued
from meshd.identity.spiffe import SpiffeId
from tests.netns.lab import Host, Lab, NsMeshd, exchange, host_config, namespaces_or_fail, tagged_echo
from tests.support.procs import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(600)]

ECHO_PORT = 7000
UPSTREAM = ("127.0.0.1", 17000)
ROGUE = Path(__file__).with_name("rogue.py")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with namespaces_or_fail(
        Lab.create, "the multi-host discovery tests need root and iproute2 and are not skipped"
    ) as lab:
        yield lab


def config(tmp: Path, host: Host, mode: str, peers: list[Host], body: str) -> Path:
    static = [f"{p.ip}:15008" for p in peers] if mode == "static" else []
    # mDNS: a long peer_timeout, so a quick withdrawal can only come from the goodbye.
    timeout = "60s" if mode == "mdns" else "3s"
    discovery = (
        f"mdns = {str(mode == 'mdns').lower()}\n"
        f"peers = [{', '.join(repr(s).replace(chr(39), chr(34)) for s in static)}]\n"
        f'refresh = "1s"\npeer_timeout = "{timeout}"\n'
    )
    return host_config(tmp, host.label, discovery, body)


def echo_body(host: Host) -> str:
    return (
        f'[[workload]]\nname = "echo-{host.label}"\naddress = "{host.ip}"\nports = [{ECHO_PORT}]\n'
        f'services = ["echo"]\n'
        f'[[service]]\nname = "echo"\nports = [{{ port = {ECHO_PORT} }}]\n'
    )


def served_by(h1: Host, n: int) -> list[str]:
    return [h1.call(exchange, UPSTREAM, b"ping").decode().split(":")[0] for _ in range(n)]


@pytest.mark.parametrize("mode", ["mdns", "static"])
def test_three_hosts_discover_route_and_fail_over(
    lab: Lab, tmp_path: Path, ca: LocalCA, mode: Literal["mdns", "static"]
) -> None:
    h1, h2, h3 = lab.add_host(), lab.add_host(), lab.add_host()
    client = (
        f'[[workload]]\nname = "client"\naddress = "{h1.ip}"\nports = [8000]\n'
        f'[[upstream]]\nservice = "echo.default"\nport = {ECHO_PORT}\nlisten = "{UPSTREAM[0]}:{UPSTREAM[1]}"\n'
    )
    d1 = NsMeshd(h1, config(tmp_path, h1, mode, [h2, h3], client))
    d2 = NsMeshd(h2, config(tmp_path, h2, mode, [h1, h3], echo_body(h2)))
    d3 = NsMeshd(h3, config(tmp_path, h3, mode, [h1, h2], echo_body(h3)))
    all3 = (d1, d2, d3)
    with tagged_echo(h2, ECHO_PORT), tagged_echo(h3, ECHO_PORT):
        for d in all3:
            d.start()
        for d in all3:
            d.wait_ready()

        # (a) every node finds the two others, by mDNS alone (or from the static list)
        for d in all3:
            took = wait_for(
                lambda d=d: d.nodes() == ["h1", "h2", "h3"],
                *all3,
                timeout=15,
                what=f"{d.host.label} sees all",
            )
            assert took < 15
            peers = d.dump()["peers"]
            assert {p["name"] for p in peers} == {"h1", "h2", "h3"} - {d.host.label}
            assert {p["how"] for p in peers} == {mode}
            assert all(
                p["role"] == "node" and p["revision"] and p["last_seen_s_ago"] is not None for p in peers
            )
        assert d1.metric("meshd_peers") == 2

        # (b) the upstream on h1 reaches the workload on h3 (round robin over h2 and h3)
        assert set(served_by(h1, 4)) == {"h2", "h3"}

        # (c) h3 stops: its endpoints are withdrawn (goodbye, or peer_timeout for static peers) and
        # every new connection is served by h2
        assert d3.stop() == 0
        withdraw_within = 5 if mode == "mdns" else 10
        for d in (d1, d2):
            wait_for(
                lambda d=d: d.nodes() == ["h1", "h2"],
                d,
                d3,
                timeout=withdraw_within,
                what=f"{d.host.label} withdraws h3",
            )
        assert served_by(h1, 6) == ["h2"] * 6
        if mode == "mdns":
            assert "h3._meshd._tcp.local." not in d1.dump()["mdns"]["peers"]
        assert d1.stop() == 0 and d2.stop() == 0


def test_rogue_announcer_adds_nothing(lab: Lab, tmp_path: Path, ca: LocalCA) -> None:
    """A well-formed announcement with no trusted certificate behind it: seen, tried, not believed."""
    h1, h2, rogue = lab.add_host(), lab.add_host(), lab.add_host()
    foreign = LocalCA.init(tmp_path / "foreign-ca", "home.arpa")
    write_issued(foreign.issue(SpiffeId.node("home.arpa", "rogue")), tmp_path / "rogue-cert")
    d1 = NsMeshd(h1, config(tmp_path, h1, "mdns", [], ""))
    d2 = NsMeshd(h2, config(tmp_path, h2, "mdns", [], echo_body(h2)))
    for d in (d1, d2):
        d.start()
    rogue_log = tmp_path / "rogue.log"
    proc = rogue.popen(
        [sys.executable, str(ROGUE), rogue.ip, "rogue", str(tmp_path / "rogue-cert")], rogue_log
    )
    for d in (d1, d2):
        d.wait_ready()
    wait_for(lambda: "announced" in rogue_log.read_text(), d1, timeout=15, what="rogue announced")
    assert proc.poll() is None, rogue_log.read_text()

    def rogue_tried(d: NsMeshd) -> bool:
        return any(p["address"] == f"{rogue.ip}:15008" and p["last_error"] for p in d.dump()["peers"])

    for d in (d1, d2):
        wait_for(lambda d=d: d.nodes() == ["h1", "h2"] and rogue_tried(d), d, timeout=15, what="rogue tried")
        dump = d.dump()
        rogue_peer = next(p for p in dump["peers"] if p["address"] == f"{rogue.ip}:15008")
        assert rogue_peer["how"] == "mdns" and rogue_peer["name"] is None
        assert dump["catalog"]["nodes"] == ["h1", "h2"]
        assert all(w["node"] != "rogue" for w in dump["catalog"]["workloads"])
        assert d.metric("meshd_catalog_fetch_failures_total") >= 1
        assert d.metric("meshd_peers") == 1


def test_announcement_follows_revision_and_says_goodbye(lab: Lab, tmp_path: Path) -> None:
    """The mDNS component alone: re-announce on a new catalog revision, goodbye on drain, other
    trust domains ignored (three components in one namespace; multicast loops back to each)."""
    h1 = lab.add_host()
    log = tmp_path / "pair.log"
    proc = h1.popen([sys.executable, str(Path(__file__).with_name("mdns_pair.py")), "eth0"], log)
    assert proc.wait(30) == 0, log.read_text()
    result = json.loads(log.read_text().strip().splitlines()[-1])
    beta = "beta._meshd._tcp.local."
    assert ["peer", beta, "b1"] in result["seen"] and ["peer", beta, "b2"] in result["seen"]
    assert result["seen"][-1] == ["goodbye", beta]
    assert all(s[1] == beta for s in result["seen"])  # never itself, never gamma
    assert "elsewhere.test" in result["ignored"]["gamma._meshd._tcp.local."]
    assert result["interfaces"] == [f"eth0 ({h1.ip}/24)"]
