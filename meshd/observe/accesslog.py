"""One access-log line per proxied connection, plus the Istio TCP metrics for it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from prometheus_client import Counter, Histogram

from meshd.discovery.catalog import Catalog, WorkloadEntry
from meshd.identity.spiffe import SpiffeId
from meshd.observe.metrics import Metrics
from meshd.observe.otlp import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, AttributeValue
from meshd.observe.tracecontext import SpanStart
from meshd.observe.tracing import Tracer

log = logging.getLogger("meshd.access")

# Istio response flags used at L4.
FLAG_UNAUTHORIZED = "UAEX"  # denied by authorization policy ("unauthorized external")
FLAG_NO_ROUTE = "NR"  # no workload/port, no endpoint
FLAG_UPSTREAM_CONNECT = "UF"  # upstream connection failure
FLAG_NO_HEALTHY = "UH"  # no healthy upstream

UNKNOWN = "unknown"
# Istio's canonical service / revision come from these workload labels, first one set wins
# (then the workload name, and "latest").
CANONICAL_SERVICE_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
CANONICAL_REVISION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")
DEFAULT_REVISION = "latest"


@dataclass(frozen=True, slots=True)
class WorkloadLabels:
    """One side of a connection as Istio's metrics label it. Built once per connection (or tunnel)."""

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN
    cluster: str = UNKNOWN

    @classmethod
    def of(cls, w: WorkloadEntry, cluster: str) -> WorkloadLabels:
        """A catalog workload: its name, and Istio's defaults for what its labels do not say."""
        labels = w.label_map
        service = next((labels[k] for k in CANONICAL_SERVICE_LABELS if labels.get(k)), w.name)
        revision = next((labels[k] for k in CANONICAL_REVISION_LABELS if labels.get(k)), DEFAULT_REVISION)
        return cls(w.name, w.namespace, service, revision, cluster)

    @classmethod
    def of_identity(cls, identity: SpiffeId | None) -> WorkloadLabels:
        """A peer no catalog workload matches: what its certificate says. A meshd node (a waypoint,
        or a node hairpinning) is named after the node."""
        if identity is None:
            return cls()
        if identity.is_node:
            name = identity.service_account.removeprefix("node-")
            return cls(name, identity.namespace, name, DEFAULT_REVISION, identity.trust_domain)
        return cls(namespace=identity.namespace, cluster=identity.trust_domain)


UNKNOWN_WORKLOAD = WorkloadLabels()


def source_of(catalog: Catalog, identity: SpiffeId | None, client: str) -> WorkloadLabels:
    """The client side of a tunnel: the catalog workload with its identity (at `client`, ip:port,
    when several share it), else what the identity says."""
    w = catalog.source_workload(identity, _host(client)) if identity is not None else None
    return (
        WorkloadLabels.of(w, catalog.trust_domain) if w is not None else WorkloadLabels.of_identity(identity)
    )


def _istio_labels(
    reporter: str,
    source: WorkloadLabels,
    source_identity: SpiffeId | None,
    destination: WorkloadLabels,
    destination_identity: SpiffeId | None,
    destination_service: str,
    protocol: str,
) -> tuple[str, ...]:
    """Istio's common traffic labels in metrics.TCP_LABELS order, up to request_protocol. `*_app` and
    `*_version` repeat the canonical service and revision, as ztunnel writes them."""
    name, _, ns = destination_service.partition(".")
    return (
        reporter,
        source.workload,
        source.canonical_service,
        source.canonical_revision,
        source.namespace,
        source_identity.uri if source_identity else UNKNOWN,
        source.canonical_service,
        source.canonical_revision,
        source.cluster,
        destination_service,
        ns or UNKNOWN,
        name or UNKNOWN,
        destination.workload,
        destination.canonical_service,
        destination.canonical_revision,
        destination.namespace,
        destination_identity.uri if destination_identity else UNKNOWN,
        destination.canonical_service,
        destination.canonical_revision,
        destination.cluster,
        protocol,
    )


