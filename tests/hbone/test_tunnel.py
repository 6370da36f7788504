"""HBONE over real loopback mutual TLS: TunnelStream semantics, integrity, pooling, drain."""

from __future__ import annotations

import hashlib
import ssl

import pytest
import trio
import trio.testing

from meshd.hbone.errors import HboneConnectError, TunnelRefused
from meshd.hbone.pool import HbonePool
from meshd.hbone.server import HboneServer, InboundRequest, ServerReply
from meshd.hbone.stream import TunnelStream
from meshd.hbone.tls import StaticCertificates
from meshd.identity.ca import LocalCA
from meshd.identity.spiffe import SpiffeId
from tests.support.hbone_mesh import CLIENT_ID, SERVER_ID, TD, echo, running_mesh

MiB = 1024 * 1024


async def test_tunnel_stream_is_a_half_closeable_stream(
    server_certs: StaticCertificates, client_certs: StaticCertificates
) -> None:
    accepted_send, accepted_receive = trio.open_memory_channel[TunnelStream](1)

    async def hand_over(req: InboundRequest, reply: ServerReply) -> None:
        await accepted_send.send(await reply.accept())
        await trio.sleep_forever()  # the test owns the stream; the connection's end cancels us

    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, hand_over) as mesh:

            async def stream_maker() -> tuple[TunnelStream, TunnelStream]:
                client_side = await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:80")
                return client_side, await accepted_receive.receive()

            await trio.testing.check_half_closeable_stream(stream_maker, None)
            # One pooled connection carried every stream the checker opened.
            assert mesh.pool.statistics().connects == 1


async def test_100_mib_both_ways_at_once_is_intact(
    server_certs: StaticCertificates, client_certs: StaticCertificates
) -> None:
    total = 100 * MiB
    block = bytes(range(256)) * 4096  # 1 MiB; an index per chunk makes reordering visible

    with trio.fail_after(60):
        async with running_mesh(server_certs, client_certs, echo) as mesh:
            tunnel = await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:80")
            sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()
            received = 0

            async def sender() -> None:
                for i in range(total // len(block)):
                    chunk = i.to_bytes(8, "big") + block[8:]
                    sent_hash.update(chunk)
                    await tunnel.send_all(chunk)
                await tunnel.send_eof()

            async def receiver() -> None:
                nonlocal received
                while data := await tunnel.receive_some():
                    got_hash.update(data)
                    received += len(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                nursery.start_soon(receiver)
            await tunnel.aclose()
            assert received == total
            assert got_hash.digest() == sent_hash.digest()
            assert tunnel.bytes_sent == tunnel.bytes_received == total


async def test_pool_reuses_one_connection_and_opens_a_second_beyond_100_streams(
    server_certs: StaticCertificates, client_certs: StaticCertificates
) -> None:
    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, echo) as mesh:
            for _ in range(5):
                t = await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:80")
                await t.send_all(b"hi")
                await t.send_eof()
                assert await t.receive_some() == b"hi"
                await t.aclose()
            assert mesh.pool.statistics().connects == 1

            tunnels = [
                await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:80")
                for _ in range(100)
            ]
            stats = mesh.pool.statistics()
            assert (stats.connections, stats.streams) == (1, 100)
            tunnels.append(await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:80"))
            stats = mesh.pool.statistics()
            assert (stats.connections, stats.streams, stats.connects) == (2, 101, 2)
            assert mesh.server.statistics().connections == 2
            for t in tunnels:
                await t.aclose()


async def test_concurrent_opens_share_one_connection(
    server_certs: StaticCertificates, client_certs: StaticCertificates
) -> None:
    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, echo) as mesh:
            opened: list[TunnelStream] = []

            async def open_one() -> None:
                opened.append(await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:80"))

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(open_one)
            assert len(opened) == 20
            assert mesh.pool.statistics().connects == 1
            for t in opened:
                await t.aclose()


async def test_idle_connection_is_released(
    server_certs: StaticCertificates, client_certs: StaticCertificates
) -> None:
    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, echo, idle_timeout=0.2) as mesh:
            t = await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:80")
            await t.aclose()
            while mesh.pool.statistics().connections:
                await trio.sleep(0.05)  # polling a condition, bounded by fail_after
            while mesh.server.statistics().connections:
                await trio.sleep(0.05)
            t = await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:80")
            await t.aclose()
            assert mesh.pool.statistics().connects == 2


async def test_goaway_drain_lets_the_in_flight_stream_finish(
    server_certs: StaticCertificates, client_certs: StaticCertificates
) -> None:
    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, echo) as mesh:
            t = await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:80")
            await t.send_all(b"before")
            assert await t.receive_some() == b"before"
            mesh.server.drain()
            assert mesh.server.statistics().draining
            # The server no longer accepts, and the pooled connection saw GOAWAY: no new tunnel.
            with pytest.raises(HboneConnectError, match="refused"):
                await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:80")
            # The in-flight stream carries on both ways.
            await t.send_all(b"after")
            assert await t.receive_some() == b"after"
            await t.send_eof()
            assert await t.receive_some() == b""
            await t.aclose()
            while mesh.server.statistics().connections:
                await trio.sleep(0.05)  # the drained connection closes once its last stream ends


