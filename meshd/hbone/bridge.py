"""A tunnel as a socket: for HBONE connections that run inside another tunnel (double HBONE's inner
connection, the gateway's reverse connection).

Must never know: HTTP/2, TLS, who opened the tunnel. The connection code (`Wire`, `HboneLink`) does its
I/O on a socket (synchronous writes, readiness waits), so a tunnel is spliced to one end of a
socketpair and the connection runs on the other: the same code as every connection, at the cost of
one local copy each way.
"""

from __future__ import annotations

import socket

import trio

CHUNK = 256 * 1024


def socket_over(stream: trio.abc.HalfCloseableStream, nursery: trio.Nursery) -> socket.socket:
    """One end of a socketpair whose other end is spliced to `stream` by a task in `nursery`. When
    either side ends or breaks, both are closed."""
    near, far = socket.socketpair()
    nursery.start_soon(splice, trio.SocketStream(trio.socket.from_stdlib_socket(far)), stream)
    return near


async def splice(a: trio.abc.HalfCloseableStream, b: trio.abc.HalfCloseableStream) -> None:
    """Copy both ways with half-close until both directions ended (or either broke); close both."""

    async def one_way(
        src: trio.abc.ReceiveStream, dst: trio.abc.HalfCloseableStream, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await src.receive_some(CHUNK):
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()  # one side went away: the other sees its stream close

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one_way, a, b, nursery.cancel_scope)
            nursery.start_soon(one_way, b, a, nursery.cancel_scope)
    finally:
        await trio.aclose_forcefully(a)
        await trio.aclose_forcefully(b)
