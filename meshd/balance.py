"""Endpoint choice, shared by every role that picks among a service's endpoints: round robin, least
request (power of two choices), outlier ejection (the waypoint's, on consecutive 5xx), connect-failure
back-off (the node's, on failed tunnels) and circuit breaking.

Rule: no I/O and no HTTP. Clocks and random sources are injected; nothing here sleeps, logs or touches
sockets, and a refusal is a False the caller turns into its own answer (the waypoint: 503 UO).
Endpoints are any hashable key, so the caller keeps its own endpoint type.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

E = TypeVar("E", bound=Hashable)


class HasKey(Protocol):
    """An endpoint that names itself (the catalog's Endpoint: node, workload, port)."""

    @property
    def key(self) -> Hashable: ...


K = TypeVar("K", bound=HasKey)


class RoundRobin(Generic[E]):
    """Each pick takes the next endpoint of the list given (the list may change between picks)."""

    def __init__(self) -> None:
        self._next = 0

    def pick(self, endpoints: Sequence[E]) -> E | None:
        if not endpoints:
            return None
        ep = endpoints[self._next % len(endpoints)]
        self._next += 1
        return ep

    def rotation(self, endpoints: Sequence[E]) -> list[E]:
        """All of them, starting with the one `pick` would return (and advancing as a pick does):
        the order to try them in when the first may fail."""
        if not endpoints:
            return []
        start = self._next % len(endpoints)
        self._next = start + 1
        return [*endpoints[start:], *endpoints[:start]]


class LeastRequest(Generic[E]):
    """Power of two choices: of two random endpoints, the one with fewer requests in flight."""

    def __init__(self, rand: random.Random | None = None) -> None:
        self._rand = rand or random.Random()
        self.active: dict[E, int] = {}

    def pick(self, endpoints: Sequence[E]) -> E | None:
        if not endpoints:
            return None
        if len(endpoints) == 1:
            return endpoints[0]
        a, b = self._rand.sample(list(endpoints), 2)
        return a if self.active.get(a, 0) <= self.active.get(b, 0) else b

    def started(self, ep: E) -> None:
        self.active[ep] = self.active.get(ep, 0) + 1

    def finished(self, ep: E) -> None:
        n = self.active.get(ep, 0) - 1
        if n > 0:
            self.active[ep] = n
        else:
            self.active.pop(ep, None)


@dataclass
class _Health:
    consecutive: int = 0
    ejections: int = 0
    ejected_until: float = float("-inf")


class OutlierDetector(Generic[E]):
    """`consecutive_errors` 5xx / connect failures in a row eject an endpoint for base * n (n-th
    ejection), capped at `max_ejection`. A success resets the count; n decays by one per clean
    ejection period. If every endpoint is ejected, `available` returns them all (panic mode)."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        consecutive_errors: int = 5,
        base_ejection: float = 30.0,
        max_ejection: float = 300.0,
    ) -> None:
        self._clock = clock
        self.consecutive_errors = consecutive_errors
        self.base = base_ejection
        self.max = max_ejection
        self._health: dict[E, _Health] = {}

    def record(self, ep: E, *, ok: bool) -> bool:
        """Count one outcome; True if this failure ejected the endpoint."""
        h = self._health.setdefault(ep, _Health())
        now = self._clock()
        if ok:
            h.consecutive = 0
            if h.ejections and now >= h.ejected_until + self.base * h.ejections:
                h.ejections -= 1
            return False
        h.consecutive += 1
        if h.consecutive >= self.consecutive_errors and now >= h.ejected_until:
            h.ejections += 1
            h.ejected_until = now + min(self.base * h.ejections, self.max)
            h.consecutive = 0
            return True
        return False

    def is_ejected(self, ep: E) -> bool:
        h = self._health.get(ep)
        return h is not None and self._clock() < h.ejected_until

    def ejected_until(self, ep: E) -> float | None:
        h = self._health.get(ep)
        return h.ejected_until if h is not None and self._clock() < h.ejected_until else None

    def available(self, endpoints: Sequence[E]) -> list[E]:
        ok = [ep for ep in endpoints if not self.is_ejected(ep)]
        return ok or list(endpoints)


@dataclass
class Ejection:
    until: float = 0.0
    failures: int = 0


class ConnectBackoff(Generic[K]):
    """Connect-failure ejection per endpoint, the node's: every failed tunnel ejects the endpoint for
    base, 2 * base, 4 * base ... up to `max_ejection`; one success forgets it. Ejected endpoints are
    tried last, never skipped (a service whose every endpoint failed still gets its connects tried).
    Unlike OutlierDetector (5xx in a row, linear), a connect failure is a strong signal on its own."""

    def __init__(self, base: float, max_ejection: float) -> None:
        self.base = base
        self.max = max_ejection
        self.ejected: dict[Hashable, Ejection] = {}

    def healthy(self, ep: K, now: float) -> bool:
        e = self.ejected.get(ep.key)
        return e is None or e.until <= now

    def failed(self, ep: K, now: float) -> None:
        e = self.ejected.setdefault(ep.key, Ejection())
        e.failures += 1
        # The exponent is capped: 2 ** 1024 does not fit a float (OverflowError after 1025 failures).
        e.until = now + min(self.base * 2 ** min(e.failures - 1, 32), self.max)

    def succeeded(self, ep: K) -> None:
        self.ejected.pop(ep.key, None)

    def healthy_first(self, endpoints: Sequence[K], now: float) -> list[K]:
        healthy = [e for e in endpoints if self.healthy(e, now)]
        return healthy + [e for e in endpoints if not self.healthy(e, now)]


class CircuitBreaker:
    """Counters for one backend; a refused request gets `overflow_response()` (503, flag UO)."""

    def __init__(self, *, max_pending_requests: int = 1024, max_connections: int = 1024) -> None:
        self.max_pending = max_pending_requests
        self.max_connections = max_connections
        self.pending = 0
        self.connections = 0
        self.overflows = 0

    def try_start_request(self) -> bool:
        if self.pending >= self.max_pending:
            self.overflows += 1
            return False
        self.pending += 1
        return True

    def finish_request(self) -> None:
        self.pending = max(0, self.pending - 1)

    def try_open_connection(self) -> bool:
        if self.connections >= self.max_connections:
            self.overflows += 1
            return False
        self.connections += 1
        return True

    def connection_closed(self) -> None:
        self.connections = max(0, self.connections - 1)

    def statistics(self) -> dict[str, int]:
        return {"pending": self.pending, "connections": self.connections, "overflows": self.overflows}
