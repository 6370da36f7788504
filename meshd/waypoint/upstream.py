"""The waypoint's upstream side: per-backend load balancing, outlier ejection and circuit breaking,
and HTTP/1.1 exchanges over pooled HBONE tunnels to the destination nodes (kept alive and reused).

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

import h11
import trio

from meshd.discovery.catalog import Endpoint
from meshd.hbone.errors import HboneConnectError, PeerIdentityError, TunnelRefused
from meshd.hbone.pool import HbonePool
from meshd.identity.spiffe import SpiffeId
from meshd.plugins.filters import HttpRequest, HttpResponse, UpstreamError
from meshd.policy.model import Route
from meshd.waypoint.http1 import H11Stream, forwardable, headers_from_h11
from meshd.waypoint.router import CircuitBreaker, LeastRequest, OutlierDetector, RoundRobin

log = logging.getLogger("meshd.waypoint")

# Idle upstream connections kept per endpoint: above the concurrency a busy client drives (wrk -c50 churned
# ~11% of requests into new tunnels at 32), still a bound on what an idle waypoint holds.
MAX_IDLE_PER_ENDPOINT = 128
# Seconds an upstream tunnel may stay idle before it is closed: below the usual keep-alive timeouts of
# HTTP servers behind the destination node (nginx 75 s, Node.js 5 s aside), so that the waypoint rarely
# reuses a connection the backend is closing, and an idle waypoint does not pin backend connections.
IDLE_TIMEOUT = 60.0
EndpointKey = tuple[str, str, int]


@dataclass
class BackendState:
    """Load balancer, outlier detector and circuit breaker of one (route, backend)."""

    balancer: RoundRobin[EndpointKey] | LeastRequest[EndpointKey]
    breaker: CircuitBreaker
    outlier: OutlierDetector[EndpointKey] | None = None

    @classmethod
    def for_route(cls, spec: Route) -> BackendState:
        balancer: RoundRobin[EndpointKey] | LeastRequest[EndpointKey] = (
            LeastRequest() if spec.load_balancer == "least_request" else RoundRobin()
        )
        cb = spec.circuit_breaker
        breaker = (
            CircuitBreaker(max_pending_requests=cb.max_pending_requests, max_connections=cb.max_connections)
            if cb is not None
            else CircuitBreaker()
        )
        od = spec.outlier_detection
        outlier = (
            OutlierDetector[EndpointKey](
                trio.current_time,
                consecutive_errors=od.consecutive_errors,
                base_ejection=od.base_ejection_time.total_seconds(),
                max_ejection=od.max_ejection_time.total_seconds(),
            )
            if od is not None
            else None
        )
        return cls(balancer, breaker, outlier)

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint | None:
        by_key = {ep.key: ep for ep in endpoints}
        keys = list(by_key)
        if self.outlier is not None:
            keys = self.outlier.available(keys)
        key = self.balancer.pick(keys)
        return None if key is None else by_key[key]

    def record(self, ep: Endpoint, *, ok: bool) -> None:
        if self.outlier is not None and self.outlier.record(ep.key, ok=ok):
            log.warning("endpoint ejected (outlier detection)", extra={"endpoint": ep.authority})


@dataclass
class UpstreamConnection:
    """One HTTP/1.1 connection to an endpoint, inside one HBONE tunnel."""

    endpoint: Endpoint
    http: H11Stream
    on_close: Callable[[], None]
    closed: bool = False
    idle_since: float = 0.0  # trio.current_time() when it went back to the idle list

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            close = getattr(self.http.stream, "close_nowait", None)
            if close is not None:
                close()
            self.on_close()


class UpstreamBodyError(Exception):
    """The upstream connection failed while the response body was streaming."""


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
                    event = await self.upstream.http.next_event()
                except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
                    raise UpstreamBodyError(f"upstream failed mid-body: {exc}") from exc
                if isinstance(event, h11.Data):
                    self.received += len(event.data)
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self.done = True
                    self.release(self.upstream)
                    return
                else:
                    raise UpstreamBodyError(f"upstream closed mid-body ({type(event).__name__})")
        finally:
            if not self.done:
                self.upstream.close()

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.upstream.close()
        await trio.lowlevel.checkpoint()


class UpstreamPool:
    """HTTP/1.1-in-HBONE connections to endpoints, opened as the waypoint's identity."""

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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close idle connections once they have been idle for `idle_timeout`; runs until cancelled."""
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

    def close_idle(self) -> None:
        """Close every idle connection (drain)."""
        idle, self.idle = self.idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def statistics(self) -> dict[str, int]:
        return {
            "opened": self.opened,
            "reused": self.reused,
            "idle": sum(len(v) for v in self.idle.values()),
            "expired": self.expired,
        }

    def _take_idle(self, ep: Endpoint) -> UpstreamConnection | None:
        idle = self.idle.get(ep.key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def _release(self, conn: UpstreamConnection) -> None:
        http = conn.http
        if conn.closed or not http.reusable:
            conn.close()
            return
        try:
            http.conn.start_next_cycle()
        except h11.LocalProtocolError:
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
        return UpstreamConnection(ep, H11Stream(tunnel, h11.CLIENT), breaker.connection_closed)

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
        http = conn.http
        headers = forwardable(request.headers)
        names = {k for k, _ in request.headers.items()}  # lower case already (Headers)
        if "host" not in names:
            headers.insert(0, ("host", request.authority))
        if "transfer-encoding" in names and "content-length" not in names:
            headers.append(("transfer-encoding", "chunked"))  # h11 frames it; forwardable() dropped it
        await _send(http, h11.Request(method=request.method, target=request.path, headers=headers))
        async for chunk in request.body.chunks():
            await _send(http, h11.Data(data=chunk))
        await _send(http, h11.EndOfMessage())
        while True:
            try:
                event = await http.next_event()
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
                raise UpstreamError("reset", f"upstream reset before the response: {exc}") from exc
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                break
            raise UpstreamError("reset", f"upstream closed before the response ({type(event).__name__})")
        body = UpstreamBody(conn, self._release)
        return HttpResponse(event.status_code, headers_from_h11(event.headers), body)


async def _send(http: H11Stream, event: Any) -> None:
    try:
        await http.send(event)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise UpstreamError("reset", f"upstream went away while sending the request: {exc}") from exc
