"""UDP through the mesh with real daemons: alpha has `[[upstream]] protocol = "udp"` listeners; beta hosts
Debian's dnsmasq and a UDP echo server. Datagrams cross as connect-udp streams (RFC 9298) over HBONE."""

from __future__ import annotations

import hashlib
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import pytest

from tests.support.mesh import Host, Mesh, Port, Service, Upstream, Workload, client_host
from tests.support.mesh import dump as config_dump
from tests.support.procs import Meshd, unique_loopback, wait_for
from tests.support.udp import dnsmasq, udp_echo_server

DNS_PORT = 5353  # dnsmasq on beta
ECHO_PORT = 7007  # UDP echo on beta
DNS_LISTEN = 15353  # alpha's upstream listeners
ECHO_LISTEN = 17007

pytestmark = pytest.mark.slow


@dataclass
class UdpMesh:
    alpha: Meshd
    beta: Meshd
    dns: tuple[str, int]
    echo: tuple[str, int]
    beta_policy: Path


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[UdpMesh]:
    a_ip, b_ip = unique_loopback(), unique_loopback()
    short_idle = '[udp]\nidle_timeout = "2s"\n'
    nodes = Mesh(
        tmp_path,
        [
            client_host(
                "alpha",
                a_ip,
                Upstream("dns", 53, f"{a_ip}:{DNS_LISTEN}", protocol="udp"),
                Upstream("uecho", ECHO_PORT, f"{a_ip}:{ECHO_LISTEN}", protocol="udp"),
                body=short_idle,
            ),
            Host(
                "beta",
                b_ip,
                workloads=[
                    Workload("resolver", b_ip, [DNS_PORT], services=["dns"]),
                    Workload("uecho", b_ip, [ECHO_PORT], services=["uecho"]),
                ],
                services=[
                    Service("dns", [Port(53, "udp", target_port=DNS_PORT)]),
                    Service("uecho", [Port(ECHO_PORT, "udp")]),
                ],
                policy={},
                body=short_idle,
            ),
        ],
    )
    with (
        dnsmasq(b_ip, DNS_PORT, tmp_path, {"svc.test": "10.1.2.3"}),
        udp_echo_server(b_ip, ECHO_PORT),
        nodes.running(),
    ):
        nodes.wait_knows("alpha", services=["uecho.default"])
        yield UdpMesh(
            nodes["alpha"], nodes["beta"], (a_ip, DNS_LISTEN), (a_ip, ECHO_LISTEN), nodes.policy_dir("beta")
        )


