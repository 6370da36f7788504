"""Copy bytes both ways between two half-closeable streams, with back-pressure.

Each direction is its own task: a reader that waited on the other direction's send would deadlock
under two-way bulk traffic. EOF on one side becomes a half-close (send_eof) on the other, so
request/response protocols that shut down their write side keep working through the mesh. A
half-close that finds the other side already disconnected (ENOTCONN: it reset after its own end)
is not an error, as in ztunnel's copy: that side shut down for us.

One trip through the scheduler per chunk: `receive_some` is the copy loop's schedule point, and a
destination that can take bytes without yielding (`send_nowait`: `TcpStream`, `TunnelStream`) gets
them straight away; only what it does not take goes through the checkpointing `send_all`.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

import trio

CHUNK = 256 * 1024


@dataclass
class PumpResult:
    """Bytes copied each way, and the first error that ended the copy (None = both sides closed cleanly)."""

    a_to_b: int = 0
    b_to_a: int = 0
    error: str | None = None


async def pump(
    a: trio.abc.HalfCloseableStream, b: trio.abc.HalfCloseableStream, result: PumpResult | None = None
) -> PumpResult:
    """Copy until both directions ended (or one broke). The counts go into `result` as they grow, so
    a caller that is cancelled midway still knows what was carried."""
    result = PumpResult() if result is None else result

    async def copy(
        src: trio.abc.HalfCloseableStream, dst: trio.abc.HalfCloseableStream, forward: bool
    ) -> None:
        # TcpStream and TunnelStream have it; any other stream goes through send_all only.
        send_nowait: Callable[[bytes | bytearray], int] | None = getattr(dst, "send_nowait", None)
        try:
            while True:
                data = await src.receive_some(CHUNK)
                if not data:
                    break
                taken = send_nowait(data) if send_nowait is not None else 0
                if taken < len(data):
                    await dst.send_all(memoryview(data)[taken:] if taken else data)
                if forward:
                    result.a_to_b += len(data)
                else:
                    result.b_to_a += len(data)
            try:
                await dst.send_eof()
            except trio.BrokenResourceError as exc:
                if not _already_disconnected(exc):
                    raise
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # One side is gone: record why and stop the other direction too.
            result.error = (
                result.error or f"{'upstream' if forward else 'downstream'}: {exc or type(exc).__name__}"
            )
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(copy, a, b, True)
        nursery.start_soon(copy, b, a, False)
    return result


def _already_disconnected(exc: BaseException) -> bool:
    """The half-close failed because the socket is no longer connected (the peer reset it)."""
    cause = exc.__cause__ or exc.__context__  # compiled (mypyc) code keeps `raise .. from` as context only
    return isinstance(cause, OSError) and cause.errno == errno.ENOTCONN
