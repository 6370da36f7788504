"""Transparent mode across two hosts (network namespaces, real daemons, real nftables).

h1 runs meshd with `capture.mode = "nftables"`, inbound protection, the DNS proxy on
127.0.0.1:15053 with port-53 capture (`dns.capture`), a fake upstream resolver on 127.0.0.1:53 (h1's
resolv.conf says `nameserver 127.0.0.1`: without meshd, it would answer every lookup; with meshd, the
lookups reach it only as the proxy's own forwarded queries, which the redirect lets pass), and two
workloads of its own: `web` (PERMISSIVE, port 8000)
and `vault` (STRICT, port 7100). h2 runs meshd with the `echo` workload on 10.77.0.2:7000.
The client on h1 is an unmodified program: it dials the name `echo.default.mesh`.

Each host has a default route (as hosts do): a connection to a VIP needs some route before the
nat output hook can redirect it.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from meshd.identity.ca import LocalCA
from tests.netns.lab import Host, Lab, NsMeshd, capture_config, exchange, ip, namespaces_or_fail, tagged_echo
from tests.support.configs import echo_workload
from tests.support.procs import wait_for
from tests.support.udp import udp_server

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(600)]

ECHO_PORT = 7000
WEB_PORT = 8000  # PERMISSIVE workload on h1
VAULT_PORT = 7100  # STRICT workload on h1
FAKE_UPSTREAM = ("127.0.0.1", 53)
FORWARDED_ANSWER = "192.0.2.7"
TIMEOUT = 20.0

CLIENT = """
import socket, sys
with socket.create_connection(("echo.default.mesh", 7000), timeout=10) as s:
    print(s.getpeername()[0], file=sys.stderr)
    s.sendall(b"hello through the mesh")
    s.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
