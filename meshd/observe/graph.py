"""The mesh as a graph, from the mesh's own telemetry: what the dashboard draws.

Must never know: sockets, trio, HTTP. Plain values in, plain values (JSON-ready) out.

- `edge_counters(registry)`: this daemon's Istio series summed per edge (who -> which service -> which
  workload, protocol, mTLS or plaintext). HTTP edges come from `reporter="waypoint"` request series,
  TCP edges from `reporter="destination"` (the node that delivered the bytes) and `"waypoint"` (TCP
  passed through a waypoint); a node's `source` series would count the same connections twice.
- `EdgeWindow`: counter samples over the last minute; `rates()` turns two samples into per-second
  rates, an error rate and p50/p99 (the interpolation PromQL's histogram_quantile does).
- `mesh_graph(reports)`: the nodes' reports (each with its edges) merged into graph elements.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from meshd.observe.metrics import DURATION_BUCKETS_MS

BUCKETS = (*DURATION_BUCKETS_MS, math.inf)
# A node's report (its own telemetry and state, for the dashboard), served on HBONE to meshd nodes only.
REPORT_PATH = "/meshd/v1/report"
EXPLAIN_PATH = "/meshd/v1/explain"  # `policy explain` asked of the node that serves the destination
CONTROL_PATHS = frozenset({REPORT_PATH, EXPLAIN_PATH})
MAX_REPORT_BYTES = 4 << 20
UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class EdgeKey:
    protocol: str  # "http" (grpc counts as http) or "tcp"
    source: str  # workload.namespace, or "unknown"
    service: str  # destination service key name.namespace
    destination: str  # destination workload.namespace, or "unknown"
    security: str  # "mutual_tls" or "none"

    def to_json(self) -> dict[str, str]:
        return {
            "protocol": self.protocol,
            "source": self.source,
            "service": self.service,
            "destination": self.destination,
            "security": self.security,
        }


@dataclass(slots=True)
class EdgeCounters:
    requests: float = 0.0
    errors: float = 0.0  # 5xx answers
    buckets: list[float] = field(default_factory=lambda: [0.0] * len(BUCKETS))  # per bucket, not cumulative
    connections: float = 0.0  # TCP connections opened
    bytes: float = 0.0  # TCP bytes, both directions

    def minus(self, older: EdgeCounters | None) -> EdgeCounters:
        if older is None:
            return self
        return EdgeCounters(
            self.requests - older.requests,
            self.errors - older.errors,
            [a - b for a, b in zip(self.buckets, older.buckets, strict=True)],
            self.connections - older.connections,
            self.bytes - older.bytes,
        )


def _workload(labels: Mapping[str, str], side: str) -> str:
    name = labels.get(f"{side}_workload", UNKNOWN)
    ns = labels.get(f"{side}_workload_namespace", UNKNOWN)
    return UNKNOWN if name == UNKNOWN else f"{name}.{ns}"


def _key(protocol: str, labels: Mapping[str, str]) -> EdgeKey:
    return EdgeKey(
        protocol,
        _workload(labels, "source"),
        labels.get("destination_service", UNKNOWN),
        _workload(labels, "destination"),
        labels.get("connection_security_policy", "mutual_tls"),
    )


_TCP_REPORTERS = frozenset({"destination", "waypoint"})


def edge_counters(registry: CollectorRegistry) -> dict[EdgeKey, EdgeCounters]:
    """This daemon's counters per edge, now."""
    edges: dict[EdgeKey, EdgeCounters] = {}

    def at(protocol: str, labels: Mapping[str, str]) -> EdgeCounters:
        key = _key(protocol, labels)
        c = edges.get(key)
        if c is None:
            c = edges[key] = EdgeCounters()
        return c

    index = {le: i for i, le in enumerate(BUCKETS)}
    for metric in registry.collect():
        name = metric.name
        if name == "istio_requests":
            for s in metric.samples:
                if s.name.endswith("_total") and s.labels.get("reporter") == "waypoint":
                    c = at("http", s.labels)
                    c.requests += s.value
                    if s.labels.get("response_code", "").startswith("5"):
                        c.errors += s.value
        elif name == "istio_request_duration_milliseconds":
            last: dict[tuple[tuple[str, str], ...], float] = {}  # cumulative -> per bucket, per series
            for s in metric.samples:
                if not s.name.endswith("_bucket") or s.labels.get("reporter") != "waypoint":
                    continue
                le = float(s.labels["le"])
                labels = {k: v for k, v in s.labels.items() if k != "le"}
                series = tuple(sorted(labels.items()))  # a series' buckets come in order of le
                if le == BUCKETS[0]:
                    last[series] = 0.0
                c = at("http", labels)
                c.buckets[index[le]] += s.value - last.get(series, 0.0)
                last[series] = s.value
        elif name in ("istio_tcp_connections_opened", "istio_tcp_sent_bytes", "istio_tcp_received_bytes"):
            for s in metric.samples:
                if s.name.endswith("_total") and s.labels.get("reporter") in _TCP_REPORTERS:
                    c = at("tcp", s.labels)
                    if name == "istio_tcp_connections_opened":
                        c.connections += s.value
                    else:
                        c.bytes += s.value
    return edges


