"""HBONE over real loopback TLS for tests: identities, a server and a pool in one nursery, an echo
handler, a pool on its own, one echo round trip on a tunnel. The fixtures that issue certificates for
them are in tests/hbone/conftest.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from meshd.hbone.pool import HbonePool
from meshd.hbone.server import HboneServer, InboundRequest, ServerReply
from meshd.hbone.tls import StaticCertificates
from meshd.identity.ca import IssuedCert
from meshd.identity.spiffe import SpiffeId

TD = "home.arpa"  # the trust domain of the shared `ca` fixture
SERVER_ID = SpiffeId(TD, "meshd-system", "node-b")
CLIENT_ID = SpiffeId(TD, "default", "client")

Handler = Callable[[InboundRequest, ServerReply], Awaitable[None]]


def certs_of(issued: IssuedCert) -> StaticCertificates:
    return StaticCertificates(issued.cert_pem, issued.key_pem, issued.ca_pem)


@dataclass
class Mesh:
    server: HboneServer
    pool: HbonePool
    address: tuple[str, int]
    nursery: trio.Nursery

    async def tunnel(self, authority: str = "10.0.0.1:80") -> object:
        return await self.pool.open_tunnel(CLIENT_ID, SERVER_ID, self.address, authority)


@asynccontextmanager
async def running_mesh(
    server_certs: StaticCertificates,
    client_certs: StaticCertificates,
    handler: Handler,
    **pool_options: object,
) -> AsyncIterator[Mesh]:
    """An HboneServer on 127.0.0.1:<free port> and an HbonePool, both torn down on exit."""
    server = HboneServer(server_certs.server_provider(), TD, handler)
    pool = HbonePool(client_certs.client_provider(), **pool_options)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        await nursery.start(pool.run)
        yield Mesh(server, pool, address, nursery)
        nursery.cancel_scope.cancel()


async def echo(req: InboundRequest, reply: ServerReply) -> None:
    """Accept and echo until EOF, reading and writing concurrently (no reader waits on a writer)."""
    stream = await reply.accept()
    send, receive = trio.open_memory_channel[bytes](4)

    async def reader() -> None:
        async with send:
            while data := await stream.receive_some():
                await send.send(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        async with receive:
            async for data in receive:
                await stream.send_all(data)
    await stream.send_eof()


@asynccontextmanager
async def running_pool(provider: object) -> AsyncIterator[HbonePool]:
    """An HbonePool (no pings, 10 s to connect) running in its own nursery, cancelled on exit."""
    pool = HbonePool(provider, connect_timeout=10, ping_interval=None)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        yield pool
        nursery.cancel_scope.cancel()


async def echo_through(tunnel: trio.abc.HalfCloseableStream, payload: bytes) -> bytes:
    """Send `payload` on the tunnel, half-close it, read until the peer ends; the tunnel is closed after."""
    async with tunnel:
        await tunnel.send_all(payload)
        await tunnel.send_eof()
        out = bytearray()
        while chunk := await tunnel.receive_some():
            out += chunk
    return bytes(out)
