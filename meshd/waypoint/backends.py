"""Backends: which endpoint of a route's backend gets a request, under what guard (outlier ejection,
circuit breaking), and the upstream call that sends it (upstream.py does the HTTP/1.1 exchange).

The pure choosing lives in meshd/balance.py; here it is applied per (route, backend), with the
endpoint lists derived from the catalog once per catalog change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from meshd.balance import CircuitBreaker, LeastRequest, OutlierDetector, RoundRobin
from meshd.discovery.catalog import Catalog, Endpoint
from meshd.observe.accesslog import FLAG_NO_HEALTHY, RequestRecord, WorkloadLabels
from meshd.observe.otlp import KIND_CLIENT, STATUS_ERROR, AttributeValue
from meshd.observe.tracecontext import trace_header
from meshd.observe.tracing import Tracer
from meshd.plugins.filters import HttpRequest, HttpResponse, LocalResponse, RequestInfo, SendUpstream
from meshd.policy.model import Route
from meshd.waypoint.admission import Tunnel
from meshd.waypoint.http1 import set_trace_headers
from meshd.waypoint.router import Backend, CompiledRoute, RouteChoice
from meshd.waypoint.upstream import EndpointKey, UpstreamPool

log = logging.getLogger("meshd.waypoint")

OVERFLOW_FLAG = "UO"
H2_PROTOCOLS = frozenset({"http2", "grpc"})  # service port protocols spoken as HTTP/2 to the workload


def overflow_response() -> LocalResponse:
    return LocalResponse(503, body=b"upstream overflow\n", flag=OVERFLOW_FLAG)


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
        if len(endpoints) == 1 and self.outlier is None:
            return endpoints[0]  # the common case: nothing to choose (a LeastRequest count still follows)
        by_key = {ep.key: ep for ep in endpoints}
        keys = list(by_key)
        if self.outlier is not None:
            keys = self.outlier.available(keys)
        key = self.balancer.pick(keys)
        return None if key is None else by_key[key]

    def record(self, ep: Endpoint, *, ok: bool) -> None:
        if self.outlier is not None and self.outlier.record(ep.key, ok=ok):
            log.warning("endpoint ejected (outlier detection)", extra={"endpoint": ep.authority})


class Backends:
    """Per (route, backend) state and the endpoints the catalog gives each; `sender` for the pipeline."""

    def __init__(
        self,
        upstreams: UpstreamPool,
        catalog: Callable[[], Catalog],
        trust_domain: Callable[[], str],
        tracer: Tracer | None = None,
    ) -> None:
        self.tracer = tracer or Tracer.disabled()
        self.upstreams = upstreams
        self._catalog = catalog
        self._trust_domain = trust_domain
        self._states: dict[tuple[int, int], tuple[CompiledRoute, BackendState]] = {}
        self._catalog_seen: Catalog | None = None
        self._endpoints: dict[tuple[str, int, tuple[tuple[str, str], ...]], list[Endpoint]] = {}
        self._tcp: dict[str, RoundRobin[EndpointKey]] = {}

    def _current(self) -> Catalog:
        catalog = self._catalog()
        if catalog is not self._catalog_seen:
            self._catalog_seen = catalog
            self._endpoints.clear()
        return catalog

    def endpoints_of(self, backend: Backend, port: int) -> list[Endpoint]:
        """The catalog's endpoints of the backend's service port, in the backend's subset."""
        catalog = self._current()
        key = (backend.service, port, tuple(backend.subset.items()))
        endpoints = self._endpoints.get(key)
        if endpoints is None:
            endpoints = self._endpoints[key] = [
                ep
                for ep in catalog.endpoints(backend.service, port)
                if backend.selects(ep.workload.label_map)
            ]
        return endpoints

    def pinned(self, t: Tunnel) -> list[Endpoint]:
        """A hairpinned client's requests go to the workload it dialled, whatever the route's backends:
        the claim that brought them here vouches for that workload only (see hairpin.py)."""
        return [
            ep
            for ep in self._current().endpoints(t.service.key, t.port.port)
            if (ep.workload.address, ep.target_port) == t.pinned
        ]

    def pick_tcp(self, t: Tunnel) -> Endpoint | None:
        """Round robin over a tcp port's endpoints (L4 passthrough)."""
        endpoints = self.pinned(t) if t.pinned else self._current().endpoints(t.service.key, t.port.port)
        rr = self._tcp.setdefault(f"{t.service.key}:{t.port.port}", RoundRobin())
        by_key = {ep.key: ep for ep in endpoints}
        key = rr.pick(list(by_key))
        return None if key is None else by_key[key]

    def state(self, route: CompiledRoute, backend: Backend) -> BackendState:
        index = route.backends.index(backend)
        key = (id(route), index)
        hit = self._states.get(key)
        if hit is None or hit[0] is not route:
            hit = self._states[key] = (route, BackendState.for_route(route.spec))
        return hit[1]

    def sender(self, t: Tunnel, choice: RouteChoice, rec: RequestRecord, info: RequestInfo) -> SendUpstream:
        backend = choice.backend
        state = self.state(choice.route, backend)
        port = backend.port or t.port.port
        upstreams = self.upstreams
        exchange = upstreams.exchange_h2 if t.port.protocol in H2_PROTOCOLS else upstreams.exchange
        tracer = self.tracer
        attempts = 0

        async def send(request: HttpRequest) -> HttpResponse:
            nonlocal attempts
            attempts += 1
            if rec.trace is None:
                return await send_once(request, t.upstream_headers)
            if not rec.trace.context.sampled:  # not recorded: the next hop still learns that from the flags
                return await send_once(request, (*t.upstream_headers, *trace_header(rec.trace)))
            # One child span per attempt (a retry is a sibling), the upstream's parent.
            span = tracer.child(rec.trace)
            set_trace_headers(request.headers, span)
            attrs: dict[str, AttributeValue] = {
                "component": "proxy",
                "upstream_cluster": rec.upstream_cluster,
                "meshd.attempt": attempts,
            }
            try:
                response = await send_once(request, (*t.upstream_headers, *trace_header(span)))
            except BaseException as exc:
                attrs["upstream.address"] = rec.upstream or ""
                tracer.finish(
                    span, f"upstream {rec.destination_service}", KIND_CLIENT, attrs, STATUS_ERROR, repr(exc)
                )
                raise
            attrs["upstream.address"] = rec.upstream or ""
            attrs["destination.workload"] = rec.destination.workload
            attrs["http.status_code"] = response.status
            failed = response.status >= 500
            tracer.finish(
                span, f"upstream {rec.destination_service}", KIND_CLIENT, attrs, STATUS_ERROR if failed else 0
            )
            return response

        async def send_once(request: HttpRequest, tunnel_headers: Sequence[tuple[str, str]]) -> HttpResponse:
            ep = state.pick(self.pinned(t) if t.pinned else self.endpoints_of(backend, port))
            if ep is None:
                info.flag(FLAG_NO_HEALTHY)
                return LocalResponse(503, body=b"no healthy upstream\n").to_response()
            breaker = state.breaker
            if not breaker.try_start_request():
                return _overflow(info)
            w = ep.workload
            rec.upstream = ep.authority
            td = self._trust_domain()
            rec.destination = WorkloadLabels.of(w, td)
            rec.destination_identity = w.identity(td)
            balancer = state.balancer
            least = balancer if isinstance(balancer, LeastRequest) else None
            if least is not None:
                least.started(ep.key)
            try:
                response = await exchange(ep, request, breaker, tunnel_headers)
            except BaseException as exc:
                if not isinstance(exc, trio.Cancelled):
                    state.record(ep, ok=False)
                raise
            finally:
                breaker.finish_request()
                if least is not None:
                    least.finished(ep.key)
            if response is None:
                return _overflow(info)
            state.record(ep, ok=response.status < 500)
            return response

        return send

    def statistics(self) -> dict[str, Any]:
        return {
            f"{route.name}/{route.backends[i].service}{_subset(route.backends[i])}": state.breaker.statistics()
            for (_, i), (route, state) in self._states.items()
        }


def _overflow(info: RequestInfo) -> HttpResponse:
    local = overflow_response()
    if local.flag:
        info.flag(local.flag)
    return local.to_response()


def _subset(b: Backend) -> str:
    return "" if not b.subset else "{" + ",".join(f"{k}={v}" for k, v in sorted(b.subset.items())) + "}"
