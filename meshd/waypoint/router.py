"""Waypoint routing: which route a request takes and which backend it goes to.

Rule 1: no I/O. The random source is injected; nothing here sleeps, logs or touches sockets.
Rule 2: nothing is parsed per request. `compile_router` runs once per policy change (the waypoint
keeps the Router of the PolicySet it last saw): regexes compiled, chains assembled around the filter
instances the policy load built; a request only runs matchers.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from meshd.plugins.filters import BoundFilter, FilterChain, HttpRequest, LocalResponse
from meshd.plugins.retries import RetryFilter
from meshd.plugins.settings import RetrySettings, TimeoutSettings
from meshd.plugins.timeout import TimeoutFilter
from meshd.policy.evaluate import PolicySet
from meshd.policy.model import Origin, Route, RouteMatch, StringMatch

NO_ROUTE_FLAG = "NR"


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
    """The routes of a policy set, compiled. Immutable but for caches derived from the routes; a policy
    reload builds a new one."""

    __slots__ = ("_defaults", "_rand", "_routed", "routes")

    def __init__(self, routes: Sequence[CompiledRoute], *, rand: Callable[[], float] = random.random) -> None:
        self.routes = tuple(routes)
        self._rand = rand
        self._routed: dict[str, bool] = {}  # service -> does any route name it (or no service)?
        self._defaults: dict[str, CompiledRoute] = {}

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

    def choose(self, request: HttpRequest, service: str) -> RouteChoice | None:
        """What the waypoint does with a request to `service`: a service no route names takes its default
        route (every endpoint, no filters); otherwise `match`."""
        routed = self._routed.get(service)
        if routed is None:
            routed = self._routed[service] = any(r.spec.service in (None, service) for r in self.routes)
        if not routed:
            route = self._defaults.get(service)
            if route is None:
                route = self._defaults[service] = default_route(service)
            return RouteChoice(route, route.backends[0])
        return self.match(request, service)


def no_route_response() -> LocalResponse:
    return LocalResponse(404, body=b"no route\n", flag=NO_ROUTE_FLAG)


def compile_router(policy: PolicySet, *, rand: Callable[[], float] = random.random) -> Router:
    """The policy's routes, compiled (once per PolicySet: the waypoint caches it by identity)."""
    return Router(
        [CompiledRoute.build(r.located.value, r.located.origin, r.filters) for r in policy.loaded_routes],
        rand=rand,
    )


def default_route(service: str) -> CompiledRoute:
    """The route of a service no route names: every request, to the service, no filters."""
    return CompiledRoute.build(
        Route(name=f"default.{service}", service=service), Origin("<default>", None), []
    )


__all__ = [
    "Backend",
    "CompiledRoute",
    "RouteChoice",
    "Router",
    "compile_router",
    "default_route",
    "no_route_response",
]
