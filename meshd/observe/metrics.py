"""Prometheus metrics, with Istio's names and labels so existing dashboards work.

prometheus_client does the exposition format; each Daemon owns its own registry (no globals,
so tests can run several in one process).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from meshd import __version__

# Istio's workload labels for one side of a connection (ztunnel's CommonTrafficLabels), in its order.
_SOURCE_LABELS = (
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
)
_DESTINATION_LABELS = (
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
)
# Istio's TCP labels (reporter is "destination" at inbound, "source" at outbound, "waypoint" at a waypoint).
TCP_LABELS = (
    "reporter",
    *_SOURCE_LABELS,
    *_DESTINATION_LABELS,
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)
# Istio's HTTP labels (reporter is "waypoint" at a waypoint): the TCP ones plus the status codes.
HTTP_LABELS = (*TCP_LABELS[:-2], "response_code", "grpc_response_status", *TCP_LABELS[-2:])
# A refused connection: enough to tell which client was refused, from which node, and why.
FAILED_LABELS = (
    "reporter",
    "reason",
    "peer_address",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_service",
)
# Istio's default buckets: milliseconds for durations, bytes (powers of ten) for sizes.
DURATION_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000)
SIZE_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000)
CONTENT_TYPE = CONTENT_TYPE_LATEST
# `*_created` series double the scrape size and no Istio dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._hooks: list[Callable[[], None]] = []
        r = self.registry
        self.build_info = Info("meshd_build", "meshd version", registry=r)
        self.build_info.info({"version": __version__})
        self.tcp_opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened", TCP_LABELS, registry=r
        )
        self.tcp_closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed", TCP_LABELS, registry=r
        )
        self.tcp_sent = Counter(
            "istio_tcp_sent_bytes", "bytes sent to the client side", TCP_LABELS, registry=r
        )
        self.tcp_received = Counter(
            "istio_tcp_received_bytes", "bytes received from the client side", TCP_LABELS, registry=r
        )
        self.tcp_failed = Counter(
            "meshd_tcp_connections_failed",
            "connections refused or failed before any byte was proxied",
            FAILED_LABELS,
            registry=r,
        )
        self.cert_expiry = Gauge(
            "meshd_certificate_expiry_timestamp_seconds",
            "not-after of the current certificate",
            ("identity",),
            registry=r,
        )
        self.cert_renewal_failures = Counter(
            "meshd_certificate_renewal_failures", "failed certificate renewals", ("identity",), registry=r
        )
        self.ready = Gauge("meshd_ready", "1 once every component has started", registry=r)
        self.config_reloads = Counter(
            "meshd_config_reloads",
            "config and policy reload attempts (SIGHUP or a file change)",
            ("result",),
            registry=r,
        )
        self.catalog_fetch_failures = Counter(
            "meshd_catalog_fetch_failures", "failed fetches of a peer's catalog", registry=r
        )
        self.peers = Gauge("meshd_peers", "peers whose catalog is current", registry=r)
        self.etcd_connected = Gauge(
            "meshd_etcd_connected", "1 while an etcd endpoint answers (discovery.etcd set)", registry=r
        )
        self.etcd_failures = Counter(
            "meshd_etcd_failures",
            "etcd sessions that failed (unreachable, no quorum, lease lost)",
            registry=r,
        )
        self.ca_requests = Counter(
            "meshd_ca_requests",
            "CA service decisions (the CA host only): enrollments and certificate signings",
            ("kind", "result"),
            registry=r,
        )
        self.connect_duration = Histogram(
            "meshd_hbone_connect_duration_seconds",
            "time to open an HBONE tunnel (including TLS when a new connection is needed)",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )

        self.policy_dry_run = Counter(
            "meshd_policy_dry_run",
            "dry-run authorization policies evaluated: the decision each would have given if enforced",
            ("policy", "result"),
            registry=r,
        )

        self.requests = Counter("istio_requests", "HTTP requests (waypoint)", HTTP_LABELS, registry=r)
        self.request_duration = Histogram(
            "istio_request_duration_milliseconds",
            "request duration, first request byte to last response byte (waypoint)",
            HTTP_LABELS,
            registry=r,
            buckets=DURATION_BUCKETS_MS,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes",
            "request body size (waypoint)",
            HTTP_LABELS,
            registry=r,
            buckets=SIZE_BUCKETS,
        )
        self.response_bytes = Histogram(
            "istio_response_bytes",
            "response body size (waypoint)",
            HTTP_LABELS,
            registry=r,
            buckets=SIZE_BUCKETS,
        )

        self.wasm_failures = Counter(
            "meshd_wasm_failures",
            "wasm filter callbacks that failed (reason: fuel, trap, exit, memory, host, broken, load)",
            ("filter", "reason"),
            registry=r,
        )
        self.spans_exported = Counter(
            "meshd_tracing_spans_exported", "spans the OTLP collector accepted", registry=r
        )
        self.spans_dropped = Counter(
            "meshd_tracing_spans_dropped",
            "spans not exported: queue_full (the collector is down or slow) or export_failed",
            ("reason",),
            registry=r,
        )

    def add_collect_hook(self, hook: Callable[[], None]) -> None:
        """Run `hook` right before each scrape (refresh gauges derived from state)."""
        self._hooks.append(hook)

    def exposition(self) -> bytes:
        for hook in self._hooks:
            hook()
        return generate_latest(self.registry)
