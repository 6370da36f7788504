"""One proxied connection, the same for every role: a refusal is a `Refused` raised where the reason
is known and caught once where the answer is written; an admitted connection goes through `proxied`,
which counts it open, tracks it in flight, pumps it and counts it closed with its bytes."""

from __future__ import annotations

import trio

from meshd.dataplane.pump import PumpResult, pump
from meshd.dataplane.state import NodeState
from meshd.observe.accesslog import ConnectionRecord


class Refused(Exception):
    """A tunnel, connection or request answered with a refusal: the HBONE/HTTP `status` to answer
    with, the access log's response `flag` (None: not a connection the TCP telemetry counts), and
    the `reason` the log and the refusal carry."""

    def __init__(self, status: int, flag: str | None, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.flag = flag
        self.reason = reason


async def proxied(
    state: NodeState,
    rec: ConnectionRecord,
    client: trio.abc.HalfCloseableStream,
    upstream: trio.abc.HalfCloseableStream,
) -> PumpResult:
    """Carry one admitted connection until both sides are done (telemetry from open to close)."""
    state.telemetry.opened(rec)
    state.track_inflight(1)
    result = PumpResult()
    try:
        await pump(client, upstream, result)
    except BaseException as exc:
        # Cancelled: the HBONE connection carrying the tunnel ended (its handlers are cancelled with
        # it) or meshd is stopping. The connection is still counted closed and logged, with why.
        why = "cancelled (its HBONE connection ended, or meshd is stopping)"
        result.error = result.error or (why if _cancelled(exc) else repr(exc))
        raise
    finally:
        state.track_inflight(-1)
        state.telemetry.closed(rec, sent=result.b_to_a, received=result.a_to_b, error=result.error)
    return result


def _cancelled(exc: BaseException) -> bool:
    """trio.Cancelled, alone or as every leaf of the group a nursery raised it in."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)
