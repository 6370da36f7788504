"""Meshes mDNS cannot span: two subnets joined by a router (tests/support/routed_lab.py), a 3-member
etcd cluster (one member per host), meshd with mDNS on and `discovery.etcd` pointing at all three.

h1 sits alone in subnet A; h2 and h3 share subnet B. h1 can learn of h2 and h3 only through etcd.
Checked, in order: the nodes find each other across the router and traffic flows with mTLS; a
SIGKILLed node leaves h1's catalog within its lease TTL; with etcd members stopped one by one the
mesh keeps serving an open connection and new ones from the last catalog while quorum is lost, and a
node started meanwhile reaches h1 once quorum is back.
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.identity.ca import LocalCA
from tests.netns.lab import Host, NsMeshd, exchange, host_config, namespaces_or_fail, tagged_echo
from tests.support.configs import echo_workload
from tests.support.etcd import Etcdctl, EtcdMember, EtcdPki, etcd_cluster
from tests.support.procs import meshd_cli, wait_for
from tests.support.routed_lab import RoutedLab

pytestmark = [pytest.mark.netns, pytest.mark.slow]

TTL = 3
ECHO_PORT = 7000
UPSTREAM = ("127.0.0.1", 17000)


@pytest.fixture
def lab() -> Iterator[RoutedLab]:
    with namespaces_or_fail(RoutedLab.create, "the etcd lab needs root") as lab:
        yield lab


def config(tmp: Path, host: Host, endpoints: list[str], pki: EtcdPki, body: str = "") -> Path:
    listed = ", ".join(f'"{e}"' for e in endpoints)
    etcd = f'etcd = {{ endpoints = [{listed}], ca = "{pki.ca_cert}", lease_ttl = "{TTL}s" }}\n'
    return host_config(tmp, host.label, 'refresh = "1s"\n' + etcd, body)


def found_by(d: NsMeshd, name: str) -> str | None:
    return next((p["how"] for p in d.dump()["peers"] if p["name"] == name), None)


def mtls_connections(d: NsMeshd) -> float:
    """Inbound TCP connections the node counted as mutual TLS (Istio's metric and label)."""
    _, body = d.host.get("http://127.0.0.1:15020/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith("istio_tcp_connections_opened_total{")
        and 'connection_security_policy="mutual_tls"' in line
    )


def etcd_state(d: NsMeshd) -> dict[str, object]:
    return d.dump()["etcd"]  # type: ignore[no-any-return]


def test_two_subnets_meet_through_etcd_and_survive_losing_its_quorum(tmp_path: Path, lab: RoutedLab) -> None:
    LocalCA.init(tmp_path / "ca", "home.arpa")
    h1, h2, h3 = lab.add_host("A"), lab.add_host("B"), lab.add_host("B")
    pki = EtcdPki.create(tmp_path / "etcd-pki", tmp_path / "ca" / "ca.crt")
    members = [
        EtcdMember(f"m{i}", h.ip, tmp_path / f"etcd-m{i}", pki, prefix=["ip", "netns", "exec", h.ns])
        for i, h in enumerate((h1, h2, h3), 1)
    ]
    urls = [m.client_url for m in members]
    ctl = Etcdctl(urls, pki, prefix=["ip", "netns", "exec", h1.ns])
    upstream = f'[[upstream]]\nservice = "echo.default"\nport = {ECHO_PORT}\nlisten = "127.0.0.1:17000"\n'
    echo = echo_workload(h2.ip, ECHO_PORT)
    # Each node lists its own host's member first: three sessions spread over three members.
    d1 = NsMeshd(h1, config(tmp_path, h1, urls, pki, upstream))
    d2 = NsMeshd(h2, config(tmp_path, h2, [urls[1], urls[2], urls[0]], pki, echo))
    d3 = NsMeshd(h3, config(tmp_path, h3, [urls[2], urls[0], urls[1]], pki))
    daemons = (d1, d2, d3)
    with etcd_cluster(members), tagged_echo(h2, ECHO_PORT), contextlib.ExitStack() as stack:
        stack.callback(lambda: [d.proc.kill() for d in daemons if d.proc and d.proc.poll() is None])
        ctl.wait_healthy(members=members)
        for d in daemons:
            d.start()
        for d in daemons:
            d.wait_ready()

        # 1. Across the router, only etcd can have introduced h1 and h2; traffic flows with mTLS.
        wait_for(lambda: d1.nodes() == ["h1", "h2", "h3"], *daemons, timeout=20, what="h1 sees h2 and h3")
        wait_for(lambda: d2.nodes() == ["h1", "h2", "h3"], *daemons, timeout=20, what="h2 sees h1 and h3")
        assert found_by(d1, "h2") == "etcd" and found_by(d1, "h3") == "etcd"
        # Same subnet: mDNS finds h3 too (announcing takes a couple of seconds after start).
        wait_for(
            lambda: "mdns" in (found_by(d2, "h3") or ""), *daemons, timeout=20, what="h2 hears h3 over mDNS"
        )
        assert h1.call(exchange, UPSTREAM, b"ping") == b"h2:ping"
        assert mtls_connections(d2) >= 1
        peers = h1.call(meshd_cli, "peers")
        assert any(line.startswith("h2 ") and " etcd " in line for line in peers.stdout.splitlines()), peers

        # 2. SIGKILL: no goodbye, no drain; h1 drops h3 when its lease expires.
        assert d3.proc is not None
        d3.proc.send_signal(signal.SIGKILL)
        d3.proc.wait(5)
        # Within the lease TTL, plus the margin a loaded machine needs for the watch and the poll.
        wait_for(lambda: "h3" not in d1.nodes(), *daemons, timeout=TTL + 5, what="h1 drops the killed h3")

        # 3. Members stopped one by one. Two of three keep quorum: nothing changes.
        held = h1.call(socket.create_connection, UPSTREAM, 10)
        held.sendall(b"open before ")
        members[2].stop()
        assert h1.call(exchange, UPSTREAM, b"two members") == b"h2:two members"
        members[1].stop()  # one of three: no quorum
        wait_for(
            lambda: not etcd_state(d1)["connected"],
            *daemons,
            timeout=20,
            what="h1 notices etcd is unreachable",
        )
        failures = d1.metric("meshd_etcd_failures_total")
        wait_for(
            lambda: d1.metric("meshd_etcd_failures_total") >= failures + 2,
            *daemons,
            timeout=20,
            what="h1 keeps retrying",
        )
        status = h1.call(meshd_cli, "status").stdout
        assert "etcd: UNREACHABLE" in status and "serving from the last catalog" in status, status
        assert d1.metric("meshd_etcd_connected") == 0
        # The mesh serves from the last catalog: the open connection and new ones.
        assert d1.nodes() == ["h1", "h2"]
        assert h1.call(exchange, UPSTREAM, b"no quorum") == b"h2:no quorum"
        held.sendall(b"and after")
        held.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := held.recv(65536):
            got += chunk
        held.close()
        assert got == b"h2:open before and after"

        # 4. A node that starts without quorum is ready at once, but h1 learns of it only through
        # etcd: once quorum is back.
        d3 = NsMeshd(h3, d3.config)
        daemons = (d1, d2, d3)
        d3.start().wait_ready()
        members[1].start(members)
        wait_for(
            lambda: "h3" in d1.nodes(), *daemons, timeout=30, what="h1 sees the new h3 once quorum is back"
        )
        wait_for(lambda: etcd_state(d1)["connected"], *daemons, timeout=20, what="h1 reconnected")
        assert h1.call(exchange, UPSTREAM, b"healed") == b"h2:healed"
        for d in daemons:
            assert d.stop() == 0, d.log()[-3000:]
            assert "Traceback" not in d.log(), d.log()