def quantile(q: float, buckets: Sequence[float]) -> float | None:
    """PromQL's histogram_quantile over per-bucket counts (BUCKETS' upper bounds): linear within the
    bucket; the highest finite bound if the rank falls in +Inf. None when there is nothing counted."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, count in enumerate(buckets):
        if seen + count >= rank and count > 0:
            upper = BUCKETS[i]
            if math.isinf(upper):
                return BUCKETS[-2]
            lower = BUCKETS[i - 1] if i > 0 else 0.0
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return BUCKETS[-2]


def edge_rates(key: EdgeKey, delta: EdgeCounters, seconds: float, total: EdgeCounters) -> dict[str, Any]:
    """One edge's JSON: per-second rates over the window, error share, latency quantiles, totals."""
    seconds = max(seconds, 1e-9)
    out: dict[str, Any] = key.to_json()
    if key.protocol == "http":
        out.update(
            rps=round(delta.requests / seconds, 3),
            error_rate=round(delta.errors / delta.requests, 4) if delta.requests > 0 else 0.0,
            p50_ms=_round(quantile(0.5, delta.buckets)),
            p99_ms=_round(quantile(0.99, delta.buckets)),
            requests_total=int(total.requests),
            buckets=[round(b, 3) for b in delta.buckets],
        )
    else:
        out.update(
            cps=round(delta.connections / seconds, 3),
            bytes_per_s=round(delta.bytes / seconds, 1),
            connections_total=int(total.connections),
            bytes_total=int(total.bytes),
        )
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


@dataclass
class EdgeWindow:
    """Counter samples (time, counters) over `span` seconds; the oldest is the rates' baseline."""

    span: float = 60.0
    samples: deque[tuple[float, dict[EdgeKey, EdgeCounters]]] = field(default_factory=deque)

    def add(self, now: float, counters: dict[EdgeKey, EdgeCounters]) -> None:
        self.samples.append((now, counters))
        while len(self.samples) > 1 and self.samples[1][0] <= now - self.span:
            self.samples.popleft()

    def rates(self, now: float, current: dict[EdgeKey, EdgeCounters]) -> tuple[list[dict[str, Any]], float]:
        """Every edge's rates between the oldest sample and `current` (counters now); the window's length."""
        if not self.samples:
            return [edge_rates(k, EdgeCounters(), 1.0, c) for k, c in current.items()], 0.0
        then, base = self.samples[0]
        seconds = now - then
        return [edge_rates(k, c.minus(base.get(k)), seconds, c) for k, c in current.items()], seconds


# ---- the merged graph ---------------------------------------------------------------------------


def _merge_edge(into: dict[str, Any], e: Mapping[str, Any]) -> None:
    for k in ("rps", "cps", "bytes_per_s", "requests_total", "connections_total", "bytes_total"):
        if k in e:
            into[k] = round(into.get(k, 0) + e[k], 3)
    if "buckets" in e:
        into["buckets"] = [
            a + b for a, b in zip(into.get("buckets", [0.0] * len(BUCKETS)), e["buckets"], strict=True)
        ]
    if into.get("security") != e.get("security"):
        into["security"] = "mixed"
    if "rps" in e:
        into["_errors"] = into.get("_errors", 0.0) + e.get("error_rate", 0.0) * e.get("rps", 0.0)