def test_dig_resolves_through_the_mesh(mesh: UdpMesh) -> None:
    """dig (bind9-dnsutils) asks alpha's UDP upstream; dnsmasq on beta answers through the tunnel."""
    out = subprocess.run(
        ["dig", f"@{mesh.dns[0]}", "-p", str(mesh.dns[1]), "+short", "+tries=3", "+time=2", "svc.test", "A"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == "10.1.2.3", out
    # dnspython: many queries on one flow, each answered with the right id and address.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((mesh.dns[0], 0))
    try:
        for _ in range(50):
            q = dns.message.make_query("svc.test", dns.rdatatype.A)
            answer = dns.query.udp(q, mesh.dns[0], port=mesh.dns[1], timeout=5, sock=sock)
            assert answer.id == q.id
            assert [r.address for r in answer.answer[0]] == ["10.1.2.3"]
    finally:
        sock.close()
    assert mesh.alpha.metric("meshd_udp_flows_opened_total", request_protocol="udp", reporter="source") >= 2
    # Live flows' counters are flushed every few seconds (and at their end).
    wait_for(
        lambda: mesh.beta.metric("meshd_udp_received_packets_total", reporter="destination") >= 51, mesh.beta
    )
    wait_for(lambda: mesh.alpha.metric("meshd_udp_sent_packets_total", reporter="source") >= 51, mesh.alpha)


def snmp_udp(field: str) -> int:
    """A counter of the kernel's UDP MIB in this network namespace (/proc/net/snmp)."""
    lines = [
        line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")
    ]
    return int(lines[1][lines[0].index(field)])


def test_10000_datagrams_of_mixed_sizes_echoed_intact(mesh: UdpMesh) -> None:
    """10,000 datagrams, 1..1,400 bytes, each carrying its sequence number and a digest; at most WINDOW
    in flight. Every echo is checked; a loss must be one meshd or the kernel counted."""
    count, window = 10_000, 64
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind((mesh.echo[0], 0))
    sock.connect(mesh.echo)
    sock.settimeout(2.0)
    rng = struct.Struct(">I")

    def payload(seq: int) -> bytes:
        size = 1 + (seq * 7919) % 1400
        body = hashlib.sha256(rng.pack(seq)).digest() * (size // 32 + 1)
        data = (rng.pack(seq) + body)[:size]
        return data if size >= 4 else rng.pack(seq)[:size]

    kernel_before = snmp_udp("RcvbufErrors") + snmp_udp("SndbufErrors")
    drops_before = mesh.alpha.metric("meshd_udp_dropped_packets_total") + mesh.beta.metric(
        "meshd_udp_dropped_packets_total"
    )
    received: set[int] = set()
    corrupted = 0
    sent = 0
    started = time.monotonic()
    try:
        while sent < count or len(received) < sent:
            while sent < count and sent - len(received) < window:
                sock.send(payload(sent))
                sent += 1
            try:
                data = sock.recv(65535)
            except TimeoutError:
                break  # what is still missing is lost
            if len(data) < 4:
                # Tiny payloads (1-3 bytes) carry a prefix of the sequence number only.
                matches = [s for s in range(sent) if s not in received and payload(s) == data]
                if not matches:
                    corrupted += 1
                    continue
                received.add(matches[0])
                continue
            seq = rng.unpack(data[:4])[0]
            if seq >= sent or payload(seq) != data:
                corrupted += 1
                continue
            received.add(seq)
    finally:
        sock.close()
    elapsed = time.monotonic() - started
    lost = count - len(received)
    kernel = snmp_udp("RcvbufErrors") + snmp_udp("SndbufErrors") - kernel_before
    meshd_drops = (
        mesh.alpha.metric("meshd_udp_dropped_packets_total")
        + mesh.beta.metric("meshd_udp_dropped_packets_total")
        - drops_before
    )
    print(
        f"10000 datagrams in {elapsed:.1f}s: lost {lost}, meshd drops {meshd_drops}, kernel buffer errors {kernel}"
    )
    assert corrupted == 0
    assert lost <= meshd_drops + kernel, f"{lost} lost, only {meshd_drops} + {kernel} explained"
    assert lost <= count // 100  # a few at most, on a loaded machine, with the window above
    # Every datagram is counted each way at both nodes (live flows flush their counters every few seconds).
    for daemon in (mesh.alpha, mesh.beta):
        wait_for(
            lambda d=daemon: (
                d.metric("meshd_udp_received_packets_total", destination_workload="uecho")  # type: ignore[misc]
                == count
            ),
            daemon,
        )
        assert daemon.metric("meshd_udp_sent_packets_total", destination_workload="uecho") == count - lost


def deny_policy(directory: Path, port: int) -> None:
    (directory / "10-deny-udp.toml").write_text(
        f'[[authorization]]\nname = "no-udp-echo"\naction = "DENY"\n[[authorization.rules]]\nto = [{{ ports = [{port}] }}]\n'
    )


def test_deny_policy_refuses_the_flow(mesh: UdpMesh) -> None:
    deny_policy(mesh.beta_policy, ECHO_PORT)
    mesh.beta.signal(signal.SIGHUP)
    wait_for(lambda: mesh.beta.metric("meshd_config_reloads_total", result="success") >= 1, mesh.beta)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    try:
        sock.sendto(b"let me in", mesh.echo)
        with pytest.raises(TimeoutError):
            sock.recvfrom(100)
    finally:
        sock.close()
    wait_for(lambda: mesh.beta.metric("meshd_udp_flows_failed_total", reason="UAEX") >= 1, mesh.beta)
    wait_for(lambda: mesh.alpha.metric("meshd_udp_flows_failed_total", reason="UAEX") >= 1, mesh.alpha)
    assert "udp flow failed" in mesh.beta.log()
    assert mesh.alpha.metric("meshd_udp_flows_opened_total", destination_service="uecho.default") == 0
    # DNS on another port is still allowed.
    q = dns.message.make_query("svc.test", dns.rdatatype.A)
    assert dns.query.udp(q, mesh.dns[0], port=mesh.dns[1], timeout=5).answer


def test_idle_flows_expire_and_are_released(mesh: UdpMesh) -> None:
    """200 clients each open a flow; 2 s after the last datagram every flow is gone on both nodes: the
    flow tables are empty, the tunnels' HTTP/2 streams released, beta's per-flow sockets closed, and
    every flow counted closed."""
    assert mesh.beta.proc is not None
    beta_fds = Path(f"/proc/{mesh.beta.proc.pid}/fd")
    fds_before = len(list(beta_fds.iterdir()))
    socks = []
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(5)
            s.connect(mesh.echo)
            socks.append(s)
            s.send(b"ping")
        for s in socks:
            assert s.recv(100) == b"ping"
        dump = config_dump(mesh.alpha)
        assert sum(u["flows"] for u in dump["udp"]["upstreams"].values()) == 200
        assert mesh.beta.metric("meshd_udp_flows_active", reporter="destination") == 200
        assert len(list(beta_fds.iterdir())) >= fds_before + 200  # a socket of its own per flow

        def released() -> bool:
            a, b = config_dump(mesh.alpha), config_dump(mesh.beta)
            return (
                sum(u["flows"] for u in a["udp"]["upstreams"].values()) == 0
                and b["udp"]["inbound_flows"] == 0
                and a["pool"]["streams"] == 0
                and b["hbone_server"]["streams"] == 0
            )

        wait_for(released, mesh.alpha, timeout=20)
        # Back to where it was, plus the pooled HBONE connections the flows opened (100 streams each,
        # kept for reuse).
        hbone = config_dump(mesh.beta)["hbone_server"]["connections"]
        assert hbone <= 3
        wait_for(lambda: len(list(beta_fds.iterdir())) <= fds_before + hbone, mesh.beta)
    finally:
        for s in socks:
            s.close()
    assert mesh.alpha.metric("meshd_udp_flows_closed_total", destination_service="uecho.default") == 200
    assert mesh.beta.metric("meshd_udp_flows_active", reporter="destination") == 0
    assert mesh.alpha.metric("meshd_udp_flows_active", reporter="source") == 0


def test_flows_per_client_limit_drops_and_counts(mesh: UdpMesh) -> None:
    """One client IP past udp.max_flows_per_client (default 256) gets no new flows; its datagrams are
    dropped and counted."""
    socks = []
    try:
        for _ in range(260):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect(mesh.echo)
            s.send(b"x")
            socks.append(s)
        wait_for(
            lambda: mesh.alpha.metric("meshd_udp_dropped_packets_total", reason="flow_limit") >= 4, mesh.alpha
        )
        dump = config_dump(mesh.alpha)
        assert sum(u["flows"] for u in dump["udp"]["upstreams"].values()) == 256
    finally:
        for s in socks:
            s.close()


# (policy text, whether alpha's client, spiffe://home.arpa/ns/default/sa/client at 127.x, may send)
L4_POLICIES = [
    (
        '[[authorization]]\nname = "p"\naction = "ALLOW"\n[[authorization.rules]]\n'
        'from = [{ principals = ["home.arpa/ns/default/sa/client"] }]\n',
        True,
    ),
    (
        '[[authorization]]\nname = "p"\naction = "ALLOW"\n[[authorization.rules]]\n'
        'from = [{ principals = ["home.arpa/ns/default/sa/someone-else"] }]\n',
        False,
    ),
    (
        '[[authorization]]\nname = "p"\naction = "DENY"\n[[authorization.rules]]\n'
        'from = [{ namespaces = ["default"] }]\n',
        False,
    ),
    (
        '[[authorization]]\nname = "p"\naction = "ALLOW"\n[[authorization.rules]]\n'
        'from = [{ ip_blocks = ["127.0.0.0/8"] }]\n',
        True,
    ),
    (
        '[[authorization]]\nname = "p"\naction = "ALLOW"\n[[authorization.rules]]\n'
        'from = [{ ip_blocks = ["10.0.0.0/8"] }]\n',
        False,
    ),
]


def test_l4_policy_fields_apply_to_udp_flows(mesh: UdpMesh) -> None:
    """Principals, namespaces and ip_blocks decide a UDP flow as they decide a TCP connection. Each
    policy is applied by a reload; every probe is a new flow (a new client port)."""
    for reloads, (text, allowed) in enumerate(L4_POLICIES, start=1):
        (mesh.beta_policy / "10-udp.toml").write_text(text)
        mesh.beta.signal(signal.SIGHUP)
        wait_for(
            lambda n=reloads: mesh.beta.metric("meshd_config_reloads_total", result="success") >= n, mesh.beta
        )  # type: ignore[misc]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2.0)
            s.sendto(b"probe", mesh.echo)
            try:
                answered = s.recvfrom(100)[0] == b"probe"
            except TimeoutError:
                answered = False
        assert answered == allowed, text