print(out.decode())
"""


def nft(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", host.ns, "nft", *args], capture_output=True, text=True, timeout=10
    )


def log_line(d: NsMeshd, pattern: str) -> str:
    found: list[str] = []

    def seen() -> bool:
        found[:] = [line for line in d.log().splitlines() if re.search(pattern, line)]
        return bool(found)

    wait_for(seen, d, timeout=TIMEOUT, what=f"log line {pattern!r} on {d.host.label}")
    return found[0]


@contextlib.contextmanager
def fake_resolver(host: Host) -> Iterator[list[str]]:
    """A UDP resolver on h1's loopback answering every A query with FORWARDED_ANSWER; yields the
    names it was asked."""
    asked: list[str] = []

    def answer(data: bytes) -> bytes:
        q = dns.message.from_wire(data)
        asked.append(q.question[0].name.to_text())
        r = dns.message.make_response(q)
        if q.question[0].rdtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", FORWARDED_ANSWER))
        return r.to_wire()

    with udp_server(*FAKE_UPSTREAM, answer, host.call):
        yield asked


@dataclass
class Mesh:
    h1: Host
    h2: Host
    d1: NsMeshd
    d2: NsMeshd
    asked: list[str]


def h1_body(h1: Host, nft_binary: str = "nft", *, dns: bool = True) -> str:
    return (
        f'[capture]\nmode = "nftables"\ninbound = true\nnft = "{nft_binary}"\n'
        f'[dns]\nenabled = {str(dns).lower()}\ncapture = {str(dns).lower()}\nlisten = "127.0.0.1:15053"\n'
        f'upstreams = ["{FAKE_UPSTREAM[0]}:{FAKE_UPSTREAM[1]}"]\n'
        f'[[workload]]\nname = "web"\naddress = "{h1.ip}"\nports = [{WEB_PORT}]\n'
        f'[[workload]]\nname = "vault"\naddress = "{h1.ip}"\nports = [{VAULT_PORT}]\nmtls = "STRICT"\n'
    )


def h2_body(h2: Host) -> str:
    return echo_workload(h2.ip, ECHO_PORT)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    etc: list[Path] = []
    try:
        with namespaces_or_fail(Lab.create, "capture tests need root") as lab:
            if shutil.which("nft") is None:
                pytest.fail("`nft` not found: install nftables (Debian: apt-get install nftables)")
            for _ in range(2):
                host = lab.add_host()
                ip("-n", host.ns, "route", "add", "default", "dev", "eth0")
                # `ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf.
                folder = Path("/etc/netns") / host.ns
                folder.mkdir(parents=True)
                etc.append(folder)
                (folder / "resolv.conf").write_text("nameserver 127.0.0.1\n")
            yield lab
    finally:
        for folder in etc:
            shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only if nothing else is there


@pytest.fixture(scope="module")
def mesh(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("capture")
    LocalCA.init(tmp / "ca", "home.arpa")
    h1, h2 = lab.hosts
    with (
        tagged_echo(h2, ECHO_PORT),
        tagged_echo(h1, WEB_PORT),
        tagged_echo(h1, VAULT_PORT),
        fake_resolver(h1) as asked,
    ):
        d2 = NsMeshd(h2, capture_config(tmp, h2.label, h1.ip, h2_body(h2))).start()
        d1 = NsMeshd(h1, capture_config(tmp, h1.label, h2.ip, h1_body(h1))).start()
        try:
            d2.wait_ready()
            d1.wait_ready()
            wait_for(
                lambda: "echo.default" in d1.dump()["capture"]["vips"],
                d1,
                timeout=TIMEOUT,
                what="h1 knows echo's VIP",
            )
            yield Mesh(h1, h2, d1, d2, asked)
        finally:
            for d in (d1, d2):
                if d.proc is not None and d.proc.poll() is None:
                    d.proc.kill()
                    d.proc.wait(10)


def query(host: Host, name: str, rdtype: str, *, tcp: bool = False) -> dns.message.Message:
    """A lookup as any program on the host makes it: to resolv.conf's nameserver, 127.0.0.1:53."""
    q = dns.message.make_query(name, rdtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return host.call(lambda: send(q, "127.0.0.1", timeout=5, port=53))


def test_dns_proxy_answers_mesh_names_and_forwards_others(mesh: Mesh) -> None:
    """Every query goes to 127.0.0.1:53, where the fake resolver listens: mesh names are answered by
    meshd's proxy (port-53 capture), the rest reach the fake through the proxy without looping."""
    vip = mesh.d1.dump()["capture"]["vips"]["echo.default"]
    assert vip.startswith("240.240.")
    for tcp in (False, True):
        a = query(mesh.h1, "echo.default.mesh", "A", tcp=tcp)
        assert a.rcode() == dns.rcode.NOERROR and [r.to_text() for r in a.answer[0]] == [vip]
    short = query(mesh.h1, "echo.default", "A")
    assert [r.to_text() for r in short.answer[0]] == [vip]
    srv = query(mesh.h1, f"_{ECHO_PORT}._tcp.echo.default.mesh", "SRV")
    assert [r.to_text() for r in srv.answer[0]] == [f"0 0 {ECHO_PORT} echo.default.mesh."]
    assert [r.to_text() for r in srv.additional[0]] == [vip]
    assert query(mesh.h1, "nope.default.mesh", "A").rcode() == dns.rcode.NXDOMAIN
    assert query(mesh.h1, "_9._tcp.echo.default.mesh", "SRV").rcode() == dns.rcode.NXDOMAIN
    aaaa = query(mesh.h1, "echo.default.mesh", "AAAA")
    assert aaaa.rcode() == dns.rcode.NOERROR and not aaaa.answer
    fwd = query(mesh.h1, "www.example.test", "A")
    assert [r.to_text() for r in fwd.answer[0]] == [FORWARDED_ANSWER]
    assert "www.example.test." in mesh.asked and not any("mesh" in n for n in mesh.asked)
    assert mesh.d1.metric("meshd_dns_queries_total", result="mesh") >= 4
    assert mesh.d1.metric("meshd_dns_queries_total", result="nxdomain") >= 2
    assert mesh.d1.metric("meshd_dns_queries_total", result="forwarded") >= 1


def test_unmodified_client_reaches_echo_on_another_host_with_mtls(mesh: Mesh) -> None:
    labels = {
        "reporter": "destination",
        "destination_workload": "echo",
        "connection_security_policy": "mutual_tls",
    }
    before = mesh.d2.metric("istio_tcp_connections_opened_total", **labels)
    proc = subprocess.run(
        ["ip", "netns", "exec", mesh.h1.ns, sys.executable, "-c", CLIENT],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "h2:hello through the mesh"
    vip = mesh.d1.dump()["capture"]["vips"]["echo.default"]
    assert proc.stderr.strip() == vip  # the app dialled the VIP; the mesh carried it
    assert mesh.d2.metric("istio_tcp_connections_opened_total", **labels) == before + 1
    line = log_line(
        mesh.d2, rf"connection complete .*reporter=destination .*dst\.addr={mesh.h2.ip}:{ECHO_PORT}"
    )
    assert "src.identity=spiffe://home.arpa/ns/meshd-system/sa/node-h1" in line, line
    assert "security=mutual_tls" in line, line
    src = log_line(mesh.d1, rf"connection complete .*reporter=source .*dst\.addr=echo\.default:{ECHO_PORT}")
    assert "dst.workload=echo" in src, src
    assert (
        mesh.d1.metric(
            "istio_tcp_connections_opened_total",
            reporter="source",
            destination_service="echo.default",
        )
        >= 1
    )


def test_inbound_protection_strict_dropped_permissive_through_15006(mesh: Mesh) -> None:
    def dial(address: tuple[str, int]) -> None:
        with socket.create_connection(address, timeout=2):
            pass

    # STRICT: the SYN from h2 is dropped (a timeout, not a refusal); on h1 itself the workload is up.
    with pytest.raises(TimeoutError):
        mesh.h2.call(dial, (mesh.h1.ip, VAULT_PORT))
    assert mesh.h1.call(exchange, (mesh.h1.ip, VAULT_PORT), b"local") == b"h1:local"
    # PERMISSIVE: plaintext from h2 goes through meshd's 15006 (counted, security none).
    labels = {"reporter": "destination", "destination_workload": "web", "connection_security_policy": "none"}
    before = mesh.d1.metric("istio_tcp_connections_opened_total", **labels)
    assert mesh.h2.call(exchange, (mesh.h1.ip, WEB_PORT), b"plain") == b"h1:plain"
    assert mesh.d1.metric("istio_tcp_connections_opened_total", **labels) == before + 1


def test_table_removed_on_sigterm_and_replaced_after_sigkill(mesh: Mesh) -> None:
    h1, d1 = mesh.h1, mesh.d1
    assert nft(h1, "list", "table", "ip", "meshd").returncode == 0
    assert d1.stop() == 0
    gone = nft(h1, "list", "table", "ip", "meshd")
    assert gone.returncode != 0 and "No such file" in gone.stderr, gone
    assert "capture removed" in d1.log()
    # Port 53 is not redirected any more: the fake resolver answers a mesh name itself.
    plain = query(h1, "echo.default.mesh", "A")
    assert [r.to_text() for r in plain.answer[0]] == [FORWARDED_ANSWER]

    d1.start().wait_ready()
    assert nft(h1, "list", "table", "ip", "meshd").returncode == 0
    assert d1.proc is not None
    d1.proc.kill()
    d1.proc.wait(10)
    assert nft(h1, "list", "table", "ip", "meshd").returncode == 0  # stale, left by the crash

    d1.start().wait_ready()
    tables = nft(h1, "list", "tables").stdout.splitlines()
    assert tables.count("table ip meshd") == 1, tables
    ruleset = nft(h1, "list", "table", "ip", "meshd").stdout
    assert ruleset.count("redirect to :15001") == 1, ruleset
    assert d1.stop() == 0


def test_without_nft_meshd_says_so_and_runs_explicit(lab: Lab, tmp_path: Path) -> None:
    lab.add_host()  # h3, alone
    h3 = lab.hosts[-1]
    LocalCA.init(tmp_path / "ca", "home.arpa")
    d = NsMeshd(
        h3,
        capture_config(
            tmp_path,
            h3.label,
            h3.ip,
            h1_body(h3, "/nonexistent/nft", dns=False),
        ),
    ).start()
    try:
        d.wait_ready()
        line = log_line(d, "capture disabled")
        assert "running in explicit mode only: the nft binary '/nonexistent/nft' was not found" in line, line
        assert d.dump()["capture"]["status"].startswith("unavailable")
        with pytest.raises(ConnectionRefusedError):
            h3.call(socket.create_connection, ("127.0.0.1", 15001), 2)
        assert nft(h3, "list", "table", "ip", "meshd").returncode != 0
        assert d.stop() == 0
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