def _finish_edge(e: dict[str, Any]) -> dict[str, Any]:
    if e.get("protocol") == "http":
        rps = e.get("rps", 0.0)
        e["error_rate"] = round(e.pop("_errors", 0.0) / rps, 4) if rps > 0 else 0.0
        buckets = e.pop("buckets", [])
        e["p50_ms"] = _round(quantile(0.5, buckets))
        e["p99_ms"] = _round(quantile(0.99, buckets))
    return e


def mesh_graph(reports: Iterable[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Cytoscape elements: meshd daemons (compound nodes holding their workloads; a waypoint on its
    own), services, traffic edges source -> service -> workload, and service -> waypoint bindings."""
    nodes: dict[str, dict[str, Any]] = {}
    edges: dict[str, dict[str, Any]] = {}
    reports = list(reports)
    daemons = {r["node"] for r in reports}

    def node(id_: str, **data: Any) -> None:
        if id_ not in nodes:
            nodes[id_] = {"id": id_, **data}

    def endpoint(workload: str) -> str:
        """A traffic end: a workload, or a meshd daemon (a waypoint's own identity) by its name."""
        name, _, ns = workload.partition(".")
        if ns == "meshd-system" and name in daemons:
            return f"node:{name}"
        node(
            f"wl:{workload}",
            kind="workload",
            label=name if workload != UNKNOWN else "unknown client",
            namespace=ns,
        )
        return f"wl:{workload}"

    for r in reports:
        node(f"node:{r['node']}", kind=r["role"], label=r["node"])
    for r in reports:
        for w in r.get("workloads", []):
            key = f"{w['name']}.{w['namespace']}"
            nodes.pop(f"wl:{key}", None)
            node(
                f"wl:{key}",
                kind="workload",
                label=w["name"],
                namespace=w["namespace"],
                parent=f"node:{r['node']}",
            )
        for s in r.get("services", []):
            node(f"svc:{s['key']}", kind="service", label=s["key"])
            if s.get("waypoint"):
                wp = f"node:{s['waypoint']}"
                node(wp, kind="waypoint", label=s["waypoint"])
                edges.setdefault(
                    f"bind:{s['key']}",
                    {"id": f"bind:{s['key']}", "source": f"svc:{s['key']}", "target": wp, "kind": "waypoint"},
                )
    http_services = {e["service"] for r in reports for e in r.get("edges", []) if e["protocol"] == "http"}
    waypoints = {f"node:{r['node']}" for r in reports if r["role"] == "waypoint"}
    for r in reports:
        for e in r.get("edges", []):
            svc = f"svc:{e['service']}"
            src = endpoint(e["source"])
            if e["protocol"] == "tcp" and src in waypoints and e["service"] in http_services:
                continue  # a waypoint's tunnels carrying the HTTP edges drawn already
            node(svc, kind="service", label=e["service"])
            legs = [(src, svc)]
            if e["destination"] != UNKNOWN:
                legs.append((svc, endpoint(e["destination"])))
            for a, b in legs:
                id_ = f"{a}->{b}:{e['protocol']}"
                into = edges.get(id_)
                if into is None:
                    into = edges[id_] = {
                        "id": id_,
                        "source": a,
                        "target": b,
                        "kind": "traffic",
                        "protocol": e["protocol"],
                        "security": e["security"],
                    }
                _merge_edge(into, e)
    for n in nodes.values():  # a parent must exist for cytoscape
        if n.get("parent") and n["parent"] not in nodes:
            del n["parent"]
    return {
        "nodes": sorted(nodes.values(), key=lambda n: n["id"]),
        "edges": sorted(
            (_finish_edge(e) if e["kind"] == "traffic" else e for e in edges.values()), key=lambda e: e["id"]
        ),
    }
