"""Waypoint routing: which route a request takes, which backend it goes to, and the pure helpers the
proxy uses to pick and guard endpoints (round robin, least request, outlier ejection, circuit breaker).

Rule 1: no I/O. Clocks and random sources are injected; nothing here sleeps, logs or touches sockets.
Rule 2: nothing is parsed per request. Regexes are compiled, filter settings validated and filter
instances built when the policy loads (`load_routes`); a request only runs matchers.

Theory of operation
  * Routes are tried in policy-folder order (file name, then position in the file); the first whose
    service, hosts and one `match` entry fit the request wins (Istio's VirtualService order).
  * A route's `match` entries are OR'd; the fields of an entry AND'd. No entry = every request.
  * The backend is a weighted choice (`rand() * total`); none = the route's service, every endpoint.
  * A route's chain is `timeout` (route-level, outermost), `retries` (route-level), then `filters`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl

from meshd.config.schema import KeyPath, _Converter
from meshd.config.toml_lines import KeyLines
from meshd.errors import Problem
from meshd.plugins.filters import BoundFilter, FilterChain, HttpRequest, LocalResponse
from meshd.plugins.manager import RegisteredFilter
from meshd.plugins.settings import RetrySettings, TimeoutSettings
from meshd.policy.model import FilterRef, Located, Origin, Route, RouteMatch, StringMatch

E = TypeVar("E", bound=Hashable)
NO_ROUTE_FLAG = "NR"
OVERFLOW_FLAG = "UO"


# ---- loading: filter settings and instances ----------------------------------------------------


def split_filter_settings(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[tuple[int, int], Any]]:
    """Take `route[i].filters[j].settings` out of a parsed policy file (the schema module cannot type
    them: each filter has its own settings class). Returns (the rest, settings by (i, j))."""
    routes = raw.get("route")
    if not isinstance(routes, list):
        return raw, {}
    out = dict(raw)
    out["route"] = new_routes = []
    settings: dict[tuple[int, int], Any] = {}
    for i, route in enumerate(routes):
        if isinstance(route, dict) and isinstance(route.get("filters"), list):
            original = route["filters"]
            route = dict(route)
            route["filters"] = filters = []
            for j, f in enumerate(original):
                if isinstance(f, dict) and "settings" in f:
                    f = dict(f)
                    settings[(i, j)] = f.pop("settings")
                filters.append(f)
        new_routes.append(route)
    return out, settings


@dataclass(frozen=True)
class RouteFile:
    """One policy file's routes, as `load_policy_dir` read them."""

    name: str
    routes: tuple[Route, ...]
    settings: Mapping[tuple[int, int], Any]
    lines: KeyLines
    base_dir: Path


def load_routes(
    files: Sequence[RouteFile], filter_types: Callable[[], Mapping[str, RegisteredFilter]]
) -> tuple[list[Located[Route]], Router, list[Problem]]:
    """Validate every route's filters (unknown names, settings, factories) and build the Router.

    `filter_types` is called only if some route names a filter. Problems carry FILE:LINE.
    """
    problems: list[Problem] = []
    located: list[Located[Route]] = []
    compiled: list[CompiledRoute] = []
    registry: Mapping[str, RegisteredFilter] | None = None
    for f in files:
        for i, route in enumerate(f.routes):
            base: KeyPath = ("route", i)
            refs: list[FilterRef] = []
            bound: list[BoundFilter] = []
            for j, ref in enumerate(route.filters):
                where: KeyPath = (*base, "filters", j)
                if registry is None:
                    registry = filter_types()
                reg = registry.get(ref.name)
                if reg is None:
                    known = ", ".join(sorted(registry)) or "none"
                    problems.append(
                        Problem(
                            f.name,
                            f.lines.line_of(where),
                            f"unknown filter {ref.name!r}",
                            f"known filters: {known}",
                        )
                    )
                    continue
                raw = f.settings.get((i, j))
                settings, issues = _settings(reg, raw, (*where, "settings"), f.base_dir)
                problems += [Problem(f.name, f.lines.line_of(p), m, h) for p, m, h in issues]
                if issues:
                    continue
                try:
                    instance = reg.type.factory(settings)
                except (ValueError, TypeError) as exc:
                    problems.append(
                        Problem(
                            f.name,
                            f.lines.line_of(where),
                            f"filter {ref.name!r}: {exc}",
                            f"plugin {reg.plugin}",
                        )
                    )
                    continue
                refs.append(replace(ref, settings=settings))
                bound.append(BoundFilter(ref.name, reg.plugin, instance))
            origin = Origin(f.name, f.lines.line_of(base))
            spec = replace(route, filters=tuple(refs))
            located.append(Located(spec, origin))
            compiled.append(CompiledRoute.build(spec, origin, bound))
    return located, Router(compiled), problems


