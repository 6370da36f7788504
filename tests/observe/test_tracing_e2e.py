"""Trace export end to end: client node -> waypoint -> node, spans received by an OTLP/HTTP receiver
that decodes them with the official `opentelemetry-proto` messages."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from meshd.observe.otlp import KIND_CLIENT, KIND_SERVER, STATUS_ERROR
from tests.support.otlp_receiver import ReceivedSpan, otlp_receiver
from tests.support.procs import unique_loopback, wait_for
from tests.support.telemetry_mesh import REVIEWS_PORT, three_daemons

pytestmark = pytest.mark.slow

RETRY_ROUTE = """
[[route]]
name = "flaky"
service = "reviews.default"
match = [{ path = { prefix = "/flaky" } }]
retries = { attempts = 2, retry_on = ["5xx"], base_interval = "1ms" }

[[route]]
name = "default"
service = "reviews.default"
"""


def tracing(url: str, **extra: str) -> str:
    lines = [f'otlp = "{url}"', 'interval = "100ms"', *(f"{k} = {v}" for k, v in extra.items())]
    return "[tracing]\n" + "\n".join(lines) + "\n"


def by_trace(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.trace_id == trace_id]


def one(spans: list[ReceivedSpan], service: str, name: str) -> ReceivedSpan:
    found = [s for s in spans if s.service == service and s.name == name]
    assert len(found) == 1, (service, name, spans)
    return found[0]


def test_one_trace_from_client_node_through_waypoint_to_node(tmp_path: Path) -> None:
    with otlp_receiver(unique_loopback()) as rx:
        cfg = tracing(rx.url)
        with three_daemons(
            tmp_path, extra={"alpha": cfg, "wp": cfg, "beta": cfg}, routes=RETRY_ROUTE
        ) as mesh:
            # 1. A plain app: no trace headers. The client node's connection span is the root.
            status, headers = mesh.get("/flaky/1", {"x-request-id": "req-1"})
            assert status == 200
            seen_by_app = headers["x-seen-traceparent"].split("-")
            # 2. An app that traces: its context is continued, tracestate kept.
            app_trace, app_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
            status, headers = mesh.get(
                "/traced", {"traceparent": f"00-{app_trace}-{app_span}-01", "tracestate": "app=1"}
            )
            assert status == 200 and headers["x-seen-traceparent"].split("-")[1] == app_trace
            traced = next(r for r in mesh.backend.requests if r.path == "/traced").headers
            assert traced["tracestate"] == "app=1"
            # 3. B3 (Zipkin) headers are accepted.
            b3_trace, b3_span = "463ac35c9f6413ad48485a3953bb6124", "a2fb4a1d1a96d312"
            status, _ = mesh.get(
                "/b3", {"x-b3-traceid": b3_trace, "x-b3-spanid": b3_span, "x-b3-sampled": "1"}
            )
            assert status == 200
            b3_seen = next(r for r in mesh.backend.requests if r.path == "/b3").headers
            assert b3_seen["x-b3-traceid"] == b3_trace and b3_seen["x-b3-spanid"] != b3_span
            # 4. A caller that decided not to sample: nothing recorded, the decision passed on.
            unsampled = "5bf92f3577b34da6a3ce929d0e0e4736"
            status, headers = mesh.get("/unsampled", {"traceparent": f"00-{unsampled}-00f067aa0ba902b7-00"})
            seen = headers["x-seen-traceparent"].split("-")
            assert status == 200 and seen[1] == unsampled and seen[3] == "00"
            # The waypoint's upstream tunnel to beta closes when the waypoint stops (it flushes then).
            mesh.wp.signal(signal.SIGTERM)
            assert mesh.wp.proc is not None and mesh.wp.proc.wait(15) == 0

            def chain_arrived() -> bool:
                spans = rx.snapshot()
                return (
                    any(s.service == "beta" and s.name == "inbound reviews.default" for s in spans)
                    and len({s.trace_id for s in spans if s.service == "wp"}) >= 3
                    and sum(s.service == "alpha" and s.name == "connect reviews.default" for s in spans) >= 3
                )

            wait_for(chain_arrived, mesh.beta)
        assert not rx.errors, rx.errors
        spans = rx.snapshot()

    # Request 1 (three client connections, three alpha spans):
    # alpha (root, CLIENT) -> wp server span -> two attempt spans (503, then 200) -> beta.
    root = next(
        s
        for s in spans
        if s.service == "alpha"
        and s.name == "connect reviews.default"
        and any(w.parent_span_id == s.span_id for w in spans)
    )
    trace = by_trace(spans, root.trace_id)
    assert root.parent_span_id == "" and root.kind == KIND_CLIENT
    assert root.attributes["source.principal"] == "spiffe://home.arpa/ns/default/sa/client"
    assert root.attributes["destination.service"] == "reviews.default"
    server = one(trace, "wp", "GET reviews.default")
    assert server.parent_span_id == root.span_id and server.kind == KIND_SERVER
    assert server.attributes["http.status_code"] == 200
    assert server.attributes["upstream_cluster"] == f"outbound|{REVIEWS_PORT}||reviews.default"
    assert server.attributes["response_flags"] == "-"
    assert server.attributes["source.principal"] == "spiffe://home.arpa/ns/default/sa/client"
    assert server.attributes["destination.principal"] == "spiffe://home.arpa/ns/default/sa/reviews"
    assert server.attributes["guid:x-request-id"] == "req-1"
    attempts = sorted((s for s in trace if s.name == "upstream reviews.default"), key=lambda s: s.start_ns)
    assert [a.attributes["meshd.attempt"] for a in attempts] == [1, 2]
    assert [a.attributes["http.status_code"] for a in attempts] == [503, 200]
    assert [a.status for a in attempts] == [STATUS_ERROR, 0]
    assert all(a.parent_span_id == server.span_id and a.kind == KIND_CLIENT for a in attempts)
    assert server.start_ns <= attempts[0].start_ns <= attempts[1].end_ns <= server.end_ns
    # The app saw the second attempt as its parent.
    assert seen_by_app[1] == root.trace_id and seen_by_app[2] == attempts[1].span_id
    # beta: the upstream tunnel opened by the first attempt carries its context (the retry reuses it,
    # or opens a second tunnel, with its own context, when the first is not back in the pool yet).
    inbound = [s for s in trace if s.service == "beta" and s.name == "inbound reviews.default"]
    assert 1 <= len(inbound) <= 2, inbound
    assert attempts[0].span_id in {s.parent_span_id for s in inbound}
    assert {s.parent_span_id for s in inbound} <= {a.span_id for a in attempts}
    for s in inbound:
        assert s.kind == KIND_SERVER and s.attributes["connection_security_policy"] == "mutual_tls"
        assert s.attributes["source.principal"] == "spiffe://home.arpa/ns/meshd-system/sa/node-wp"
    assert {s.service for s in trace} == {"alpha", "wp", "beta"}

    # Request 2: the app's trace, the app's span as the waypoint span's parent.
    app = by_trace(spans, app_trace)
    server2 = one(app, "wp", "GET reviews.default")
    assert server2.parent_span_id == app_span
    assert one(app, "wp", "upstream reviews.default").parent_span_id == server2.span_id
    assert by_trace(spans, unsampled) == []
    # Request 3: B3 continued.
    assert one(by_trace(spans, b3_trace), "wp", "GET reviews.default").parent_span_id == b3_span


def test_a_down_or_slow_collector_drops_spans_and_never_slows_requests(tmp_path: Path) -> None:
    down = socket.socket()
    down.bind((unique_loopback(), 0))
    host, port = down.getsockname()
    down_url = f"http://{host}:{port}"
    down.close()  # nothing listens there: every export is refused
    with otlp_receiver(unique_loopback(), delay=5.0) as slow:
        slow_cfg = tracing(slow.url, queue_size="16", batch_size="8", timeout='"10s"')
        extra = {"alpha": tracing(down_url), "wp": slow_cfg, "beta": tracing(down_url)}
        with three_daemons(tmp_path, extra=extra) as mesh:
            conn = mesh.client()
            slowest = 0.0
            for i in range(60):
                started = time.monotonic()
                conn.request("GET", f"/r/{i}")
                resp = conn.getresponse()
                resp.read()
                slowest = max(slowest, time.monotonic() - started)
                assert resp.status == 200
            conn.close()
            for _ in range(5):  # connections closed: alpha's spans go to the collector that is down
                assert mesh.echo(b"x" * 100) == b"x" * 100
            # Each waypoint export waits 5 s for the slow collector; a request that waited on one
            # would take that long.
            assert slowest < 2.0, slowest
            wait_for(
                lambda: mesh.wp.metric("meshd_tracing_spans_dropped_total", reason="queue_full") > 0, mesh.wp
            )
            wait_for(
                lambda: mesh.alpha.metric("meshd_tracing_spans_dropped_total", reason="export_failed") >= 5,
                mesh.alpha,
            )
            assert mesh.wp.metric("istio_requests_total", response_code="200") == 60
