"""The waypoint's upstream side: HTTP/1.1 exchanges over pooled HBONE tunnels to the destination nodes
(kept alive and reused). Endpoint choice and its guards are backends.py's.

One tunnel carries one HTTP/1.1 connection to one endpoint (workload ip:port). After a response
that ends cleanly on a keep-alive connection, the tunnel goes back to an idle list per endpoint and
the next request to that endpoint reuses it (the most recently used first). A tunnel idle for
`IDLE_TIMEOUT` is closed (`run()` sweeps; a drain closes every idle one at once). A reused tunnel that turns out to be closed before any
response byte is replaced by a fresh one once (when the request body can be replayed).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from meshd.balance import CircuitBreaker
from meshd.discovery.catalog import Endpoint
from meshd.hbone.errors import HboneConnectError, PeerIdentityError, TunnelRefused
from meshd.hbone.pool import HbonePool
from meshd.identity.spiffe import SpiffeId
from meshd.plugins.filters import Headers, HttpRequest, HttpResponse, UpstreamBodyError, UpstreamError
from meshd.waypoint.http1 import (
    CHUNK,
    END,
    LAST_CHUNK,
    BadMessage,
    Event,
    Head,
    ResponseParser,
    chunk,
    forwardable,
    request_head,
)
from meshd.waypoint.upstream_h2 import H2Upstream

log = logging.getLogger("meshd.waypoint")

# Idle upstream connections kept per endpoint: above the concurrency a busy client drives (wrk -c50 churned
# ~11% of requests into new tunnels at 32), still a bound on what an idle waypoint holds.
MAX_IDLE_PER_ENDPOINT = 128
# Seconds an upstream tunnel may stay idle before it is closed: below the usual keep-alive timeouts of
# HTTP servers behind the destination node (nginx 75 s, Node.js 5 s aside), so that the waypoint rarely
# reuses a connection the backend is closing, and an idle waypoint does not pin backend connections.
IDLE_TIMEOUT = 60.0
EndpointKey = tuple[str, str, int]


@dataclass(eq=False)
class UpstreamConnection:
    """One HTTP/1.1 connection to an endpoint, inside one HBONE tunnel."""

    endpoint: Endpoint
    stream: Any  # the tunnel (trio.abc.Stream with close_nowait)
    on_close: Callable[[], None]
    parser: ResponseParser = field(default_factory=ResponseParser)
    events: deque[Event] = field(default_factory=deque)
    closed: bool = False
    reusable: bool = False  # the last response ended cleanly on a keep-alive connection
    idle_since: float = 0.0  # trio.current_time() when it went back to the idle list

    async def next_event(self) -> Event | None:
        """The next response event; None: the connection ended (raises BadMessage, trio errors)."""
        events = self.events
        while not events:
            data = await self.stream.receive_some(CHUNK)
            if not data:
                return END if self.parser.eof() else None
            events.extend(self.parser.feed(bytes(data)))
        return events.popleft()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            close = getattr(self.stream, "close_nowait", None)
            if close is not None:
                close()
            self.on_close()


@dataclass
class UpstreamBody:
    """The response body, read from the upstream connection; the connection is returned to the idle
    list after the last byte, or closed if the body is abandoned (`aclose`) or fails."""

    upstream: UpstreamConnection
    release: Callable[[UpstreamConnection], None]
    done: bool = False
    received: int = field(default=0)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        if self.done:
            return
        try:
            while True:
                try:
                    event = await self.upstream.next_event()
                except (trio.BrokenResourceError, trio.ClosedResourceError, BadMessage) as exc:
                    raise UpstreamBodyError(f"upstream failed mid-body: {exc}") from exc
                if type(event) is bytes:
                    self.received += len(event)
                    yield event
                elif event is END:
                    self.done = True
                    self.release(self.upstream)
                    return
                else:
                    raise UpstreamBodyError("upstream closed mid-body")
        finally:
            if not self.done:
                self.upstream.close()

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.upstream.close()
        await trio.lowlevel.checkpoint()


class UpstreamPool:
    """Connections to endpoints inside HBONE tunnels, opened as the waypoint's identity: HTTP/1.1 (one
    request at a time each, kept alive) or HTTP/2 (upstream_h2.py: many streams each)."""

    def __init__(
        self, pool: HbonePool, identity: Callable[[], SpiffeId], *, idle_timeout: float = IDLE_TIMEOUT
    ) -> None:
        self.pool = pool
        self.identity = identity
        self.idle_timeout = idle_timeout
        # Per endpoint, oldest first: reuse takes from the right, expiry sweeps from the left.
        self.idle: dict[EndpointKey, deque[UpstreamConnection]] = {}
        self.opened = 0
        self.reused = 0
        self.expired = 0
        self._idle_added = trio.Event()
        self.h2: dict[EndpointKey, list[H2Upstream]] = {}
        self._nursery: trio.Nursery | None = None  # where HTTP/2 connections run

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the HTTP/2 connections; close idle connections once they have been idle for
        `idle_timeout`. Runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                deadline = self._next_expiry()
                if deadline is None:
                    self._idle_added = trio.Event()
                    await self._idle_added.wait()
                    continue
                await trio.sleep_until(deadline)
                self.sweep(trio.current_time())

    def _next_expiry(self) -> float | None:
        firsts = [idle[0].idle_since for idle in self.idle.values() if idle]
        firsts += [c.idle_since for conns in self.h2.values() for c in conns if not c.streams]
        return min(firsts) + self.idle_timeout if firsts else None

    def sweep(self, now: float) -> None:
        """Close the connections idle since `now - idle_timeout` or longer."""
        limit = now - self.idle_timeout
        for key, idle in list(self.idle.items()):
            while idle and idle[0].idle_since <= limit:
                idle.popleft().close()
                self.expired += 1
            if not idle:
                del self.idle[key]
        for h2conns in self.h2.values():
            for c in list(h2conns):
                if not c.streams and c.idle_since <= limit:
                    c.close()
                    self.expired += 1

    def close_idle(self) -> None:
        """Close every idle connection (drain); HTTP/2 ones close once their streams end."""
        idle, self.idle = self.idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
        for h2conns in self.h2.values():
            for c in list(h2conns):
                c.goaway = True  # no new streams here
                if not c.streams:
                    c.close()

    def statistics(self) -> dict[str, int]:
        return {
            "opened": self.opened,
            "reused": self.reused,
            "idle": sum(len(v) for v in self.idle.values()),
            "expired": self.expired,
            "h2_connections": sum(len(v) for v in self.h2.values()),
        }

    async def exchange_h2(
        self,
        ep: Endpoint,
        request: HttpRequest,
        breaker: CircuitBreaker,
        tunnel_headers: Sequence[tuple[str, str]],
    ) -> HttpResponse | None:
        """As `exchange`, over HTTP/2: a stream on a shared connection to the endpoint."""
        conns = self.h2.get(ep.key)
        conn = next((c for c in conns if c.available), None) if conns else None
        if conn is None:
            if not breaker.try_open_connection():
                return None
            tunnel = await self._tunnel(ep, breaker, tunnel_headers)
            conns = self.h2.setdefault(ep.key, [])

            def closed() -> None:
                breaker.connection_closed()
                if conn in conns:
                    conns.remove(conn)
                if not conns and self.h2.get(ep.key) is conns:
                    del self.h2[ep.key]

            conn = H2Upstream(ep, tunnel, closed, self._idle_added.set)
            conns.append(conn)
            assert self._nursery is not None, "UpstreamPool.run() is not running"
            await self._nursery.start(conn.run)
        else:
            self.reused += 1
        return await conn.exchange(request)

    def _take_idle(self, ep: Endpoint) -> UpstreamConnection | None:
        idle = self.idle.get(ep.key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def _release(self, conn: UpstreamConnection) -> None:
        if conn.closed or not conn.reusable or conn.events:
            conn.close()
            return
        idle = self.idle.get(conn.endpoint.key)
        if idle is None:
            idle = self.idle[conn.endpoint.key] = deque()
        if len(idle) >= MAX_IDLE_PER_ENDPOINT:
            conn.close()
            return
        conn.idle_since = trio.current_time()
        idle.append(conn)
        self._idle_added.set()

    async def _connect(
        self, ep: Endpoint, breaker: CircuitBreaker, headers: Sequence[tuple[str, str]]
    ) -> UpstreamConnection:
        return UpstreamConnection(ep, await self._tunnel(ep, breaker, headers), breaker.connection_closed)

    async def _tunnel(self, ep: Endpoint, breaker: CircuitBreaker, headers: Sequence[tuple[str, str]]) -> Any:
        try:
            tunnel = await self.pool.open_tunnel(
                self.identity(), ep.identity, (ep.dial.host, ep.dial.port), ep.authority, headers=headers
            )
        except (TunnelRefused, HboneConnectError, PeerIdentityError) as exc:
            breaker.connection_closed()
            log.warning("upstream tunnel failed", extra={"endpoint": ep.authority, "error": str(exc)})
            raise UpstreamError("connect-failure", str(exc)) from exc
        except BaseException:
            breaker.connection_closed()
            raise
        self.opened += 1
        return tunnel

    async def exchange(
        self,
        ep: Endpoint,
        request: HttpRequest,
        breaker: CircuitBreaker,
        tunnel_headers: Sequence[tuple[str, str]] = (),
    ) -> HttpResponse | None:
        """Send the request to the endpoint and return once the response headers arrived (the body
        streams). None: the circuit breaker refused a new connection. Raises UpstreamError."""
        for attempt in range(2):
            conn = self._take_idle(ep)
            reused = conn is not None
            if conn is None:
                if not breaker.try_open_connection():
                    return None
                conn = await self._connect(ep, breaker, tunnel_headers)
            else:
                self.reused += 1
            try:
                return await self._exchange(conn, request)
            except UpstreamError:
                conn.close()
                if reused and attempt == 0 and request.body.replayable:
                    continue  # a stale keep-alive tunnel: once more on a fresh one
                raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _exchange(self, conn: UpstreamConnection, request: HttpRequest) -> HttpResponse:
        conn.reusable = False
        headers = forwardable(request.headers)
        names = {k for k, _ in request.headers.items()}  # lower case already (Headers)
        if "host" not in names:
            headers.insert(0, ("host", request.authority))
        # A body of unknown length (chunked from the client, or an HTTP/2 stream without length) is
        # chunked again on this side; forwardable() dropped the client's transfer-encoding.
        framed = "transfer-encoding" in names and "content-length" not in names
        if framed:
            headers.append(("transfer-encoding", "chunked"))
        if request.method == "HEAD":
            conn.parser.expect_head()
        try:
            head = request_head(request.method, request.path, headers)
        except ValueError as exc:
            raise UpstreamError("reset", f"request not writable as HTTP/1.1: {exc}") from exc
        send_all = conn.stream.send_all
        pending = head  # the head goes out with the first body chunk: one write, one frame
        async for data in request.body.chunks():
            await _send(send_all, pending + (chunk(data) if framed else data))
            pending = b""
        await _send(send_all, pending + LAST_CHUNK if framed else pending)
        informational = False
        while True:
            try:
                event = await conn.next_event()
            except (trio.BrokenResourceError, trio.ClosedResourceError, BadMessage) as exc:
                raise UpstreamError("reset", f"upstream reset before the response: {exc}") from exc
            if isinstance(event, Head):
                if event.status >= 200:
                    break
                informational = True  # 1xx: skipped, with the END that closes it
                continue
            if event is END and informational:
                informational = False
                continue
            raise UpstreamError("reset", "upstream closed before the response")
        conn.reusable = event.keep_alive
        body = UpstreamBody(conn, self._release)
        return HttpResponse(event.status, Headers.adopt(event.headers), body)


async def _send(send_all: Callable[[bytes], Any], data: bytes) -> None:
    if not data:
        return
    try:
        await send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise UpstreamError("reset", f"upstream went away while sending the request: {exc}") from exc