def _settings(
    reg: RegisteredFilter, raw: Any, path: KeyPath, base_dir: Path
) -> tuple[Any, list[tuple[KeyPath, str, str | None]]]:
    cls = reg.type.settings
    if cls is None:
        if raw:
            return None, [(path, f"filter {reg.type.name!r} takes no settings", "remove settings")]
        return None, []
    if raw is None:
        raw = {}
    conv = _Converter(base_dir)
    if not isinstance(raw, dict):
        return None, [
            (path, f"settings of filter {reg.type.name!r} must be a table", "write settings = { ... }")
        ]
    obj = conv.table(cls, raw, path)
    issues = [(i.path, f"filter {reg.type.name!r}: {i.message}", i.hint) for i in conv.issues]
    return obj, issues


# ---- matching -----------------------------------------------------------------------------------


def _string_matcher(m: StringMatch) -> Callable[[str | None], bool]:
    if m.exact is not None:
        exact = m.exact
        return lambda v: v == exact
    if m.prefix is not None:
        prefix = m.prefix
        return lambda v: v is not None and v.startswith(prefix)
    pattern = re.compile(m.regex or "")
    return lambda v: v is not None and pattern.fullmatch(v) is not None


@dataclass(frozen=True)
class _Match:
    path: Callable[[str | None], bool] | None
    methods: frozenset[str]
    headers: tuple[tuple[str, Callable[[str | None], bool]], ...]
    query: tuple[tuple[str, Callable[[str | None], bool]], ...]

    @classmethod
    def build(cls, m: RouteMatch) -> _Match:
        return cls(
            _string_matcher(m.path) if m.path is not None else None,
            frozenset(m.methods),
            tuple((k.lower(), _string_matcher(v)) for k, v in m.headers.items()),
            tuple((k, _string_matcher(v)) for k, v in m.query.items()),
        )

    def __call__(self, request: HttpRequest, query: Mapping[str, str]) -> bool:
        if self.methods and request.method not in self.methods:
            return False
        if self.path is not None and not self.path(request.path_only):
            return False
        if not all(test(request.headers.get(name)) for name, test in self.headers):
            return False
        return all(test(query.get(name)) for name, test in self.query)


def _strip_port(authority: str) -> str:
    if authority.startswith("["):  # [v6]:port
        end = authority.find("]")
        return authority[: end + 1] if end > 0 else authority
    host, sep, port = authority.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else authority


def _host_matcher(patterns: tuple[str, ...]) -> Callable[[str], bool] | None:
    if not patterns:
        return None
    exact = frozenset(p.lower() for p in patterns if "*" not in p)
    suffixes = tuple(p[1:].lower() for p in patterns if p.startswith("*") and p != "*")
    prefixes = tuple(p[:-1].lower() for p in patterns if p.endswith("*") and p != "*")
    anything = "*" in patterns

    def match(authority: str) -> bool:
        a = authority.lower()
        return anything or any(
            h in exact
            or (bool(suffixes) and h.endswith(suffixes))
            or (bool(prefixes) and h.startswith(prefixes))
            for h in (a, _strip_port(a))
        )

    return match


@dataclass(frozen=True)
class Backend:
    """Where a request goes: a service, optionally a subset of its endpoints by workload labels."""

    service: str
    subset: Mapping[str, str] = field(default_factory=dict)
    weight: int = 1
    port: int | None = None

    def selects(self, labels: Mapping[str, str]) -> bool:
        """Does an endpoint with these workload labels belong to this backend's subset?"""
        return all(labels.get(k) == v for k, v in self.subset.items())


