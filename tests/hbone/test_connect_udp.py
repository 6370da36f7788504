"""Extended CONNECT for UDP (RFC 8441 + RFC 9298) in the sans-I/O core, and over real loopback TLS."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
import trio

from meshd.hbone import events as ev
from meshd.hbone.capsule import CapsuleDecoder, encode_datagram
from meshd.hbone.connection import HboneConnection, Role, parse_udp_path, udp_path
from meshd.hbone.errors import LocalProtocolError, TunnelRefused
from meshd.hbone.pool import HbonePool
from meshd.hbone.server import HboneServer, InboundRequest, ServerReply
from meshd.hbone.tls import StaticCertificates
from meshd.identity.ca import LocalCA
from meshd.identity.spiffe import SpiffeId

TD = "home.arpa"
SERVER_ID = SpiffeId(TD, "meshd-system", "node-b")
CLIENT_ID = SpiffeId(TD, "default", "client")


def pump(client: HboneConnection, server: HboneConnection) -> tuple[list[ev.Event], list[ev.Event]]:
    at_client: list[ev.Event] = []
    at_server: list[ev.Event] = []
    while True:
        to_server, to_client = client.data_to_send(), server.data_to_send()
        if not to_server and not to_client:
            return at_client, at_server
        if to_server:
            at_server += server.receive_data(to_server)
        if to_client:
            at_client += client.receive_data(to_client)


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/.well-known/masque/udp/10.0.0.1/53/", ("10.0.0.1", 53)),
        ("/.well-known/masque/udp/2001%3Adb8%3A%3A1/443/", ("2001:db8::1", 443)),
        ("/.well-known/masque/udp/::1/443/", ("::1", 443)),
        ("/.well-known/masque/udp/example.com/53/", None),  # a node resolves no names
        ("/.well-known/masque/udp/10.0.0.1/0/", None),
        ("/.well-known/masque/udp/10.0.0.1/65536/", None),
        ("/.well-known/masque/udp/10.0.0.1/53", None),
        ("/.well-known/masque/udp/10.0.0.1/+53/", None),
        ("/other/10.0.0.1/53/", None),
        (None, None),
    ],
)
def test_parse_udp_path(path: str | None, target: tuple[str, int] | None) -> None:
    assert parse_udp_path(path) == target


def test_udp_path_round_trips_ipv6() -> None:
    assert udp_path("fd00::5", 53) == "/.well-known/masque/udp/fd00%3A%3A5/53/"
    assert parse_udp_path(udp_path("fd00::5", 53)) == ("fd00::5", 53)


def test_server_advertises_extended_connect_and_client_waits_for_it() -> None:
    client, server = HboneConnection(Role.CLIENT), HboneConnection(Role.SERVER)
    assert client.peer_enables_connect_protocol is None
    with pytest.raises(LocalProtocolError, match="SETTINGS have not arrived"):
        client.open_udp_tunnel("10.0.0.1", 53)
    at_client, _ = pump(client, server)
    assert ev.PeerSettingsReceived(True) in at_client
    assert client.peer_enables_connect_protocol is True
    assert server.peer_enables_connect_protocol is False  # clients never enable it


def test_udp_tunnel_carries_capsules_both_ways() -> None:
    client, server = HboneConnection(Role.CLIENT), HboneConnection(Role.SERVER)
    pump(client, server)
    sid = client.open_udp_tunnel("10.0.0.1", 53, headers=[("forwarded", 'for="127.0.0.1:5000"')])
    _, at_server = pump(client, server)
    (req,) = [e for e in at_server if isinstance(e, ev.UdpTunnelRequested)]
    assert (req.host, req.port, req.authority) == ("10.0.0.1", 53, "10.0.0.1:53")
    assert ("capsule-protocol", "?1") in req.headers
    server.accept(sid, [("capsule-protocol", "?1")])
    client.send_data(sid, encode_datagram(b"query"))
    at_client, at_server = pump(client, server)
    (resp,) = [e for e in at_client if isinstance(e, ev.ResponseReceived)]
    assert resp.status == 200 and ("capsule-protocol", "?1") in resp.headers
    data = b"".join(e.data for e in at_server if isinstance(e, ev.DataReceived))
    assert CapsuleDecoder().feed(data) == [b"query"]


def _raw_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    return conn


def _exchange(raw: h2.connection.H2Connection, server: HboneConnection) -> list[h2.events.Event]:
    events: list[h2.events.Event] = []
    for _ in range(4):
        server.receive_data(raw.data_to_send())
        events += raw.receive_data(server.data_to_send())
    return events


@pytest.mark.parametrize(
    ("protocol", "path", "status"),
    [
        ("websocket", "/chat", 501),
        ("connect-udp", "/.well-known/masque/udp/example.com/53/", 400),
        ("connect-udp", "/nope", 400),
    ],
)
def test_server_refuses_other_protocols_and_bad_targets(protocol: str, path: str, status: int) -> None:
    server = HboneConnection(Role.SERVER)
    raw = _raw_client()
    _exchange(raw, server)
    raw.send_headers(
        1,
        [
            (":method", "CONNECT"),
            (":protocol", protocol),
            (":scheme", "https"),
            (":authority", "10.0.0.1:53"),
            (":path", path),
        ],
    )
    events = _exchange(raw, server)
    (resp,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert dict(resp.headers)[b":status"] == str(status).encode()


# ---- over real TLS: pool <-> server ------------------------------------------------------------


def _certs(ca: LocalCA, who: SpiffeId) -> StaticCertificates:
    issued = ca.issue(who)
    return StaticCertificates(issued.cert_pem, issued.key_pem, issued.ca_pem)


async def test_pool_opens_udp_tunnel_over_tls(ca: LocalCA) -> None:
    seen: list[InboundRequest] = []

    async def handler(req: InboundRequest, reply: ServerReply) -> None:
        seen.append(req)
        if req.destination == ("10.0.0.9", 9):
            await reply.refuse(401, "denied")
            return
        stream = await reply.accept([("capsule-protocol", "?1")])
        dec = CapsuleDecoder()
        while data := await stream.receive_some():
            for payload in dec.feed(data):
                await stream.send_all(encode_datagram(payload[::-1]))

    server = HboneServer(_certs(ca, SERVER_ID).server_provider(), TD, handler)
    pool = HbonePool(_certs(ca, CLIENT_ID).client_provider())
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        await nursery.start(pool.run)
        tunnel = await pool.open_udp_tunnel(CLIENT_ID, SERVER_ID, address, ("10.0.0.1", 53))
        await tunnel.send_all(encode_datagram(b"abc") + encode_datagram(b"defg"))
        dec, got = CapsuleDecoder(), []
        while len(got) < 2:
            got += dec.feed(await tunnel.receive_some())
        assert got == [b"cba", b"gfed"]
        # A TCP tunnel shares the same connection.
        assert pool.statistics().connections == 1
        with pytest.raises(TunnelRefused) as refused:
            await pool.open_udp_tunnel(CLIENT_ID, SERVER_ID, address, ("10.0.0.9", 9))
        assert refused.value.status == 401
        await tunnel.aclose()
        assert seen[0].is_udp and seen[0].destination == ("10.0.0.1", 53)
        nursery.cancel_scope.cancel()


def test_client_refuses_when_the_peer_does_not_enable_extended_connect() -> None:
    """A server that never advertises SETTINGS_ENABLE_CONNECT_PROTOCOL (ztunnel today): the client
    says so instead of sending a stream the server would misread as a TCP CONNECT."""
    client = HboneConnection(Role.CLIENT)
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    raw.initiate_connection()
    raw.receive_data(client.data_to_send())
    events = client.receive_data(raw.data_to_send())
    assert ev.PeerSettingsReceived(False) in events
    with pytest.raises(LocalProtocolError, match="has not enabled extended CONNECT"):
        client.open_udp_tunnel("10.0.0.1", 53)
