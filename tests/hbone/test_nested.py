"""HBONE inside HBONE over real loopback mutual TLS: double HBONE (`open_nested_tunnel`, the inner TLS
end to end through a hop that only pumps bytes) and the reverse connection (`client_link_over` /
`open_tunnel_on` / `get_on` on one side, `HboneServer.serve_stream` on the other)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
import trio.testing

from meshd.hbone.bridge import splice
from meshd.hbone.pool import HbonePool
from meshd.hbone.server import HboneServer, InboundRequest, ServerReply
from meshd.hbone.stream import TunnelStream
from meshd.identity.ca import LocalCA
from meshd.identity.spiffe import SpiffeId
from tests.support.hbone_mesh import CLIENT_ID, SERVER_ID, TD, Handler, certs_of, echo, echo_through

NODE_A = SpiffeId(TD, "meshd-system", "node-a")
GATEWAY = SpiffeId(TD, "meshd-system", "node-gw")
MiB = 1024 * 1024


def provider(ca: LocalCA, *identities: SpiffeId) -> object:
    contexts = {i: certs_of(ca.issue(i)).client_provider()(i) for i in identities}

    def context(source: SpiffeId) -> ssl.SSLContext:
        return contexts[source]

    return context


class Hop:
    """A gateway stand-in: accepts any CONNECT, dials `target`, pumps, and keeps what it carried."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.peers: list[SpiffeId] = []
        self.carried = bytearray()
        self.finished = trio.Event()

    async def handle(self, req: InboundRequest, reply: ServerReply) -> None:
        self.peers.append(req.peer_identity)
        tcp = await trio.open_tcp_stream(*self.target)
        tunnel = await reply.accept()
        hop = self

        class Recording(trio.abc.HalfCloseableStream):  # what the hop sees going to the target
            async def send_all(self, data: bytes | bytearray | memoryview) -> None:
                hop.carried += data
                await tcp.send_all(data)

            async def wait_send_all_might_not_block(self) -> None:
                await tcp.wait_send_all_might_not_block()

            async def send_eof(self) -> None:
                await tcp.send_eof()

            async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
                return await tcp.receive_some(max_bytes)

            async def aclose(self) -> None:
                await tcp.aclose()

        await splice(Recording(), tunnel)
        self.finished.set()


@dataclass
class HopPath:
    pool: HbonePool  # holds NODE_A's and CLIENT_ID's certificates
    hop: Hop
    inner: tuple[str, int]  # the destination's HBONE server (SERVER_ID)
    hop_address: tuple[str, int]  # the hop's HBONE server (GATEWAY)

    async def nested_tunnel(self) -> TunnelStream:
        """NODE_A's tunnel to the hop and, inside it, CLIENT_ID's tunnel to the destination."""
        outer = await self.pool.open_tunnel(NODE_A, GATEWAY, self.hop_address, f"127.0.0.1:{self.inner[1]}")
        return await self.pool.open_nested_tunnel(
            outer, CLIENT_ID, SERVER_ID, "10.0.0.1:80", peer_address=self.inner
        )


@asynccontextmanager
async def through_a_hop(ca: LocalCA, handler: Handler) -> AsyncIterator[HopPath]:
    """The destination's server (answering with `handler`), a Hop in front of it and a pool, running in
    one nursery, cancelled when the block ends."""
    inner = HboneServer(certs_of(ca.issue(SERVER_ID)).server_provider(), TD, handler)
    pool = HbonePool(provider(ca, NODE_A, CLIENT_ID))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        inner_address = await nursery.start(inner.serve, "127.0.0.1", 0)
        hop = Hop(inner_address)
        hop_server = HboneServer(certs_of(ca.issue(GATEWAY)).server_provider(), TD, hop.handle)
        hop_address = await nursery.start(hop_server.serve, "127.0.0.1", 0)
        await nursery.start(pool.run)
        yield HopPath(pool, hop, inner_address, hop_address)
        nursery.cancel_scope.cancel()