@dataclass
class ConnectionRecord:
    """What a node knows about one proxied connection, filled in as it goes."""

    reporter: str  # "source" (outbound), "destination" (inbound) or "waypoint"
    src: str
    dst: str
    source_identity: SpiffeId | None = None
    destination_identity: SpiffeId | None = None
    source: WorkloadLabels | None = None  # None: derived from source_identity
    destination: WorkloadLabels = UNKNOWN_WORKLOAD
    destination_service: str = UNKNOWN
    peer: str | None = None  # the other node's address: who opened the tunnel (inbound), or was dialled
    security: str = "mutual_tls"
    started: float = field(default_factory=time.monotonic)
    opened: bool = False
    dry_run: str | None = None  # what dry-run policies would have decided: "policy=deny,..." (dry_run.py)
    protocol: str = "tcp"  # Istio's request_protocol label: "tcp", or "udp" for a UDP flow
    trace: SpanStart | None = None  # the connection's span, when tracing records one

    @property
    def source_labels(self) -> WorkloadLabels:
        return self.source if self.source is not None else WorkloadLabels.of_identity(self.source_identity)

    def log_fields(self) -> dict[str, object]:
        """Who talked to whom, as every access-log line of a connection or flow says it."""
        src = self.source_labels
        return {
            "reporter": self.reporter,
            "src.addr": self.src,
            "dst.addr": self.dst,
            "peer.addr": self.peer,
            "src.workload": src.workload,
            "src.namespace": src.namespace,
            "src.identity": self.source_identity.uri if self.source_identity else None,
            "dst.identity": self.destination_identity.uri if self.destination_identity else None,
            "dst.service": self.destination_service,
            "dst.workload": self.destination.workload,
            "dst.namespace": self.destination.namespace,
        }

    def labels(self, flags: str = "-") -> tuple[str, ...]:
        return (
            *_istio_labels(
                self.reporter,
                self.source_labels,
                self.source_identity,
                self.destination,
                self.destination_identity,
                self.destination_service,
                self.protocol,
            ),
            flags,
            self.security,
        )

    def span_attributes(self, sent: int, received: int, flags: str) -> dict[str, AttributeValue]:
        """Istio's attribute names where it has one (`source.principal`, `response_flags`, ...)."""
        src = self.source_labels
        attrs: dict[str, AttributeValue] = {
            "component": "proxy",
            "meshd.reporter": self.reporter,
            "peer.address": self.peer or self.src,
            "source.address": self.src,
            "source.workload": src.workload,
            "source.principal": self.source_identity.uri if self.source_identity else UNKNOWN,
            "destination.address": self.dst,
            "destination.service": self.destination_service,
            "destination.workload": self.destination.workload,
            "destination.principal": self.destination_identity.uri if self.destination_identity else UNKNOWN,
            "connection_security_policy": self.security,
            "response_flags": flags,
            "bytes_sent": sent,
            "bytes_received": received,
        }
        return attrs

    def failed_labels(self, reason: str) -> tuple[str, ...]:
        """metrics.FAILED_LABELS: the peer node's IP (not its ephemeral port) keeps the series few."""
        src = self.source_labels
        return (
            self.reporter,
            reason,
            _host(self.peer) if self.peer else UNKNOWN,
            src.workload,
            src.namespace,
            self.source_identity.uri if self.source_identity else UNKNOWN,
            self.destination.workload,
            self.destination.namespace,
            self.destination_service,
        )


