"""Two sites behind NAT, joined only through their gateways (meshd role=gateway, double HBONE).

Site A runs a1 (the `client` workload, with upstream listeners, nftables capture and the DNS proxy); site B runs b1 (the `echo` TCP
workload and the `web` HTTP workload) and wb (a waypoint `web` is bound to). Hosts of one site cannot
reach the other site's hosts; each can reach the other site's gateway (tests/netns/sites.py).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import pytest

from meshd.identity.ca import LocalCA
from tests.netns.lab import Host, NsMeshd, exchange, host_config, namespaces_or_fail, tagged_echo
from tests.netns.sites import Sites
from tests.support import policy
from tests.support.http_backend import http_backend
from tests.support.policy import allow, deny, frm, to
from tests.support.procs import wait_for
from tests.support.sockets import recv_all

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(300)]

ECHO_PORT = 7000
WEB_PORT = 8080
ECHO_LISTEN = 17000
WEB_LISTEN = 17001
CLIENT = "spiffe://home.arpa/ns/default/sa/client"

# At b1: only the client workload of site A may reach echo (the real client identity is needed).
ECHO_POLICY = allow(frm(principals=[policy.CLIENT]), name="echo-from-client", workloads=["echo"])
# At wb: L7 policy on web.
WEB_POLICY = deny(to(paths=["/admin*"]), name="no-admin")


@dataclass
class TwoSites:
    sites: Sites
    tmp: Path
    daemons: dict[str, NsMeshd]

    def host(self, label: str) -> Host:
        return self.sites.hosts[label]

    def dump(self, label: str) -> dict[str, object]:
        return self.daemons[label].dump()


def _config(tmp: Path, label: str, network: str, peers: list[str], body: str, top: str = "") -> Path:
    peer_list = ", ".join(f'"{p}"' for p in peers)
    discovery = f'mdns = false\npeers = [{peer_list}]\nrefresh = "1s"\npeer_timeout = "5s"\n'
    return host_config(tmp, label, discovery, body, top=f'network = "{network}"\n{top}')


def _gateway_body(public: str | None, remote: str | None, *, reverse: bool = False) -> str:
    body = '[listen]\nhbone = "0.0.0.0:15008"\n[gateway]\n'
    if public is not None:
        body += f'public = "{public}:15008"\n'
    if remote is not None:
        body += f'remote = ["{remote}:15008"]\n'
    return body + ("reverse = true\n" if reverse else "")


def build(tmp: Path, sites: Sites, *, reverse: bool = False) -> TwoSites:
    LocalCA.init(tmp / "ca", "home.arpa")
    a1 = sites.add_host("a", "a1", 11)
    b1 = sites.add_host("b", "b1", 11)
    wb = sites.add_host("b", "wb", 12)
    gwa, gwb = sites.hosts["gwa"], sites.hosts["gwb"]
    configs = {
        "gwa": _config(
            tmp,
            "gwa",
            "site-a",
            ["10.236.1.11:15008"],
            # In reverse mode gwa cannot reach gwb: gwb dials out and gwa learns site B through that.
            _gateway_body(gwa.ip, None if reverse else gwb.ip),
            'role = "gateway"\n',
        ),
        "gwb": _config(
            tmp,
            "gwb",
            "site-b",
            ["10.236.2.11:15008", "10.236.2.12:15008"],
            _gateway_body(None if reverse else gwb.ip, gwa.ip, reverse=reverse),
            'role = "gateway"\n',
        ),
        "a1": _config(
            tmp,
            "a1",
            "site-a",
            ["10.236.1.1:15008"],
            f'[listen]\nhbone = "{a1.ip}:15008"\n'
            # Transparent mode too: an app that resolves echo.default.mesh and dials the VIP.
            '[capture]\nmode = "nftables"\n[dns]\nenabled = true\nlisten = "127.0.0.1:15053"\n'
            f'[[workload]]\nname = "client"\naddress = "{a1.ip}"\nports = [8000]\n'
            f'[[upstream]]\nservice = "echo.default"\nport = {ECHO_PORT}\nlisten = "{a1.ip}:{ECHO_LISTEN}"\n'
            f'[[upstream]]\nservice = "web.default"\nport = 80\nlisten = "{a1.ip}:{WEB_LISTEN}"\n',
        ),
        "b1": _config(
            tmp,
            "b1",
            "site-b",
            ["10.236.2.1:15008", "10.236.2.12:15008"],
            f'[listen]\nhbone = "{b1.ip}:15008"\n[policy]\ndir = "{tmp / "b1-policy"}"\n'
            f'[[workload]]\nname = "echo"\naddress = "{b1.ip}"\nports = [{ECHO_PORT}]\nservices = ["echo"]\n'
            f'[[workload]]\nname = "web"\naddress = "{b1.ip}"\nports = [{WEB_PORT}]\nservices = ["web"]\n'
            f'[[service]]\nname = "echo"\nports = [{{ port = {ECHO_PORT} }}]\n'
            f'[[service]]\nname = "web"\nwaypoint = "wb"\n'
            f'ports = [{{ port = 80, target_port = {WEB_PORT}, protocol = "http" }}]\n',
        ),
        "wb": _config(
            tmp,
            "wb",
            "site-b",
            ["10.236.2.1:15008", "10.236.2.11:15008"],
            f'[listen]\nhbone = "{wb.ip}:15008"\n[policy]\ndir = "{tmp / "wb-policy"}"\n',
            'role = "waypoint"\n',
        ),
    }
    for name, text in (("b1-policy", ECHO_POLICY), ("wb-policy", WEB_POLICY)):
        (tmp / name).mkdir()
        (tmp / name / "policy.toml").write_text(text)
    if reverse:
        sites.block_inbound_hbone("gwb")
    hosts = {"gwa": gwa, "gwb": gwb, "a1": a1, "b1": b1, "wb": wb}
    daemons = {label: NsMeshd(hosts[label], path).start() for label, path in configs.items()}
    for d in daemons.values():
        d.wait_ready()
    return TwoSites(sites, tmp, daemons)


@pytest.fixture
def sites() -> Iterator[Sites]:
    with namespaces_or_fail(Sites.create, "these tests need root, iproute2, nft") as sites:
        yield sites


def _knows_remote(two: TwoSites, label: str, services: set[str]) -> bool:
    """`label` knows site B's services, and site B's gateway knows a1 (each side learns the other's
    network on its own schedule: a tunnel before that is refused, 401)."""
    catalog = two.dump(label)["catalog"]
    gateway_b = two.dump("gwb")["catalog"]
    assert isinstance(catalog, dict) and isinstance(gateway_b, dict)
    site_b = {"b1", "wb", "gwb"}  # the waypoint too: a service bound to it needs its node entry
    return (
        services <= set(catalog["services"])
        and site_b <= set(catalog["nodes"])
        and "a1" in gateway_b["nodes"]
    )


def _tcpdump(host: Host, path: Path) -> subprocess.Popen[bytes]:
    log = path.with_suffix(".tcpdump.log")
    proc = host.popen(["tcpdump", "-i", "any", "--immediate-mode", "-U", "-w", str(path), "tcp"], log)
    wait_for(
        lambda: log.exists() and b"listening on" in log.read_bytes(), timeout=10, what="tcpdump listening"
    )
    return proc


def test_a_client_in_site_a_reaches_site_b_through_both_gateways(tmp_path: Path, sites: Sites) -> None:
    two = build(tmp_path, sites)
    a1, b1, gwb = two.host("a1"), two.host("b1"), two.host("gwb")
    # The sites really are apart: a1 cannot open a connection to b1, only to b1's gateway.
    with pytest.raises(OSError):
        a1.call(exchange, (b1.ip, 15008), b"x")
    wait_for(
        lambda: _knows_remote(two, "a1", {"echo.default", "web.default"}),
        *two.daemons.values(),
        timeout=30,
        what="a1 learns site B's services through the gateways",
    )
    pcap = tmp_path / "gwb.pcap"
    capture = _tcpdump(gwb, pcap)
    marker = b"inner-plaintext-" + str(time.time_ns()).encode()
    with tagged_echo(b1, ECHO_PORT):
        answer = a1.call(exchange, (a1.ip, ECHO_LISTEN), marker)
    assert answer == b"b1:" + marker, two.daemons["a1"].log()[-3000:]
    wait_for(lambda: pcap.stat().st_size > 4000, timeout=10, what="tcpdump saw the forwarded traffic")
    capture.terminate()
    capture.wait(10)
    raw = pcap.read_bytes()
    assert marker not in raw, "the gateway's namespace carried the inner plaintext"
    assert marker.decode() not in two.daemons["gwb"].log()
    # Who saw which identity: the gateway the node (outer mTLS), the destination the client workload
    # (inner mTLS, verified end to end), so its ALLOW policy for that principal let it in.
    gw = two.daemons["gwb"]
    assert (
        gw.metric(
            "istio_tcp_connections_opened_total",
            source_principal="spiffe://home.arpa/ns/meshd-system/sa/node-a1",
        )
        >= 1
    )
    assert gw.metric("istio_tcp_connections_opened_total", source_principal=CLIENT) == 0
    dest = two.daemons["b1"]
    assert (
        dest.metric("istio_tcp_connections_opened_total", reporter="destination", source_principal=CLIENT)
        >= 1
    )
    assert "10.236.2.1" in dest.log(), "b1 saw the connection come from its gateway"

    # By name, as an unmodified app: the mesh DNS answers the service's VIP, capture takes it from there.
    query = dns.message.make_query("echo.default.mesh", "A")
    answer = a1.call(lambda: dns.query.udp(query, "127.0.0.1", timeout=5, port=15053))
    vip = answer.answer[0][0].to_text()
    with tagged_echo(b1, ECHO_PORT):
        assert a1.call(exchange, (vip, ECHO_PORT), b"by name") == b"b1:by name"


def test_l7_through_a_waypoint_in_the_other_site(tmp_path: Path, sites: Sites) -> None:
    two = build(tmp_path, sites)
    a1, b1 = two.host("a1"), two.host("b1")
    wait_for(
        lambda: _knows_remote(two, "a1", {"web.default"}),
        *two.daemons.values(),
        timeout=30,
        what="a1 learns web.default",
    )
    served = http_backend("web", b1.ip, WEB_PORT)
    web = b1.call(served.__enter__)  # bound inside b1's namespace
    try:
        status, body = a1.get(f"http://{a1.ip}:{WEB_LISTEN}/hello")
        assert (status, body) == (200, b"web GET /hello\n"), two.daemons["wb"].log()[-3000:]
        status, _ = a1.get(f"http://{a1.ip}:{WEB_LISTEN}/admin/x")
        assert status == 403
        assert web.paths() == ["/hello"]
    finally:
        served.__exit__(None, None, None)
    wp = two.daemons["wb"]
    assert (
        wp.metric("istio_requests_total", reporter="waypoint", source_principal=CLIENT, response_code="200")
        >= 1
    )
    assert (
        wp.metric("istio_requests_total", reporter="waypoint", source_principal=CLIENT, response_code="403")
        >= 1
    )


def test_reverse_connection_when_site_b_accepts_no_inbound(tmp_path: Path, sites: Sites) -> None:
    """gwb's public side drops every inbound connection to 15008 (nft): gwb dials gwa and keeps a
    reverse connection, gwa fronts site B through it, and a1's tunnels to b1 go a1 -> gwa -> gwb -> b1
    with the inner TLS still end to end."""
    two = build(tmp_path, sites, reverse=True)
    a1, b1 = two.host("a1"), two.host("b1")
    with pytest.raises(OSError):
        a1.call(exchange, (two.host("gwb").ip, 15008), b"x")  # really blocked
    wait_for(
        lambda: _knows_remote(two, "a1", {"echo.default"}),
        *two.daemons.values(),
        timeout=30,
        what="a1 learns site B's services over the reverse connection",
    )
    gateway = two.dump("gwa")["gateway"]
    assert isinstance(gateway, dict) and gateway["reverse"].keys() == {"site-b"}
    marker = b"reverse-" + str(time.time_ns()).encode()
    with tagged_echo(b1, ECHO_PORT):
        answer = a1.call(exchange, (a1.ip, ECHO_LISTEN), marker)
    assert answer == b"b1:" + marker, two.daemons["a1"].log()[-3000:]
    assert marker.decode() not in two.daemons["gwa"].log() + two.daemons["gwb"].log()
    node_a1 = "spiffe://home.arpa/ns/meshd-system/sa/node-a1"
    assert two.daemons["gwa"].metric("istio_tcp_connections_opened_total", source_principal=node_a1) >= 1
    dest = two.daemons["b1"]
    assert (
        dest.metric("istio_tcp_connections_opened_total", reporter="destination", source_principal=CLIENT)
        >= 1
    )


def _hold(host: Host, address: tuple[str, int], first: bytes) -> socket.socket:
    """A connection opened inside `host`'s namespace, with `first` sent and the write side kept open."""

    def connect() -> socket.socket:
        s = socket.create_connection(address, timeout=10)
        s.sendall(first)
        return s

    return host.call(connect)


