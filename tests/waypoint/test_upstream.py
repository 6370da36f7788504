"""The waypoint's upstream connection pool (meshd.waypoint.upstream): keep-alive reuse and idle expiry,
over in-memory streams with an h11 backend (no sockets, trio's autojump clock)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import h11
import trio
import trio.testing

from meshd.balance import CircuitBreaker
from meshd.discovery.catalog import Endpoint
from meshd.hbone.pool import HbonePool
from meshd.identity.spiffe import SpiffeId
from meshd.plugins.filters import HttpRequest
from meshd.waypoint.upstream import IDLE_TIMEOUT, UpstreamPool

ENDPOINT = cast(
    Endpoint,
    SimpleNamespace(
        key=("beta", "default/web", 80),
        identity=None,
        dial=SimpleNamespace(host="192.0.2.1", port=15008),
        authority="10.0.0.1:80",
    ),
)


class H11Stream:
    """The backend's side: an independent HTTP/1.1 implementation (h11) over a trio stream."""

    def __init__(self, stream: trio.abc.Stream, role: Any) -> None:
        self.stream = stream
        self.conn = h11.Connection(role)

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
                continue
            return event

    async def send(self, event: Any) -> None:
        await self.stream.send_all(self.conn.send(event) or b"")


class _Tunnel(trio.abc.Stream):
    """One end of an in-memory stream pair, with the `close_nowait` of an HBONE tunnel stream."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        self.close_nowait()

    def close_nowait(self) -> None:
        self.closed = True


class _FakeHbone:
    """`open_tunnel` gives a tunnel to a keep-alive h11 backend answering `200 ok`."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.tunnels: list[_Tunnel] = []

    async def open_tunnel(self, *args: Any, **kwargs: Any) -> _Tunnel:
        a, b = trio.testing.memory_stream_pair()
        tunnel = _Tunnel(a)
        self.tunnels.append(tunnel)
        self.nursery.start_soon(self._backend, b)
        return tunnel

    async def _backend(self, stream: trio.abc.Stream) -> None:
        io = H11Stream(stream, h11.SERVER)
        while True:
            event = await io.next_event()
            if isinstance(event, h11.EndOfMessage):
                await io.send(h11.Response(status_code=200, headers=[("content-length", "2")]))
                await io.send(h11.Data(data=b"ok"))
                await io.send(h11.EndOfMessage())
                io.conn.start_next_cycle()


async def _get(pool: UpstreamPool, breaker: CircuitBreaker) -> None:
    response = await pool.exchange(ENDPOINT, HttpRequest("GET", "/", "web:80"), breaker)
    assert response is not None and response.status == 200
    assert await response.read() == b"ok"


async def test_idle_upstream_connections_expire(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        hbone = _FakeHbone(nursery)
        pool = UpstreamPool(cast(HbonePool, hbone), lambda: SpiffeId.node("home.arpa", "wp"))
        breaker = CircuitBreaker()
        await nursery.start(pool.run)
        await _get(pool, breaker)
        await trio.sleep(IDLE_TIMEOUT / 2)
        await _get(pool, breaker)  # reused: idle for less than the timeout
        assert (pool.opened, pool.reused, pool.statistics()["idle"]) == (1, 1, 1)
        assert breaker.connections == 1
        await trio.sleep(IDLE_TIMEOUT - 1)
        assert not hbone.tunnels[0].closed  # the clock restarted when it went idle again
        await trio.sleep(2)
        assert hbone.tunnels[0].closed and pool.statistics()["idle"] == 0 and pool.expired == 1
        assert breaker.connections == 0  # the circuit breaker's count follows
        await _get(pool, breaker)  # a fresh connection
        assert (pool.opened, len(hbone.tunnels)) == (2, 2)
        pool.close_idle()  # a drain
        assert hbone.tunnels[1].closed and pool.statistics()["idle"] == 0
        nursery.cancel_scope.cancel()