async def test_double_hbone_keeps_the_inner_tls_end_to_end(ca: LocalCA) -> None:
    seen: list[SpiffeId] = []

    async def inner_echo(req: InboundRequest, reply: ServerReply) -> None:
        seen.append(req.peer_identity)
        await echo(req, reply)

    with trio.fail_after(30):
        async with through_a_hop(ca, inner_echo) as path:
            tunnel = await path.nested_tunnel()
            payload = b"inner plaintext " * (MiB // 16)
            got = await echo_through(tunnel, payload)
            assert got == payload
            hop = path.hop
            assert hop.peers == [NODE_A]  # the hop saw the node, outside
            assert seen == [CLIENT_ID]  # the destination saw the workload, inside
            assert len(hop.carried) > len(payload) and b"inner plaintext" not in hop.carried
            await hop.finished.wait()  # the inner connection ended with its tunnel, and the outer one too


async def test_a_nested_tunnel_is_a_half_closeable_stream(ca: LocalCA) -> None:
    accepted_send, accepted_receive = trio.open_memory_channel[TunnelStream](1)

    async def hand_over(req: InboundRequest, reply: ServerReply) -> None:
        await accepted_send.send(await reply.accept())
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with through_a_hop(ca, hand_over) as path:

            async def stream_maker() -> tuple[TunnelStream, TunnelStream]:
                return await path.nested_tunnel(), await accepted_receive.receive()

            await trio.testing.check_half_closeable_stream(stream_maker, None)


async def test_a_reverse_connection_carries_tunnels_and_requests_the_other_way(ca: LocalCA) -> None:
    """B dials A and opens one tunnel; A runs a client link inside it and opens tunnels (and a GET)
    that B's server answers, as if they had come in on B's own port."""
    seen: list[SpiffeId] = []
    links: trio.MemorySendChannel[object]
    links, got_link = trio.open_memory_channel[object](1)
    pool_a = HbonePool(provider(ca, GATEWAY))  # type: ignore[arg-type]
    pool_b = HbonePool(provider(ca, NODE_A))  # type: ignore[arg-type]

    async def hold(req: InboundRequest, reply: ServerReply) -> None:  # A: the public side
        link = pool_a.client_link_over(await reply.accept(), req.peer_identity, req.peer_address)
        await links.send(link)
        await link.run()

    async def serve_b(req: InboundRequest, reply: ServerReply) -> None:  # B: the NAT'd side
        seen.append(req.peer_identity)
        if req.is_connect:
            await echo(req, reply)
        else:
            await reply.respond(200, [("content-type", "text/plain")], f"GET {req.path}".encode())

    server_a = HboneServer(certs_of(ca.issue(GATEWAY)).server_provider(), TD, hold)
    server_b = HboneServer(certs_of(ca.issue(NODE_A)).server_provider(), TD, serve_b)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address_a = await nursery.start(server_a.serve, "127.0.0.1", 0)
            await nursery.start(pool_a.run)
            await nursery.start(pool_b.run)
            reverse = await pool_b.open_tunnel(NODE_A, GATEWAY, address_a, f"127.0.0.1:{address_a[1]}")
            nursery.start_soon(server_b.serve_stream, reverse, GATEWAY, address_a)
            link = await got_link.receive()
            tunnel = await pool_a.open_tunnel_on(link, "10.0.0.1:80")  # type: ignore[arg-type]
            got = await echo_through(tunnel, b"through the reverse connection")
            assert got == b"through the reverse connection"
            assert await pool_a.get_on(link, "/meshd/v1/network-catalog") == (  # type: ignore[arg-type]
                200,
                b"GET /meshd/v1/network-catalog",
            )
            assert seen == [GATEWAY, GATEWAY]  # B's server saw A's identity, from the mTLS under it
            nursery.cancel_scope.cancel()
