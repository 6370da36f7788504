"""Double HBONE in Istio ztunnel's format, both ways, over real loopback sockets, TLS and daemons.

1. A ztunnel-format client (Node.js's own HTTP/2 and TLS stacks: tests/support/node_ztunnel_double_hbone.js)
   reaches a workload behind a meshd gateway: outer TLS with its workload certificate, outer and inner
   CONNECT naming `echo.default.svc.cluster.local:7000` with ztunnel's headers, the inner TLS inside the
   outer stream. Four daemons: gwa and a1 (network site-a, a1 runs the `client` workload the
   certificate belongs to), gwb and b1 (site-b, b1 runs `echo`); gwb learns site A from gwa.
2. meshd's own outbound, recorded: a real node daemon (site-a) tunnels to `echo.default` in site-b
   through a recording gateway and a recording destination (our HBONE server library in a thread,
   serving the catalogs that send it there); both CONNECTs must be ztunnel's, header for header.

The facts each expectation rests on (ztunnel source file and function) are in docs/hbone.md, "Double
HBONE". No network namespaces: every party is on its own loopback address; what keeps the networks
apart here is the catalog (a node of another network is only ever reached through its gateway).
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import trio

from meshd.discovery.catalog import (
    CATALOG_PATH,
    GatewayEntry,
    NodeCatalog,
    ServiceEntry,
    ServicePortEntry,
    WorkloadEntry,
)
from meshd.discovery.networks import NETWORK_CATALOG_PATH, encode_network_catalog
from meshd.hbone.bridge import splice
from meshd.hbone.server import HboneServer, InboundRequest, ServerReply
from meshd.hbone.target import HostnameTarget
from meshd.identity.ca import LocalCA
from meshd.identity.spiffe import SpiffeId
from meshd.tools.echo import echo_server
from meshd.units import Address
from tests.support.hbone_mesh import certs_of, echo
from tests.support.nodejs import node_binary, run_client
from tests.support.procs import Meshd, running, unique_loopback, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

TD = "home.arpa"
ECHO_PORT = 7000
UPSTREAM_PORT = 17000
HOSTNAME = "echo.default.svc.cluster.local"
CLIENT = SpiffeId(TD, "default", "client")
ECHO_ID = SpiffeId(TD, "default", "echo")


def _config(tmp: Path, label: str, network: str, peers: list[str], body: str, top: str = "") -> Path:
    peer_list = ", ".join(f'"{p}:15008"' for p in peers)
    path = tmp / f"{label}.toml"
    path.write_text(
        f'trust_domain = "{TD}"\nnode_name = "{label}"\nnetwork = "{network}"\n{top}'
        f'[identity]\nca_dir = "{tmp / "ca"}"\n'
        f'[discovery]\nmdns = false\npeers = [{peer_list}]\nrefresh = "1s"\npeer_timeout = "5s"\n' + body
    )
    return path


def _write_certs(ca: LocalCA, identity: SpiffeId, out: Path) -> Path:
    issued = ca.issue(identity)
    out.mkdir()
    (out / "cert.pem").write_bytes(issued.cert_pem)
    (out / "key.pem").write_bytes(issued.key_pem)
    (out / "ca.crt").write_bytes(issued.ca_pem)
    return out


# ---- 1. a ztunnel-format client through a meshd gateway -------------------------------------------


@dataclass
class TwoNetworks:
    tmp: Path
    ca: LocalCA
    ips: dict[str, str]
    daemons: dict[str, Meshd]

    def ztunnel_client(
        self, identity: SpiffeId, hostname: str = HOSTNAME, port: int = ECHO_PORT, size: int = 1000
    ) -> dict[str, Any]:
        certs = self.tmp / f"certs-{identity.service_account}-{size}-{hostname}"
        if not certs.exists():
            _write_certs(self.ca, identity, certs)
        out = run_client(
            "node_ztunnel_double_hbone.js",
            *(self.ips["gwb"], "15008"),
            *(str(certs / f) for f in ("cert.pem", "key.pem", "ca.crt")),
            *(hostname, str(port), "site-a", f"{self.ips['a1']}:40000", str(size)),
            timeout=60,
        )
        return out


@pytest.fixture(scope="module")
def networks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNetworks]:
    node_binary()
    tmp = tmp_path_factory.mktemp("ztunnel-interop")
    ca = LocalCA.init(tmp / "ca", TD)
    ips = {label: unique_loopback() for label in ("gwa", "gwb", "a1", "b1")}
    gateway = 'role = "gateway"\n'
    configs = {
        "gwa": _config(
            tmp,
            "gwa",
            "site-a",
            [ips["a1"]],
            f'[gateway]\npublic = "{ips["gwa"]}:15008"\nremote = ["{ips["gwb"]}:15008"]\n',
            gateway,
        ),
        "gwb": _config(
            tmp,
            "gwb",
            "site-b",
            [ips["b1"]],
            f'[gateway]\npublic = "{ips["gwb"]}:15008"\nremote = ["{ips["gwa"]}:15008"]\n',
            gateway,
        ),
        "a1": _config(
            tmp,
            "a1",
            "site-a",
            [ips["gwa"]],
            f'[[workload]]\nname = "client"\naddress = "{ips["a1"]}"\nports = [8000]\n',
        ),
        "b1": _config(
            tmp,
            "b1",
            "site-b",
            [ips["gwb"]],
            f'[[workload]]\nname = "echo"\naddress = "{ips["b1"]}"\nports = [{ECHO_PORT}]\nservices = ["echo"]\n'
            f'[[service]]\nname = "echo"\nports = [{{ port = {ECHO_PORT} }}]\n',
        ),
    }
    daemons = {label: Meshd(path, ips[label]) for label, path in configs.items()}
    with (
        echo_server(ips["b1"], ECHO_PORT),
        running(daemons["gwa"]),
        running(daemons["gwb"]),
        running(daemons["a1"]),
        running(daemons["b1"]),
    ):
        net = TwoNetworks(tmp, ca, ips, daemons)
        # gwb knows the client workload (site A, through gwa) and echo (its own network) once this works.
        wait_for(
            lambda: net.ztunnel_client(CLIENT).get("echo_ok") is True,
            *daemons.values(),
            timeout=40,
            interval=0.5,
            what="a ztunnel-format tunnel through gwb",
        )
        yield net


def test_a_ztunnel_client_reaches_a_workload_behind_a_meshd_gateway(networks: TwoNetworks) -> None:
    size = 3 * 1024 * 1024 + 17  # several HTTP/2 windows' worth, odd-sized
    out = networks.ztunnel_client(CLIENT, size=size)
    assert out["outer"]["status"] == 200 and out["inner"]["status"] == 200, out
    # The outer TLS ends at the gateway (its node identity); the inner one at the workload, end to end.
    assert out["outer"]["san"] == f"URI:spiffe://{TD}/ns/meshd-system/sa/node-gwb", out
    assert out["inner"]["san"] == f"URI:{ECHO_ID.uri}", out
    assert out["outer"]["tls"] == out["inner"]["tls"] == "TLSv1.3"
    assert out["sent"] == out["received"] == size and out["echo_ok"], out
    # The gateway admitted the workload identity and picked b1; b1 saw the client's identity, proven by
    # the inner handshake, and the service hostname it was asked for.
    gwb, b1 = networks.daemons["gwb"], networks.daemons["b1"]
    wait_for(lambda: f"bytes_recv={size}" in b1.log(), b1, what="b1's access log line")
    line = next(x for x in b1.log().splitlines() if f"bytes_recv={size}" in x)
    assert f"src.identity={CLIENT.uri}" in line and f"dst.addr={HOSTNAME}:{ECHO_PORT}" in line, line
    assert f"src.addr={networks.ips['a1']}:40000" in line, line  # forwarded for=
    # The gateway carried the inner TLS records (more bytes than the payload: it never sees the payload).
    wait_for(lambda: _carried(gwb.log(), size), gwb, what="gwb's access log line")
    line = _carried(gwb.log(), size)
    assert f"src.identity={CLIENT.uri}" in line and "reporter=source" in line, line
    assert "dst.service=echo.default dst.workload=b1" in line, line


def _carried(log: str, size: int) -> str:
    """The gateway's access log line of a forwarded connection that carried more than `size` bytes
    ("failed" too: the gateway's half-close towards b1 can race b1's close at teardown, ENOTCONN, after
    every byte went through)."""
    for line in log.splitlines():
        sent = re.search(r"connection (?:complete|failed) .* bytes_sent=(\d+)", line)
        if sent and int(sent.group(1)) > size:
            return line
    return ""


def test_an_unknown_service_is_503_with_the_reason(networks: TwoNetworks) -> None:
    out = networks.ztunnel_client(CLIENT, hostname="nosuch.default.svc.cluster.local")
    assert out["outer"]["status"] == 503, out
    assert "no service nosuch.default" in out["outer"]["body"], out
    assert "no service nosuch.default" in networks.daemons["gwb"].log()
    wrong_port = networks.ztunnel_client(CLIENT, port=ECHO_PORT + 1)
    assert wrong_port["outer"]["status"] == 503 and "has no port" in wrong_port["outer"]["body"]


def test_an_unknown_workload_identity_is_401(networks: TwoNetworks) -> None:
    out = networks.ztunnel_client(SpiffeId(TD, "default", "stranger"))
    assert out["outer"]["status"] == 401, out
    assert "nor a workload this gateway knows" in out["outer"]["body"], out
    # A workload of the gateway's own network is told to dial directly.
    same = networks.ztunnel_client(ECHO_ID)
    assert same["outer"]["status"] == 401 and "dial directly" in same["outer"]["body"], same


# ---- 2. meshd's outbound, recorded --------------------------------------------------------------


@dataclass
class Recorded:
    """What the recording gateway and destination saw: (peer identity, :authority, target, headers)."""

    outer: list[tuple[SpiffeId, str, object, tuple[tuple[str, str], ...]]] = field(default_factory=list)
    inner: list[tuple[SpiffeId, str, object, tuple[tuple[str, str], ...]]] = field(default_factory=list)


class RecordingSite:
    """Site B as a meshd node of site A sees it, played by our HBONE server library in one trio thread:
    `gwa` (a1's own gateway: serves its catalog and the network catalog naming gwb and b1), `gwb` (the
    gateway: records the outer CONNECT, then pumps to b1), `b1` (presents echo's certificate, records
    the inner CONNECT and echoes)."""

    def __init__(self, ca: LocalCA, ips: dict[str, str]) -> None:
        self.ca, self.ips = ca, ips
        self.recorded = Recorded()
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

        def gateway(name: str, network: str) -> NodeCatalog:
            hbone = Address(ips[name], 15008)
            return NodeCatalog(
                name, TD, "gateway", hbone, (), (), network=network, gateway=GatewayEntry(hbone, (network,))
            )

        self.gwa = gateway("gwa", "site-a")
        self.gwb = gateway("gwb", "site-b")
        workload = WorkloadEntry(
            "b1", "echo", "default", "echo", ips["b1"], (ECHO_PORT,), ("echo.default",), network="site-b"
        )
        service = ServiceEntry("echo", "default", (ServicePortEntry(ECHO_PORT, ECHO_PORT, "tcp"),))
        self.b1 = NodeCatalog(
            "b1", TD, "node", Address(ips["b1"], 15008), (workload,), (service,), network="site-b"
        )

    def __enter__(self) -> RecordingSite:
        self._thread.start()
        assert self._ready.wait(10), "the recording site did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._cancel is not None:
            trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(10)

    async def _gwa(self, req: InboundRequest, reply: ServerReply) -> None:
        if req.path == CATALOG_PATH:
            await reply.respond(200, [("content-type", "application/json")], self.gwa.encode())
        elif req.path == NETWORK_CATALOG_PATH:
            body = encode_network_catalog("site-a", [self.gwa, self.gwb, self.b1])
            await reply.respond(200, [("content-type", "application/json")], body)
        else:
            await reply.refuse(404, "not here")

    async def _gwb(self, req: InboundRequest, reply: ServerReply) -> None:
        if not req.is_connect:
            await reply.respond(200, [("content-type", "application/json")], self.gwb.encode())
            return
        self.recorded.outer.append((req.peer_identity, req.authority, req.target, req.headers))
        tcp = await trio.open_tcp_stream(self.ips["b1"], 15008)
        await splice(tcp, await reply.accept())

    async def _b1(self, req: InboundRequest, reply: ServerReply) -> None:
        if not req.is_connect:
            await reply.respond(200, [("content-type", "application/json")], self.b1.encode())
            return
        self.recorded.inner.append((req.peer_identity, req.authority, req.target, req.headers))
        await echo(req, reply)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        servers = [
            (self.ips["gwa"], SpiffeId.node(TD, "gwa"), self._gwa),
            (self.ips["gwb"], SpiffeId.node(TD, "gwb"), self._gwb),
            (self.ips["b1"], ECHO_ID, self._b1),  # b1 answers at echo's address as echo (as a node does)
        ]
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            for ip, identity, handler in servers:
                server = HboneServer(certs_of(self.ca.issue(identity)).server_provider(), TD, handler)
                await nursery.start(server.serve, ip, 15008)
            self._ready.set()


def _round_trip(address: tuple[str, int], payload: bytes) -> bool:
    """Send `payload` from the app's address (the listener's), half-close, and compare the echo."""
    try:
        with socket.create_connection(address, timeout=5, source_address=(address[0], 0)) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
            return got == payload
    except OSError:
        return False


def test_meshd_outbound_speaks_ztunnels_double_hbone(tmp_path: Path) -> None:
    ca = LocalCA.init(tmp_path / "ca", TD)
    ips = {label: unique_loopback() for label in ("gwa", "gwb", "b1", "a1")}
    a1 = _config(
        tmp_path,
        "a1",
        "site-a",
        [ips["gwa"]],
        f'[[workload]]\nname = "client"\naddress = "{ips["a1"]}"\nports = [8000]\n'
        f'[[upstream]]\nservice = "echo.default"\nport = {ECHO_PORT}\nlisten = "{ips["a1"]}:{UPSTREAM_PORT}"\n',
    )
    with RecordingSite(ca, ips) as site, running(Meshd(a1, ips["a1"])) as daemon:
        payload = b"ztunnel-format " * 1000
        wait_for(
            lambda: _round_trip((ips["a1"], UPSTREAM_PORT), payload),
            daemon,
            timeout=30,
            interval=0.5,
            what="a1 reaching echo through the recording gateway",
        )
        (outer_peer, outer_authority, outer_target, outer_headers) = site.recorded.outer[-1]
        (inner_peer, inner_authority, inner_target, inner_headers) = site.recorded.inner[-1]
    # Outer TLS: meshd's node identity (meshd's choice; ztunnel uses the workload's). Inner: the client.
    assert outer_peer == SpiffeId.node(TD, "a1") and inner_peer == CLIENT
    # Both CONNECTs name the service as ztunnel does (HboneAddress::SvcHostname, service port).
    assert outer_authority == inner_authority == f"{HOSTNAME}:{ECHO_PORT}"
    assert outer_target == inner_target == HostnameTarget(HOSTNAME, ECHO_PORT)
    # ztunnel's headers in its order: baggage, forwarded (for=, ;host=), [traceparent when tracing];
    # x-forwarded-network on the inner CONNECT only.
    assert [k for k, _ in outer_headers] == ["baggage", "forwarded"], outer_headers
    assert [k for k, _ in inner_headers] == ["baggage", "forwarded", "x-forwarded-network"], inner_headers
    outer, inner = dict(outer_headers), dict(inner_headers)
    assert outer["baggage"] == inner["baggage"] == "k8s.namespace.name=default,service.name=client"
    forwarded = rf'for="{re.escape(ips["a1"])}:\d+";host={re.escape(HOSTNAME)}'
    assert re.fullmatch(forwarded, outer["forwarded"]) and outer["forwarded"] == inner["forwarded"], outer
    assert inner["x-forwarded-network"] == "site-a"


def test_the_destination_node_serves_a_service_hostname_from_a_local_workload(networks: TwoNetworks) -> None:
    """The inner CONNECT as b1 gets it, sent straight to b1 (tests/support/node_hbone_client.js): a
    service hostname of a local workload is served; any other name is 400 with the reason."""
    certs = networks.tmp / "certs-client-direct"
    _write_certs(networks.ca, CLIENT, certs)
    good, no_service = f"{HOSTNAME}:{ECHO_PORT}", f"nosuch.default.svc.cluster.local:{ECHO_PORT}"
    no_port, short = f"{HOSTNAME}:{ECHO_PORT + 1}", f"echo.default:{ECHO_PORT}"
    streams = ((good, 100_000), (no_service, 0), (no_port, 0), (short, 0))
    out = run_client(
        "node_hbone_client.js",
        *(networks.ips["b1"], "15008"),
        *(str(certs / f) for f in ("cert.pem", "key.pem", "ca.crt")),
        *(a for authority, size in streams for a in (authority, str(size))),
        timeout=60,
    )
    results = {r["authority"]: r for r in out["results"]}
    assert results[good]["status"] == 200 and results[good]["echo_ok"], results[good]
    assert results[no_service]["status"] == 400 and "no service nosuch.default" in results[no_service]["body"]
    assert results[no_port]["status"] == 400 and "has no port" in results[no_port]["body"]
    assert results[short]["status"] == 400 and "svc.cluster.local" in results[short]["body"]


def test_a_tunnel_cut_with_its_connection_is_still_logged(networks: TwoNetworks) -> None:
    """The client's HBONE connection dies with a tunnel open (no close_notify, GOAWAY or END_STREAM):
    the tunnel still gets its access-log line, with what it carried and why it failed."""
    certs = networks.tmp / "certs-client-cut"
    _write_certs(networks.ca, CLIENT, certs)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(certs / "ca.crt"))
    ctx.load_cert_chain(str(certs / "cert.pem"), str(certs / "key.pem"))
    ctx.set_alpn_protocols(["h2"])
    b1 = networks.daemons["b1"]
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    with socket.create_connection((networks.ips["b1"], 15008), timeout=10) as raw:
        tls = ctx.wrap_socket(raw)
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "CONNECT"), (":authority", f"{HOSTNAME}:{ECHO_PORT}")])
        conn.send_data(sid, b"cut-me")
        tls.sendall(conn.data_to_send())
        echoed = b""
        while echoed != b"cut-me":
            for event in conn.receive_data(tls.recv(65536)):
                if isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                    echoed += event.data
            tls.sendall(conn.data_to_send())
        tls.close()  # no close_notify, no GOAWAY, no END_STREAM: the connection is just gone

    # b1 logs the tunnel once its connection is gone.
    def cut_line() -> str:
        return next(
            (x for x in b1.log().splitlines() if "connection failed" in x and "bytes_sent=6 " in x), ""
        )

    wait_for(cut_line, b1, what="b1's log line of the cut tunnel")
    assert f"dst.addr={HOSTNAME}:{ECHO_PORT}" in cut_line() and "bytes_recv=6 " in cut_line(), cut_line()
