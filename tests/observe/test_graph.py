"""The dashboard's graph core: edge counters from a real Metrics registry, rates over a window,
PromQL's quantile interpolation, and the merge of several nodes' reports."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.observe.graph import (
    BUCKETS,
    EdgeCounters,
    EdgeKey,
    EdgeWindow,
    edge_counters,
    mesh_graph,
    quantile,
)
from meshd.observe.metrics import HTTP_LABELS, TCP_LABELS, Metrics


def labels(names: tuple[str, ...], **values: str) -> list[str]:
    return [values.get(n, "unknown") for n in names]


def http(m: Metrics, code: str, ms: float, reporter: str = "waypoint") -> None:
    lv = labels(
        HTTP_LABELS,
        reporter=reporter,
        source_workload="client",
        source_workload_namespace="default",
        destination_service="reviews.default",
        destination_workload="reviews-v1",
        destination_workload_namespace="default",
        response_code=code,
        connection_security_policy="mutual_tls",
    )
    m.requests.labels(*lv).inc()
    m.request_duration.labels(*lv).observe(ms)


def tcp(m: Metrics, reporter: str, sent: int, security: str = "mutual_tls") -> None:
    lv = labels(
        TCP_LABELS,
        reporter=reporter,
        source_workload="client",
        source_workload_namespace="default",
        destination_service="echo.default",
        destination_workload="echo",
        destination_workload_namespace="default",
        connection_security_policy=security,
    )
    m.tcp_opened.labels(*lv).inc()
    m.tcp_sent.labels(*lv).inc(sent)
    m.tcp_received.labels(*lv).inc(sent)


HTTP_KEY = EdgeKey("http", "client.default", "reviews.default", "reviews-v1.default", "mutual_tls")
TCP_KEY = EdgeKey("tcp", "client.default", "echo.default", "echo.default", "mutual_tls")


def test_edge_counters_read_istio_series_once_per_edge() -> None:
    m = Metrics()
    for _ in range(9):
        http(m, "200", 3.0)
    http(m, "503", 700.0)
    http(m, "200", 1.0, reporter="source")  # not a waypoint's: not an HTTP edge
    tcp(m, "destination", 100)
    tcp(m, "source", 100)  # the same connection seen by the client's node: not counted twice
    edges = edge_counters(m.registry)
    assert set(edges) == {HTTP_KEY, TCP_KEY}
    h = edges[HTTP_KEY]
    assert (h.requests, h.errors) == (10, 1)
    assert h.buckets[BUCKETS.index(5)] == 9 and h.buckets[BUCKETS.index(1000)] == 1 and sum(h.buckets) == 10
    t = edges[TCP_KEY]
    assert (t.connections, t.bytes) == (1, 200)


def test_rates_over_the_window() -> None:
    m = Metrics()
    window = EdgeWindow(span=60)
    http(m, "200", 3.0)
    window.add(100.0, edge_counters(m.registry))
    for _ in range(19):
        http(m, "200", 3.0)
    http(m, "500", 40.0)
    rates, seconds = window.rates(110.0, edge_counters(m.registry))
    assert seconds == 10
    [edge] = rates
    assert edge["rps"] == 2.0 and edge["error_rate"] == 0.05 and edge["requests_total"] == 21
    assert 1 < edge["p50_ms"] <= 5 and 25 < edge["p99_ms"] <= 50
    for t in range(110, 210, 10):
        window.add(float(t), edge_counters(m.registry))
    # The baseline is the newest sample at least a minute old: rates span the last minute.
    assert window.samples[0][0] == 140.0 and len(window.samples) == 7


@pytest.mark.parametrize(
    ("q", "counts", "expected"),
    [
        (0.5, {5: 10}, 1 + (5 - 1) * 0.5),  # linear within (1, 5]
        (0.99, {5: 90, 500: 10}, 250 + 250 * 0.9),
        (0.5, {0.5: 4}, 0.25),  # the first bucket starts at 0
        (0.99, {math.inf: 3}, 300000),  # +Inf: the highest finite bound, as PromQL answers
        (0.5, {}, None),
    ],
)
def test_quantile_is_promql_histogram_quantile(
    q: float, counts: dict[float, float], expected: float | None
) -> None:
    buckets = [counts.get(b, 0.0) for b in BUCKETS]
    assert quantile(q, buckets) == (pytest.approx(expected) if expected is not None else None)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=50), min_size=len(BUCKETS), max_size=len(BUCKETS)),
    st.floats(0.01, 0.99),
)
def test_quantile_stays_in_its_bucket_and_grows_with_q(counts: list[int], q: float) -> None:
    buckets = [float(c) for c in counts]
    v = quantile(q, buckets)
    if sum(buckets) == 0:
        assert v is None
        return
    assert v is not None and 0 <= v <= BUCKETS[-2]
    higher = quantile(min(q + 0.01, 1.0), buckets)
    assert higher is not None and higher >= v - 1e-9


def report(node: str, role: str, edges: list[dict[str, object]], **kw: object) -> dict[str, object]:
    return {"node": node, "role": role, "workloads": [], "services": [], "edges": edges, **kw}


def http_edge(rps: float, err: float, source: str = "client.default") -> dict[str, object]:
    buckets = [0.0] * len(BUCKETS)
    buckets[BUCKETS.index(5)] = rps * 60
    return {
        "protocol": "http", "source": source, "service": "reviews.default", "destination": "reviews-v1.default",
        "security": "mutual_tls", "rps": rps, "error_rate": err, "requests_total": int(rps * 60), "buckets": buckets,
    }  # fmt: skip


def test_mesh_graph_merges_reports_into_nodes_services_and_edges() -> None:
    alpha = report(
        "alpha", "node", [], workloads=[{"name": "client", "namespace": "default"}],
    )  # fmt: skip
    beta = report(
        "beta",
        "node",
        [{"protocol": "tcp", "source": "wp.meshd-system", "service": "reviews.default", "destination": "reviews-v1.default",
          "security": "mutual_tls", "cps": 1.0, "bytes_per_s": 10.0, "connections_total": 1, "bytes_total": 10}],
        workloads=[{"name": "reviews-v1", "namespace": "default"}],
        services=[{"key": "reviews.default", "waypoint": "wp"}],
    )  # fmt: skip
    wp1 = report("wp", "waypoint", [http_edge(2.0, 0.5)])
    wp2 = report("wp2", "waypoint", [http_edge(6.0, 0.0)])
    graph = mesh_graph([alpha, beta, wp1, wp2])
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert nodes["wl:client.default"]["parent"] == "node:alpha"
    assert nodes["wl:reviews-v1.default"]["parent"] == "node:beta"
    assert nodes["node:wp"]["kind"] == "waypoint" and nodes["svc:reviews.default"]["kind"] == "service"
    edges = {e["id"]: e for e in graph["edges"]}
    # Two waypoints report the same client -> service edge: summed, error rate weighted by rate.
    e = edges["wl:client.default->svc:reviews.default:http"]
    assert e["rps"] == 8.0 and e["error_rate"] == pytest.approx(1 / 8) and e["p99_ms"] is not None
    assert "svc:reviews.default->wl:reviews-v1.default:http" in edges
    assert edges["bind:reviews.default"]["target"] == "node:wp"
    # The waypoint's tunnels to beta carry the HTTP edges already drawn: not a second, TCP edge.
    assert not any(k.startswith("node:wp->") for k in edges)


def test_counters_minus_a_missing_baseline_is_the_counters() -> None:
    c = EdgeCounters(requests=3)
    assert c.minus(None) is c
