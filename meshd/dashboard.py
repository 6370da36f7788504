"""The dashboard on the admin port: one page (no build step: the files in web/ are served as they
are) and the JSON it reads under /api/.

- `/api/node`: this daemon's report: role, certificates and expiry, peers and how they were found,
  policy files in force, routes (a waypoint), the last reload and a refused one, and its traffic edges
  with rates over the last minute (graph.EdgeWindow).
- `/api/mesh`: every node's report, gathered from the peers in the catalog over HBONE (mTLS, the
  channel the catalog travels on; graph.REPORT_PATH, served to meshd node identities only), merged
  into the graph (graph.mesh_graph), plus this daemon's merged catalog. Peers are asked at once, each
  bounded by PEER_TIMEOUT; one that does not answer is listed in `errors`, the rest still show. The
  answer is kept CACHE_SECONDS, so several open pages cost one round of fetches.
- `/api/explain`: `policy explain`, asked of the node that serves the destination (`node=`), or here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlencode

import trio

from meshd import __version__
from meshd.config.model import Config
from meshd.dataplane.state import NodeState
from meshd.discovery.catalog import CatalogError, metrics_target
from meshd.hbone.errors import HboneError
from meshd.identity.manager import IdentityManager
from meshd.node.proxy import NodeProxy
from meshd.observe.graph import EXPLAIN_PATH, REPORT_PATH, EdgeWindow, edge_counters, mesh_graph
from meshd.observe.http import Request, Response
from meshd.observe.metrics import Metrics
from meshd.observe.tracing import Tracer
from meshd.policy.query import ExplainQuery, NotServedHere, QueryError
from meshd.readiness import Readiness
from meshd.reload import ReloadOutcome
from meshd.units import Address

log = logging.getLogger("meshd.dashboard")

STATIC = Path(__file__).with_name("observe") / "web"  # the page and its files, served as they are
PEER_TIMEOUT = 3.0
CACHE_SECONDS = 2.0
SAMPLE_INTERVAL = 5.0  # seconds between counter samples; rates span the last minute of them
FILES = {
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/vendor/cytoscape.min.js": ("vendor/cytoscape.min.js", "text/javascript; charset=utf-8"),
    "/vendor/cytoscape.LICENSE": ("vendor/cytoscape.LICENSE", "text/plain; charset=utf-8"),
}


def _json(status: int, data: Any) -> Response:
    return Response(status, json.dumps(data, default=str).encode(), "application/json")


class DashboardSource(Protocol):
    """What the dashboard reads of its daemon (meshd.daemon.Daemon answers to it)."""

    config: Config
    metrics: Metrics
    readiness: Readiness
    started_at: float
    identities: IdentityManager
    tracer: Tracer
    state: NodeState
    node: NodeProxy
    bound: dict[str, str]
    last_reload: ReloadOutcome | None
    last_refused_reload: ReloadOutcome | None

    @property
    def inflight(self) -> int: ...

    def explain(self, query: ExplainQuery) -> list[dict[str, Any]]: ...


class Dashboard:
    """The daemon's side of the dashboard: its counter samples, its report, the gathered mesh."""

    def __init__(self, daemon: DashboardSource) -> None:
        self.daemon = daemon
        self.window = EdgeWindow()
        self._cache: tuple[float, dict[str, Any]] | None = None
        self._gathering: trio.Event | None = None
        self._peer_errors: dict[str, str] = {}

    async def sample(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample the edge counters every SAMPLE_INTERVAL (the first at once: rates from the start)."""
        registry = self.daemon.metrics.registry
        self.window.add(trio.current_time(), edge_counters(registry))
        task_status.started()
        while True:
            await trio.sleep(SAMPLE_INTERVAL)
            self.window.add(trio.current_time(), edge_counters(registry))

    # ---- this node ------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        d = self.daemon
        now = time.time()
        edges, seconds = self.window.rates(trio.current_time(), edge_counters(d.metrics.registry))
        local = d.state.catalog.local
        policy = d.state.policy.config_dump()
        files = sorted({str(p["source"]).rsplit(":", 1)[0] for kind in policy.values() for p in kind})
        policy_dir = d.config.policy.dir
        node = d.node
        return {
            "node": d.config.node_name,
            "role": d.config.role,
            "version": __version__,
            "ready": d.readiness.ready,
            "uptime_s": round(now - d.started_at, 1),
            "hbone": str(d.config.listen.hbone),
            "metrics": d.bound.get("metrics"),
            "certificates": [
                {
                    "identity": ident,
                    "not_after": s.certificate.not_after.isoformat(),
                    "expires_in_s": round(s.certificate.not_after.timestamp() - now),
                    "renewals": s.renewals,
                    "failures": s.failures,
                    "last_error": s.last_error,
                }
                for ident, s in d.identities.statistics().items()
            ],
            "peers": [
                {
                    "name": i.catalog.node if i.catalog else None,
                    "address": str(i.address),
                    "role": i.catalog.role if i.catalog else None,
                    "how": i.how,
                    "metrics": metrics_target(i.catalog, i.address.host) if i.catalog else None,
                    "last_seen_s_ago": None
                    if i.last_seen is None
                    else round(trio.current_time() - i.last_seen, 1),
                    "last_error": i.last_error,
                }
                for i in node.peers.peers.values()
            ],
            "policy": {
                "dir": str(policy_dir) if policy_dir else None,
                "files": sorted(p.name for p in policy_dir.glob("*.toml"))
                if policy_dir and policy_dir.is_dir()
                else [],
                "in_force": files,
                "counts": {kind: len(items) for kind, items in policy.items()},
            },
            "routes": policy["route"] if d.config.role == "waypoint" else [],
            "reload": {
                "last": d.last_reload.to_json() if d.last_reload else None,
                "refused": d.last_refused_reload.to_json() if d.last_refused_reload else None,
            },
            "workloads": [
                {
                    "name": w.name,
                    "namespace": w.namespace,
                    "service_account": w.service_account,
                    "address": w.address,
                    "ports": list(w.ports),
                    "services": list(w.services),
                }
                for w in local.workloads
            ],
            "services": [
                {
                    "key": s.key,
                    "ports": [
                        {"port": p.port, "target_port": p.target_port, "protocol": p.protocol}
                        for p in s.ports
                    ],
                    "waypoint": d.state.catalog.services[s.key].waypoint
                    if s.key in d.state.catalog.services
                    else s.waypoint,
                }
                for s in local.services
            ],
            "connections": {"proxied": d.inflight},
            "tracing": d.tracer.statistics(),
            "window_s": round(seconds, 1),
            "edges": edges,
        }

    def control(self, path: str, query: str) -> tuple[int, bytes]:
        """A peer's GET on HBONE (graph.CONTROL_PATHS): this node's report, or an explain answer."""
        if path == REPORT_PATH:
            return 200, json.dumps(self.report(), default=str).encode()
        return self._explain_here(parse_qs(query))

    def _explain_here(self, params: Mapping[str, list[str]]) -> tuple[int, bytes]:
        try:
            results = self.daemon.explain(ExplainQuery.from_params(params))
        except QueryError as exc:
            why = {"error": str(exc), "param": exc.param, "not_served_here": isinstance(exc, NotServedHere)}
            return 400, json.dumps(why).encode()
        return 200, json.dumps(
            {"node": self.daemon.config.node_name, "results": results}, default=str
        ).encode()

    # ---- the mesh -------------------------------------------------------------------------------
    def _peer_addresses(self) -> dict[str, Address]:
        return {
            i.catalog.node: i.address for i in self.daemon.node.peers.peers.values() if i.catalog is not None
        }

    async def _fetch(self, address: Address, path: str) -> tuple[int, Any]:
        with trio.fail_after(PEER_TIMEOUT):
            _, status, body = await self.daemon.node.fetch_control(address, path)
        return status, json.loads(body)

    async def mesh(self) -> dict[str, Any]:
        """Every node's report and the graph; one gathering at a time, its answer kept CACHE_SECONDS."""
        now = trio.current_time()
        if self._cache is not None and now - self._cache[0] < CACHE_SECONDS:
            return self._cache[1]
        if self._gathering is not None:  # another request is gathering: share its answer
            await self._gathering.wait()
            assert self._cache is not None
            return self._cache[1]
        self._gathering = trio.Event()
        try:
            answer = await self._gather()
            self._cache = (trio.current_time(), answer)
            return answer
        finally:
            self._gathering.set()
            self._gathering = None

    async def _gather(self) -> dict[str, Any]:
        reports: dict[str, Any] = {self.daemon.config.node_name: self.report()}
        errors: dict[str, str] = {}

        async def one(name: str, address: Address) -> None:
            try:
                status, report = await self._fetch(address, REPORT_PATH)
                if status != 200 or not isinstance(report, dict) or report.get("node") != name:
                    raise CatalogError(f"{address} answered {status} with no report of {name}")
                reports[name] = report
            except Exception as exc:  # whatever went wrong, it went wrong with that peer's report
                why = (
                    f"no answer within {PEER_TIMEOUT:.0f} s"
                    if isinstance(exc, trio.TooSlowError)
                    else str(exc)
                )
                errors[name] = why or type(exc).__name__
                if self._peer_errors.get(name) != errors[name]:  # logged when it changes, not every refresh
                    log.warning("dashboard: no report from %s (%s): %s", name, address, errors[name])
                    self._peer_errors[name] = errors[name]
                return
            self._peer_errors.pop(name, None)

        async with trio.open_nursery() as nursery:
            for name, address in self._peer_addresses().items():
                nursery.start_soon(one, name, address)
        ordered = [reports[k] for k in sorted(reports)]
        return {
            "generated_at": time.time(),
            "from": self.daemon.config.node_name,
            "reports": ordered,
            "errors": errors,
            "catalog": self.daemon.state.catalog.to_json(),
            "graph": mesh_graph(ordered),
        }

    async def explain(self, params: Mapping[str, list[str]]) -> Response:
        node = (params.get("node") or [""])[0]
        if not node or node == self.daemon.config.node_name:
            status, body = self._explain_here(params)
            return Response(status, body, "application/json")
        address = self._peer_addresses().get(node)
        if address is None:
            return _json(404, {"error": f"no peer named {node!r} in the catalog"})
        query = urlencode([(k, v) for k, vs in params.items() if k != "node" for v in vs])
        try:
            status, answer = await self._fetch(address, f"{EXPLAIN_PATH}?{query}")
        except (
            OSError,
            ValueError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            CatalogError,
            HboneError,
        ) as exc:
            return _json(502, {"error": f"asking {node} at {address} failed: {exc or type(exc).__name__}"})
        return _json(status, answer)

    # ---- the admin routes -----------------------------------------------------------------------
    def routes(self, status_html: Callable[[], str]) -> dict[str, Callable[[Request], Any]]:
        def page(_: Request) -> Response:
            html = (STATIC / "index.html").read_text().replace("<!--STATUS-->", status_html())
            return Response(200, html.encode(), "text/html; charset=utf-8", (("cache-control", "no-store"),))

        def static(name: str, content_type: str) -> Callable[[Request], Response]:
            def serve(_: Request) -> Response:
                return Response(
                    200, (STATIC / name).read_bytes(), content_type, (("cache-control", "max-age=300"),)
                )

            return serve

        async def api_mesh(_: Request) -> Response:
            return _json(200, await self.mesh())

        def api_node(_: Request) -> Response:
            return _json(200, self.report())

        async def api_explain(req: Request) -> Response:
            return await self.explain(req.query)

        routes: dict[str, Callable[[Request], Any]] = {
            "/": page,
            "/api/mesh": api_mesh,
            "/api/node": api_node,
            "/api/explain": api_explain,
        }
        for path, (name, content_type) in FILES.items():
            routes[path] = static(name, content_type)
        return routes
