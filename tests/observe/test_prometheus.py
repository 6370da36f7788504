"""A real Prometheus (Debian's) scraping two nodes and a waypoint, found through the file_sd file
`meshd peers --prometheus-sd` writes; the PromQL of Istio's standard dashboards (the Mesh dashboard's
request rate, success rate, latency quantiles and TCP bytes) gives the values of the traffic sent."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.paths import REPO
from tests.support.procs import unique_loopback, wait_for
from tests.support.prometheus import Prometheus, prometheus
from tests.support.telemetry_mesh import ROUTES, TelemetryMesh, three_daemons

pytestmark = pytest.mark.slow


# Istio's Mesh dashboard (istio/istio manifests/addons, as Grafana and Perses ship it), with
# $__rate_interval written as the window [W].
REQUEST_RATE = 'sum by (destination_service)(rate(istio_requests_total{reporter=~"source|waypoint"}[W]))'
SUCCESS_RATE = (
    'sum(rate(istio_requests_total{reporter=~"source|waypoint",response_code!~"5.."}[W]))'
    ' / sum(rate(istio_requests_total{reporter=~"source|waypoint"}[W]))'
)
P99 = (
    'histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{reporter=~"source|waypoint"}[W]))'
    " by (destination_workload,destination_workload_namespace,le))"
)
P50 = P99.replace("0.99", "0.50")
TCP_SENT = (
    "sum by (destination_service_name,destination_service_namespace)"
    '(rate(istio_tcp_sent_bytes_total{reporter=~"source|waypoint"}[W]))'
)
TCP_RECEIVED = TCP_SENT.replace("sent_bytes", "received_bytes")

OK, FAILED, SLOW, ECHOES, PAYLOAD = 80, 10, 10, 6, 50_000


def traffic(mesh: TelemetryMesh, ok: int, failed: int, slow: int, echoes: int) -> None:
    conn = mesh.client()
    for path, n, status in (("/ok", ok, 200), ("/fail", failed, 503), ("/slow?ms=300", slow, 200)):
        for _ in range(n):
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == status, path
    conn.close()
    for _ in range(echoes):
        assert mesh.echo(b"e" * PAYLOAD) == b"e" * PAYLOAD


def total(prom: Prometheus, promql: str) -> float:
    return prom.scalar(promql) or 0.0


def test_istio_dashboard_queries_give_the_traffic_sent(tmp_path: Path) -> None:
    with three_daemons(tmp_path, routes=ROUTES) as mesh:
        # The targets: what `meshd peers --prometheus-sd` writes from alpha's view of the mesh.
        sd = tmp_path / "meshd-targets.json"
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "meshd",
                "peers",
                "--admin",
                f"{mesh.alpha.ip}:15000",
                "--prometheus-sd",
                str(sd),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "3 targets" in out.stdout, out
        groups = json.loads(sd.read_text())
        assert sorted(g["labels"]["meshd_node"] for g in groups) == ["alpha", "beta", "wp"]
        assert {g["labels"]["meshd_role"] for g in groups} == {"node", "waypoint"}
        assert sorted(t for g in groups for t in g["targets"]) == sorted(
            f"{d.ip}:15020" for d in mesh.daemons
        )
        config = tmp_path / "prometheus.yml"
        shipped = (REPO / "configs" / "prometheus.yml").read_text()
        # The shipped config with a 200 ms scrape interval (rate() extrapolates to the window's edges
        # by up to an interval: a short one keeps that error small) and the test's file.
        config.write_text(
            shipped.replace("15s", "200ms").replace("/etc/prometheus/meshd-targets.json", str(sd))
        )
        with prometheus(config, unique_loopback(), tmp_path) as prom:
            wait_for(lambda: total(prom, 'sum(up{job="meshd"})') == 3, mesh.alpha, timeout=30)
            # Every series exists (and was scraped) before the measured traffic: rate() counts
            # increases from a series' first sample on.
            traffic(mesh, 1, 1, 1, 1)
            warm = 'sum(istio_requests_total{reporter="waypoint"})'
            wait_for(lambda: total(prom, warm) == 3, mesh.wp, timeout=30)
            wait_for(
                lambda: (
                    total(
                        prom,
                        'sum(istio_tcp_sent_bytes_total{reporter="source",destination_service="echo.default"})',
                    )
                    == PAYLOAD
                ),
                mesh.alpha,
                timeout=30,
            )
            started = time.time()
            traffic(mesh, OK, FAILED, SLOW, ECHOES)
            n = OK + FAILED + SLOW
            wait_for(lambda: total(prom, warm) == 3 + n, mesh.wp, timeout=30)
            echo_sent = (
                'sum(istio_tcp_sent_bytes_total{reporter="source",destination_service="echo.default"})'
            )
            wait_for(lambda: total(prom, echo_sent) == PAYLOAD * (1 + ECHOES), mesh.alpha, timeout=30)
            now = time.time()
            window = math.ceil(now - started) + 1

            def q(promql: str) -> list[tuple[dict[str, str], float]]:
                return prom.query(promql.replace("[W]", f"[{window}s]"), at=now)

            # Request rate by destination service: n requests in the window (rate() extrapolates to the
            # window's edges by up to a scrape interval, hence the tolerance).
            rates = {m["destination_service"]: v for m, v in q(REQUEST_RATE)}
            assert set(rates) == {"reviews.default"}, rates
            assert rates["reviews.default"] * window == pytest.approx(n, rel=0.08)
            # Success rate: the aborted requests are the only 5xx.
            [(_, success)] = q(SUCCESS_RATE)
            assert success == pytest.approx((OK + SLOW) / n, abs=0.02)
            # Latency: the 10 slow requests (300 ms) are the top 10%, so p99 lands in Istio's
            # (250, 500] ms bucket; p50 is among the fast ones.
            # (The aborted requests reached no workload: their series say destination_workload "unknown".)
            p99 = {m["destination_workload"]: v for m, v in q(P99)}
            assert set(p99) == {"reviews-v1", "unknown"}, p99
            assert 250 < p99["reviews-v1"] <= 500, p99
            p50 = {m["destination_workload"]: v for m, v in q(P50)}
            assert p50["reviews-v1"] < 250, p50
            # TCP bytes by service: the echoes, both ways.
            sent = {m["destination_service_name"]: v for m, v in q(TCP_SENT)}
            received = {m["destination_service_name"]: v for m, v in q(TCP_RECEIVED)}
            assert sent["echo"] * window == pytest.approx(PAYLOAD * ECHOES, rel=0.08)
            assert received["echo"] * window == pytest.approx(PAYLOAD * ECHOES, rel=0.08)
            # The waypoint's own series are labelled as Istio's waypoint labels them.
            [(labels, _)] = prom.query('istio_requests_total{reporter="waypoint",response_code="503"}')
            assert labels["response_flags"] == "FI" and labels["connection_security_policy"] == "mutual_tls"
            assert labels["source_workload"] == "client" and labels["meshd_node"] == "wp"


def test_shipped_prometheus_config_is_valid() -> None:
    out = subprocess.run(
        ["promtool", "check", "config", str(REPO / "configs" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