async def test_drained_serve_returns_when_connections_finish(
    server_certs: StaticCertificates, client_certs: StaticCertificates
) -> None:
    server = HboneServer(server_certs.server_provider(), TD, echo)
    pool = HbonePool(client_certs.client_provider())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            served = trio.Event()

            async def serve(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
                await server.serve("127.0.0.1", 0, task_status=task_status)
                served.set()

            address = await nursery.start(serve)
            t = await pool.open_tunnel(CLIENT_ID, SERVER_ID, address, "10.0.0.1:80")
            server.drain()
            await t.send_all(b"x")
            assert await t.receive_some() == b"x"
            assert not served.is_set()
            await t.aclose()
            await served.wait()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("status", "reason"), [(401, "denied by policy"), (503, "no such upstream"), (400, "")]
)
async def test_refusals_propagate_as_tunnel_refused(
    server_certs: StaticCertificates, client_certs: StaticCertificates, status: int, reason: str
) -> None:
    async def refuse(req: InboundRequest, reply: ServerReply) -> None:
        await reply.refuse(status, reason)

    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, refuse) as mesh:
            with pytest.raises(TunnelRefused) as info:
                await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:80")
            assert (info.value.status, info.value.reason) == (status, reason)
            # The connection stays usable and the stream was released on both sides.
            with pytest.raises(TunnelRefused):
                await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:80")
            assert mesh.pool.statistics().connects == 1
            assert mesh.pool.statistics().streams == 0


async def test_handler_without_answer_or_failing_gives_5xx(
    server_certs: StaticCertificates, client_certs: StaticCertificates
) -> None:
    async def sloppy(req: InboundRequest, reply: ServerReply) -> None:
        if req.authority.endswith(":1"):
            raise RuntimeError("bug in a handler")

    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, sloppy) as mesh:
            with pytest.raises(TunnelRefused) as info:
                await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:2")
            assert info.value.status == 503
            with pytest.raises(TunnelRefused) as info:
                await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:1")
            assert info.value.status == 500
            assert mesh.server.statistics().connections == 1  # the handler's bug cost one stream only


async def test_handler_sees_identity_address_and_headers(
    server_certs: StaticCertificates, client_certs: StaticCertificates
) -> None:
    seen: list[InboundRequest] = []

    async def record(req: InboundRequest, reply: ServerReply) -> None:
        seen.append(req)
        await reply.refuse(401, "just looking")

    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, record) as mesh:
            with pytest.raises(TunnelRefused):
                await mesh.pool.open_tunnel(
                    CLIENT_ID,
                    SERVER_ID,
                    mesh.address,
                    "10.9.8.7:8080",
                    headers=[("forwarded", 'for="10.0.0.5:4242"'), ("baggage", "k=v")],
                )
    (req,) = seen
    assert req.method == "CONNECT" and req.is_connect
    assert req.destination == ("10.9.8.7", 8080)
    assert req.peer_identity == CLIENT_ID
    assert req.peer_address[0] == "127.0.0.1"
    assert req.header("Forwarded") == 'for="10.0.0.5:4242"'
    assert req.header("baggage") == "k=v"


