"""`meshd policy explain` for a waypoint: an HTTP request decided as the waypoint decides it (the same
authorization and route choice as pipeline.py, over the same catalog and policy), with why.

Pure over (catalog, policy, the waypoint's name): the admin API asks it with a running waypoint's merged
catalog, the CLI with a config's own. Nothing is sent anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshd.discovery.catalog import Catalog
from meshd.discovery.vip import VipIndex
from meshd.identity.spiffe import InvalidSpiffeId, SpiffeId
from meshd.plugins.filters import Headers, HttpRequest
from meshd.policy.evaluate import PolicySet
from meshd.policy.explain import explain, render
from meshd.policy.query import DEFAULT_SOURCE_IP, ExplainQuery, NotServedHere, QueryError
from meshd.waypoint.admission import Tunnel
from meshd.waypoint.pipeline import request_attrs, service_workloads
from meshd.waypoint.router import RouteChoice, Router, compile_router


@dataclass(frozen=True)
class RouteView:
    name: str
    source: str  # FILE:LINE, or <default>
    filters: tuple[str, ...]
    backends: tuple[str, ...]  # service{subset} weight%

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "filters": list(self.filters),
            "backends": list(self.backends),
        }

    def render(self) -> str:
        filters = ", ".join(self.filters) or "none"
        return f"route {self.name} [{self.source}]: filters {filters}; backends {', '.join(self.backends)}"


def _route_view(choice: RouteChoice) -> RouteView:
    route = choice.route
    total = sum(b.weight for b in route.backends) or 1
    backends = tuple(
        b.service
        + ("{" + ",".join(f"{k}={v}" for k, v in sorted(b.subset.items())) + "}" if b.subset else "")
        + (f":{b.port}" if b.port else "")
        + f" {round(100 * b.weight / total)}%"
        for b in route.backends
    )
    return RouteView(route.name, str(route.origin), tuple(f.name for f in route.chain.filters), backends)


def explain_request(
    catalog: Catalog,
    policy: PolicySet,
    me: str,
    vips: VipIndex,
    q: ExplainQuery,
    router: Router | None = None,
) -> list[dict[str, Any]]:
    """One result per workload of the service (the request must be allowed for each), each with the
    route the request would take. Raises QueryError / NotServedHere."""
    target, sep, port_text = q.to.rpartition(":")
    if not sep or not port_text.isdigit():
        raise QueryError(f"{q.to!r} is not SERVICE:PORT (e.g. reviews.default:9080)", "to")
    name, _, ns = target.partition(".")
    key = f"{name}.{ns or 'default'}"
    svc = catalog.services.get(key)
    if svc is None:
        raise NotServedHere(
            f"{key} is not in this waypoint's catalog (a waypoint learns services from its peers: "
            "ask the running waypoint with --admin)",
            "to",
        )
    if svc.waypoint != me:
        where = f"waypoint {svc.waypoint!r}" if svc.waypoint else "no waypoint (its nodes decide)"
        raise NotServedHere(f"{key} is bound to {where}, not to {me!r}", "to")
    sp = svc.port(int(port_text))
    if sp is None:
        raise QueryError(f"{key} has no port {port_text}", "to")
    try:
        source = SpiffeId.parse_principal(q.source)
    except InvalidSpiffeId as exc:
        raise QueryError(f"a waypoint serves mesh clients only: {exc}", "from") from None
    vip = vips.table(catalog.services)[0].vip(key) or ""
    source_ip = q.source_ip or DEFAULT_SOURCE_IP
    t = Tunnel(source, source_ip, f"{source_ip}:0", svc, sp, vip)
    request = HttpRequest(
        (q.method or "GET").upper(), q.path or "/", q.host or t.default_authority, Headers(q.headers.items())
    )
    workloads = service_workloads(catalog, key)
    router = router if router is not None else compile_router(policy)
    choice = router.choose(request, key)
    route = _route_view(choice) if choice is not None else None
    route_text = (
        route.render() if route else "no route matches: 404 NR (unless a meshd_no_route hook answers)"
    )
    out = []
    for w, attrs in zip(workloads, request_attrs(t, request, workloads), strict=True):
        ex = explain(policy, attrs)
        out.append(
            {
                "workload": f"{w.name}.{w.namespace}" if w else f"(no workload of {key})",
                "address": f"{w.address}:{sp.target_port}" if w else f"{vip}:{sp.port}",
                "text": render(ex) + ("\n" + route_text if ex.decision.allowed else ""),
                "route": route.to_json() if route else None,
                "binding": catalog.bindings.get(key),  # which binding sent the service here
                **ex.to_json(),
            }
        )
    return out