def _host(address: str) -> str:
    """ "10.0.0.1:15008" -> "10.0.0.1", "[::1]:15008" -> "::1"."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address
    return host.strip("[]")


class ConnectionTelemetry:
    def __init__(self, metrics: Metrics, *, access_log: bool, tracer: Tracer | None = None) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self.tracer = tracer

    def opened(self, rec: ConnectionRecord) -> None:
        rec.opened = True
        self.metrics.tcp_opened.labels(*rec.labels()).inc()

    def closed(self, rec: ConnectionRecord, *, sent: int, received: int, error: str | None = None) -> None:
        labels = rec.labels()
        self.metrics.tcp_closed.labels(*labels).inc()
        self.metrics.tcp_sent.labels(*labels).inc(sent)
        self.metrics.tcp_received.labels(*labels).inc(received)
        self._log(rec, sent=sent, received=received, error=error, flags="-")
        self._span(rec, sent, received, "-", error)

    def failed(self, rec: ConnectionRecord, flag: str, reason: str) -> None:
        """A connection refused or failed before any byte was proxied."""
        self.metrics.tcp_failed.labels(*rec.failed_labels(flag)).inc()
        self._log(rec, sent=0, received=0, error=reason, flags=flag)
        self._span(rec, 0, 0, flag, reason)

    def _span(self, rec: ConnectionRecord, sent: int, received: int, flags: str, error: str | None) -> None:
        """The connection's span: CLIENT for outbound (reporter source), SERVER for the inbound sides."""
        if rec.trace is None or self.tracer is None or not rec.trace.context.sampled:
            return
        outbound = rec.reporter == "source"
        name = f"{'connect' if outbound else 'inbound'} {rec.destination_service}"
        self.tracer.finish(
            rec.trace,
            name,
            KIND_CLIENT if outbound else KIND_SERVER,
            rec.span_attributes(sent, received, flags),
            STATUS_ERROR if error else 0,
            error or "",
        )

    def _log(self, rec: ConnectionRecord, *, sent: int, received: int, error: str | None, flags: str) -> None:
        if not self.access_log:
            return
        log.info(
            "connection complete" if error is None else "connection failed",
            extra={
                **rec.log_fields(),
                "bytes_sent": sent,
                "bytes_recv": received,
                "duration_ms": round((time.monotonic() - rec.started) * 1000, 1),
                "response_flags": flags,
                "security": rec.security,
                "error": error,
                **({"dry_run": rec.dry_run} if rec.dry_run else {}),
            },
        )


# ---- HTTP requests (waypoint) -------------------------------------------------------------------


@dataclass
class RequestRecord:
    """What a waypoint knows about one HTTP request, filled in as it goes."""

    src: str
    method: str
    path: str
    authority: str
    protocol: str = "HTTP/1.1"
    source_identity: SpiffeId | None = None
    destination_identity: SpiffeId | None = None
    source: WorkloadLabels | None = None  # None: derived from source_identity
    destination: WorkloadLabels = UNKNOWN_WORKLOAD
    destination_service: str = UNKNOWN
    upstream: str | None = None  # the endpoint's address (workload ip:port)
    route: str | None = None
    response_code: int = 0
    grpc: bool = False  # a gRPC request (content-type application/grpc): request_protocol "grpc"
    grpc_status: str = ""  # its grpc-status, from the trailers (or a trailers-only answer); "" if none
    response_flags: list[str] = field(default_factory=list)
    request_bytes: int = 0
    response_bytes: int = 0
    attempts: int = 0
    trace_id: str | None = None
    trace: SpanStart | None = None  # the request's server span, when tracing records one
    upstream_cluster: str = ""  # Istio's name for the destination: outbound|PORT||SERVICE
    request_id: str | None = None
    user_agent: str | None = None
    error: str | None = None
    dry_run: str | None = None  # what dry-run policies would have decided: "policy=deny,..." (dry_run.py)
    started: float = field(default_factory=time.monotonic)
    wasm_failures: list[tuple[str, str]] = field(default_factory=list)  # (filter, reason), counted once

    @property
    def flags(self) -> str:
        return ",".join(self.response_flags) or "-"

    def labels(self) -> tuple[str, ...]:
        source = self.source if self.source is not None else WorkloadLabels.of_identity(self.source_identity)
        return (
            *_istio_labels(
                "waypoint",
                source,
                self.source_identity,
                self.destination,
                self.destination_identity,
                self.destination_service,
                "grpc" if self.grpc else "http",
            ),
            str(self.response_code),
            self.grpc_status,
            self.flags,
            "mutual_tls",
        )

    def to_json(self, duration_ms: float) -> dict[str, object]:
        """The access-log fields (also given to filters' `on_log` and the `meshd_access_log` hook)."""
        return {
            "reporter": "waypoint",
            "src.addr": self.src,
            "src.workload": (self.source or WorkloadLabels.of_identity(self.source_identity)).workload,
            "src.identity": self.source_identity.uri if self.source_identity else None,
            "method": self.method,
            "path": self.path,
            "authority": self.authority,
            "protocol": self.protocol,
            "route": self.route,
            "dst.service": self.destination_service,
            "dst.workload": self.destination.workload,
            "dst.identity": self.destination_identity.uri if self.destination_identity else None,
            "upstream": self.upstream,
            "response_code": self.response_code,
            "grpc_status": self.grpc_status or None,
            "response_flags": self.flags,
            "bytes_recv": self.request_bytes,
            "bytes_sent": self.response_bytes,
            "duration_ms": duration_ms,
            "attempts": self.attempts,
            "trace_id": self.trace_id,
            "request_id": self.request_id,
            "user_agent": self.user_agent,
            "error": self.error,
            **({"dry_run": self.dry_run} if self.dry_run else {}),
        }

    def span_attributes(self) -> dict[str, AttributeValue]:
        """The waypoint's server span: Istio's (Envoy's) tracing attribute names."""
        source = self.source if self.source is not None else WorkloadLabels.of_identity(self.source_identity)
        attrs: dict[str, AttributeValue] = {
            "component": "proxy",
            "http.method": self.method,
            "http.url": f"http://{self.authority}{self.path}",
            "http.protocol": self.protocol,
            "http.status_code": self.response_code,
            "response_flags": self.flags,
            "upstream_cluster": self.upstream_cluster,
            "upstream_cluster.name": self.upstream_cluster,
            "upstream.address": self.upstream or "",
            "peer.address": self.src,
            "source.workload": source.workload,
            "source.principal": self.source_identity.uri if self.source_identity else UNKNOWN,
            "destination.service": self.destination_service,
            "destination.workload": self.destination.workload,
            "destination.principal": self.destination_identity.uri if self.destination_identity else UNKNOWN,
            "request_size": self.request_bytes,
            "response_size": self.response_bytes,
            "meshd.attempts": self.attempts,
        }
        if self.route:
            attrs["meshd.route"] = self.route
        if self.request_id:
            attrs["guid:x-request-id"] = self.request_id
        if self.user_agent:
            attrs["user_agent"] = self.user_agent
        if self.grpc:
            attrs["grpc.status_code"] = self.grpc_status
        return attrs