@dataclass(frozen=True)
class CompiledRoute:
    spec: Route
    origin: Origin
    chain: FilterChain
    backends: tuple[Backend, ...]
    _service: str | None
    _hosts: Callable[[str], bool] | None
    _matches: tuple[_Match, ...]
    _total_weight: int

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def build(cls, spec: Route, origin: Origin, filters: Sequence[BoundFilter]) -> CompiledRoute:
        from meshd.plugins.retries import RetryFilter
        from meshd.plugins.timeout import TimeoutFilter

        chain: list[BoundFilter] = []
        if spec.timeout is not None:
            chain.append(
                BoundFilter("timeout", "meshd.timeout", TimeoutFilter(TimeoutSettings(spec.timeout)))
            )
        if spec.retries is not None:
            chain.append(BoundFilter("retries", "meshd.retries", RetryFilter(spec.retries)))
        chain += filters
        limits = [
            r.buffer_limit
            for r in (spec.retries, *(f.settings for f in spec.filters))
            if isinstance(r, RetrySettings)
        ]
        backends = tuple(
            Backend(b.service or spec.service or "", dict(b.subset), b.weight, b.port) for b in spec.backends
        ) or (Backend(spec.service or "", {}, 1),)
        return cls(
            spec=spec,
            origin=origin,
            chain=FilterChain(spec.name, chain, buffer_limit=max(limits, default=64 * 1024)),
            backends=backends,
            _service=spec.service,
            _hosts=_host_matcher(spec.hosts),
            _matches=tuple(_Match.build(m) for m in spec.match),
            _total_weight=sum(b.weight for b in backends),
        )

    def matches(self, request: HttpRequest, service: str | None, query: Mapping[str, str]) -> bool:
        if self._service is not None and service is not None and service != self._service:
            return False
        if self._hosts is not None and not self._hosts(request.authority):
            return False
        return not self._matches or any(m(request, query) for m in self._matches)

    def pick_backend(self, rand: Callable[[], float]) -> Backend:
        if len(self.backends) == 1:
            return self.backends[0]
        point = rand() * self._total_weight
        for b in self.backends:
            point -= b.weight
            if point < 0 and b.weight:
                return b
        return next(b for b in reversed(self.backends) if b.weight)  # rand() == 1.0 or rounding


@dataclass(frozen=True)
class RouteChoice:
    route: CompiledRoute
    backend: Backend


def _query(path: str) -> dict[str, str]:
    _, sep, q = path.partition("?")
    if not sep:
        return {}
    out: dict[str, str] = {}
    for k, v in parse_qsl(q.split("#", 1)[0], keep_blank_values=True):
        out.setdefault(k, v)
    return out


class Router:
    """The routes of a policy set, compiled. Immutable; a policy reload builds a new one."""

    __slots__ = ("_rand", "routes")

    def __init__(self, routes: Sequence[CompiledRoute], *, rand: Callable[[], float] = random.random) -> None:
        self.routes = tuple(routes)
        self._rand = rand

    def with_random(self, rand: Callable[[], float]) -> Router:
        return Router(self.routes, rand=rand)

    def __len__(self) -> int:
        return len(self.routes)

    def route(self, name: str) -> CompiledRoute | None:
        return next((r for r in self.routes if r.name == name), None)

    def match(self, request: HttpRequest, service: str | None = None) -> RouteChoice | None:
        """The first route the request fits and a weighted choice of its backends; None: no route (404 NR)."""
        query = _query(request.path) if "?" in request.path else {}
        for route in self.routes:
            if route.matches(request, service, query):
                return RouteChoice(route, route.pick_backend(self._rand))
        return None


def no_route_response() -> LocalResponse:
    return LocalResponse(404, body=b"no route\n", flag=NO_ROUTE_FLAG)


# ---- load balancing, outlier ejection, circuit breaking (pure) ----------------------------------


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

    @staticmethod
    def overflow_response() -> LocalResponse:
        return LocalResponse(503, body=b"upstream overflow\n", flag=OVERFLOW_FLAG)


__all__ = [
    "Backend",
    "CircuitBreaker",
    "CompiledRoute",
    "LeastRequest",
    "OutlierDetector",
    "RoundRobin",
    "RouteChoice",
    "RouteFile",
    "Router",
    "load_routes",
    "no_route_response",
    "split_filter_settings",
]
