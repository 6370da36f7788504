"""Transparent capture of UDP to service VIPs, across two hosts (network namespaces, real daemons,
real nftables): an unmodified UDP client on h1 sends to the `uecho` service's VIP; the datagram crosses
to h2 as a connect-udp flow, and the reply comes back from the VIP:port the client sent to."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.identity.ca import LocalCA
from tests.netns.lab import Lab, NsMeshd, capture_config, ip, namespaces_or_fail
from tests.support.procs import wait_for
from tests.support.udp import udp_echo_server

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ECHO_PORT = 7007
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with namespaces_or_fail(
        lambda: Lab.create(prefix="mudp", subnet="10.235.0"), "capture tests need root"
    ) as lab:
        for _ in range(2):
            host = lab.add_host()
            ip("-n", host.ns, "route", "add", "default", "dev", "eth0")  # a VIP needs some route
        yield lab


def test_udp_to_a_vip_is_captured_and_answered_from_the_vip(lab: Lab, tmp_path: Path) -> None:
    LocalCA.init(tmp_path / "ca", "home.arpa")
    h1, h2 = lab.hosts
    h1_body = '[capture]\nmode = "nftables"\n[udp]\nidle_timeout = "2s"\n'
    h2_body = (
        f'[[workload]]\nname = "uecho"\naddress = "{h2.ip}"\nports = [{ECHO_PORT}]\nservices = ["uecho"]\n'
        f'[[service]]\nname = "uecho"\nports = [{{ port = {ECHO_PORT}, protocol = "udp" }}]\n'
    )
    with udp_echo_server(h2.ip, ECHO_PORT, h2.call):
        d2 = NsMeshd(h2, capture_config(tmp_path, "h2", h1.ip, h2_body)).start()
        d1 = NsMeshd(h1, capture_config(tmp_path, "h1", h2.ip, h1_body)).start()
        try:
            d2.wait_ready()
            d1.wait_ready()
            vip_of = lambda: d1.dump()["capture"]["vips"].get("uecho.default")  # noqa: E731
            wait_for(lambda: vip_of() is not None, d1, timeout=TIMEOUT, what="h1 knows uecho's VIP")
            vip = vip_of()
            wait_for(
                lambda: f"{vip}:{ECHO_PORT}" in d1.dump()["capture"]["udp"],
                d1,
                timeout=TIMEOUT,
                what="UDP map has the VIP",
            )

            def exchange() -> list[tuple[bytes, tuple[str, int]]]:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(5)
                    out = []
                    for i in range(20):
                        s.sendto(b"datagram %d" % i, (vip, ECHO_PORT))
                        data, addr = s.recvfrom(100)
                        out.append((data, (str(addr[0]), int(addr[1]))))
                    return out

            replies = h1.call(exchange)
            assert [d for d, _ in replies] == [b"datagram %d" % i for i in range(20)]
            assert {a for _, a in replies} == {(vip, ECHO_PORT)}  # conntrack undid the redirect
            assert d2.metric("meshd_udp_flows_opened_total") == 1
            # Idle flows end on both nodes.
            wait_for(
                lambda: (
                    d1.metric("meshd_udp_flows_closed_total") == 1
                    and d2.metric("meshd_udp_flows_closed_total") == 1
                ),
                d1,
                d2,
                timeout=TIMEOUT,
                what="the flow expired",
            )
            assert "udp flow complete" in d2.log()
        finally:
            for d in (d1, d2):
                if d.proc is not None and d.proc.poll() is None:
                    d.stop()