_MAX_CACHED_SERIES = 10_000


class _RequestSeries(NamedTuple):
    requests: Counter
    duration: Histogram
    request_bytes: Histogram
    response_bytes: Histogram


class RequestTelemetry:
    """Istio's HTTP metrics and one access-log line per request (and its span, when traced)."""

    def __init__(self, metrics: Metrics, *, access_log: bool, tracer: Tracer | None = None) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self.tracer = tracer
        # The four series of each label set, looked up once: prometheus_client's labels() costs ~2 us a
        # call (it converts and checks every one of the 25 values), four times a request.
        self._series: dict[tuple[str, ...], _RequestSeries] = {}

    def _series_of(self, labels: tuple[str, ...]) -> _RequestSeries:
        series = self._series.get(labels)
        if series is None:
            if len(self._series) >= _MAX_CACHED_SERIES:
                self._series.clear()  # the series stay in the registry; only the shortcut is dropped
            m = self.metrics
            series = self._series[labels] = _RequestSeries(
                m.requests.labels(*labels),
                m.request_duration.labels(*labels),
                m.request_bytes.labels(*labels),
                m.response_bytes.labels(*labels),
            )
        return series

    def finished(self, rec: RequestRecord, *, want_record: bool = True) -> dict[str, object] | None:
        """Count the request and log it; returns the access-log record (None if it was not wanted
        and the access log is off: nobody reads it then, and building it is per-request work)."""
        duration_ms = (time.monotonic() - rec.started) * 1000
        series = self._series_of(rec.labels())
        series.requests.inc()
        series.duration.observe(duration_ms)
        series.request_bytes.observe(rec.request_bytes)
        series.response_bytes.observe(rec.response_bytes)
        m = self.metrics
        for filter_name, reason in rec.wasm_failures:
            m.wasm_failures.labels(filter_name, reason).inc()
        record = rec.to_json(round(duration_ms, 1)) if want_record or self.access_log else None
        if record is not None and self.access_log:
            log.info("request complete" if rec.error is None else "request failed", extra=record)
        if rec.trace is not None and self.tracer is not None and rec.trace.context.sampled:
            failed = rec.error is not None or rec.response_code >= 500
            self.tracer.finish(
                rec.trace,
                f"{rec.method} {rec.destination_service}",
                KIND_SERVER,
                rec.span_attributes(),
                STATUS_ERROR if failed else 0,
                rec.error or "",
            )
        return record