async def test_catalog_get(server_certs: StaticCertificates, client_certs: StaticCertificates) -> None:
    body = b'{"revision": 7}' * 10_000  # bigger than one frame's default size

    async def catalog(req: InboundRequest, reply: ServerReply) -> None:
        if req.method == "GET" and req.path == "/meshd/v1/catalog":
            await reply.respond(200, [("content-type", "application/json")], body)
        else:
            await reply.refuse(400, "not CONNECT")

    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, catalog) as mesh:
            status, headers, got = await mesh.pool.get(
                CLIENT_ID, SERVER_ID, mesh.address, "/meshd/v1/catalog"
            )
            assert status == 200 and got == body
            assert ("content-type", "application/json") in headers
            status, _, _ = await mesh.pool.get(CLIENT_ID, SERVER_ID, mesh.address, "/other")
            assert status == 400
            assert mesh.pool.statistics().streams == 0


async def test_context_provider_is_asked_per_connection(
    ca: LocalCA, client_certs: StaticCertificates
) -> None:
    """A renewed certificate applies to the next connection without restarting the server."""
    from meshd.hbone.errors import PeerIdentityError
    from tests.support.hbone_mesh import certs_of

    renewed_id = SpiffeId(TD, "meshd-system", "node-b-renamed")
    current = {"certs": certs_of(ca.issue(SERVER_ID))}
    contexts = {id(current["certs"]): current["certs"].server_provider()("")}

    def provider(_local_ip: str) -> ssl.SSLContext:
        certs = current["certs"]
        return contexts.setdefault(id(certs), certs.server_provider()(""))

    server = HboneServer(provider, TD, echo)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, "127.0.0.1", 0)
            pool = HbonePool(client_certs.client_provider(), max_streams_per_connection=1)
            await nursery.start(pool.run)
            first = await pool.open_tunnel(CLIENT_ID, SERVER_ID, address, "10.0.0.1:80")
            current["certs"] = certs_of(ca.issue(renewed_id))
            with pytest.raises(PeerIdentityError, match="node-b-renamed"):
                await pool.open_tunnel(CLIENT_ID, SERVER_ID, address, "10.0.0.1:80")
            second = await pool.open_tunnel(CLIENT_ID, renewed_id, address, "10.0.0.1:80")
            assert first.peer_identity == SERVER_ID and second.peer_identity == renewed_id
            await first.aclose()
            await second.aclose()
            nursery.cancel_scope.cancel()


async def test_keepalive_pings_keep_a_quiet_connection_up(
    server_certs: StaticCertificates, client_certs: StaticCertificates
) -> None:
    with trio.fail_after(30):
        async with running_mesh(
            server_certs, client_certs, echo, ping_interval=0.02, ping_timeout=1.0
        ) as mesh:
            t = await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:80")
            await trio.sleep(0.3)  # about 15 PING round trips on a quiet tunnel
            await t.send_all(b"still here")
            assert await t.receive_some() == b"still here"
            await t.aclose()
            assert mesh.pool.statistics().connects == 1


async def test_server_picks_certificate_by_local_ip_and_control_sni(
    ca: LocalCA, client_certs: StaticCertificates
) -> None:
    from tests.support.hbone_mesh import certs_of

    workload_id = SpiffeId(TD, "default", "backend")
    node_ctx = certs_of(ca.issue(SERVER_ID)).server_provider()("")
    workload_ctx = certs_of(ca.issue(workload_id)).server_provider()("")

    def to_node(sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
        if name == "control.meshd.test":
            sslobj.context = node_ctx

    workload_ctx.sni_callback = to_node
    dialled: list[str] = []

    def provider(local_ip: str) -> ssl.SSLContext:
        dialled.append(local_ip)
        return workload_ctx

    async def catalog(req: InboundRequest, reply: ServerReply) -> None:
        await reply.respond(200, [], b"catalog for " + req.peer_identity.uri.encode())

    server = HboneServer(provider, TD, catalog)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, "127.0.0.1", 0)
            pool = HbonePool(client_certs.client_provider())
            await nursery.start(pool.run)
            status, _, body, peer = await pool.get_control(
                CLIENT_ID, address, "/meshd/v1/catalog", server_hostname="control.meshd.test"
            )
            assert (status, body) == (200, b"catalog for " + CLIENT_ID.uri.encode())
            assert peer == SERVER_ID
            *_, peer = await pool.get_control(CLIENT_ID, address, "/meshd/v1/catalog")
            assert peer == workload_id  # no SNI: the dialled address decides
            assert dialled == ["127.0.0.1", "127.0.0.1"]
            assert pool.statistics().connections == 0  # control connections are not pooled
            nursery.cancel_scope.cancel()