def _finish(s: socket.socket, last: bytes) -> bytes:
    with s:
        s.sendall(last)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def test_gateway_reload_applies_to_new_tunnels_and_drain_lets_open_ones_finish(
    tmp_path: Path, sites: Sites
) -> None:
    two = build(tmp_path, sites)
    a1, b1 = two.host("a1"), two.host("b1")
    gw = two.daemons["gwb"]
    assert gw.proc is not None
    wait_for(
        lambda: _knows_remote(two, "a1", {"echo.default"}),
        *two.daemons.values(),
        timeout=30,
        what="the sites know each other",
    )
    upstream = (a1.ip, ECHO_LISTEN)
    with tagged_echo(b1, ECHO_PORT):
        held = _hold(a1, upstream, b"before-")
        wait_for(lambda: gw.metric("istio_tcp_connections_opened_total") >= 1, gw, what="gwb forwards it")
        # Reload: only a network that does not exist may use gwb now.
        config = tmp_path / "gwb.toml"
        config.write_text(
            config.read_text().replace("[gateway]\n", '[gateway]\nallow_networks = ["site-c"]\n')
        )
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: (two.dump("gwb")["reload"] or {}).get("last") is not None,  # type: ignore[union-attr]
            gw,
            what="gwb applies the reload",
        )
        assert two.dump("gwb")["reload"]["last"]["result"] == "applied"  # type: ignore[index]
        assert a1.call(exchange, upstream, b"after-reload") == b""  # a new tunnel: refused (401)
        assert "is not in gateway.allow_networks" in two.daemons["a1"].log()
        assert _finish(held, b"reload") == b"b1:before-reload"  # the open one was not cut

        # Site A admitted again, one connection at a time (the per-network limit); then drain: SIGTERM
        # with a tunnel open, it finishes, and gwb exits cleanly.
        config.write_text(
            config.read_text().replace('allow_networks = ["site-c"]\n', "max_connections_per_network = 1\n")
        )
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: a1.call(exchange, upstream, b"x") == b"b1:x",
            gw,
            timeout=20,
            what="gwb admits site A again",
        )
        wait_for(  # the probes' tunnels are gone (an inner connection lingers 1 s after its tunnel)
            lambda: not any(two.dump("gwb")["gateway"]["open_per_network"].values()),  # type: ignore[index]
            gw,
            what="no tunnel open through gwb",
        )
        held = _hold(a1, upstream, b"drain-")
        wait_for(
            lambda: two.dump("gwb")["gateway"]["open_per_network"] == {"site-a": 1},  # type: ignore[index]
            gw,
            two.daemons["a1"],
            what="one tunnel open through gwb",
        )
        assert a1.call(exchange, upstream, b"one too many") == b""  # 503: over the limit
        assert "gateway.max_connections_per_network" in two.daemons["a1"].log()
        gw.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "drain" in gw.log().lower(), gw, what="gwb draining")
        assert _finish(held, b"ok") == b"b1:drain-ok"
        assert gw.proc.wait(20) == 0
