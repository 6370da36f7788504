"""One access-log line per proxied connection, plus the Istio TCP metrics for it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from meshd.identity.spiffe import SpiffeId
from meshd.observe.metrics import Metrics

log = logging.getLogger("meshd.access")

# Istio response flags used at L4.
FLAG_UNAUTHORIZED = "UAEX"  # denied by authorization policy ("unauthorized external")
FLAG_NO_ROUTE = "NR"  # no workload/port, no endpoint
FLAG_UPSTREAM_CONNECT = "UF"  # upstream connection failure
FLAG_NO_HEALTHY = "UH"  # no healthy upstream


@dataclass
class ConnectionRecord:
    """What a node knows about one proxied connection, filled in as it goes."""

    reporter: str  # "source" (outbound) or "destination" (inbound)
    src: str
    dst: str
    source_identity: SpiffeId | None = None
    destination_identity: SpiffeId | None = None
    destination_workload: str = "unknown"
    destination_namespace: str = "unknown"
    destination_service: str = "unknown"
    security: str = "mutual_tls"
    started: float = field(default_factory=time.monotonic)
    opened: bool = False

    @property
    def source_workload(self) -> str:
        """Istio's source_workload label: the client identity's service account (no pod names here)."""
        return self.source_identity.service_account if self.source_identity else "unknown"

    @property
    def source_namespace(self) -> str:
        return self.source_identity.namespace if self.source_identity else "unknown"

    def labels(self, flags: str = "-") -> tuple[str, ...]:
        return (
            self.reporter,
            self.source_workload,
            self.source_namespace,
            self.source_identity.uri if self.source_identity else "unknown",
            self.destination_workload,
            self.destination_namespace,
            self.destination_identity.uri if self.destination_identity else "unknown",
            self.destination_service,
            flags,
            self.security,
        )


class ConnectionTelemetry:
    def __init__(self, metrics: Metrics, *, access_log: bool) -> None:
        self.metrics = metrics
        self.access_log = access_log

    def opened(self, rec: ConnectionRecord) -> None:
        rec.opened = True
        self.metrics.tcp_opened.labels(*rec.labels()).inc()

    def closed(self, rec: ConnectionRecord, *, sent: int, received: int, error: str | None = None) -> None:
        labels = rec.labels()
        self.metrics.tcp_closed.labels(*labels).inc()
        self.metrics.tcp_sent.labels(*labels).inc(sent)
        self.metrics.tcp_received.labels(*labels).inc(received)
        self._log(rec, sent=sent, received=received, error=error, flags="-")

    def failed(self, rec: ConnectionRecord, flag: str, reason: str) -> None:
        """A connection refused or failed before any byte was proxied."""
        self.metrics.tcp_failed.labels(rec.reporter, flag).inc()
        self._log(rec, sent=0, received=0, error=reason, flags=flag)

    def _log(self, rec: ConnectionRecord, *, sent: int, received: int, error: str | None, flags: str) -> None:
        if not self.access_log:
            return
        log.info(
            "connection complete" if error is None else "connection failed",
            extra={
                "reporter": rec.reporter,
                "src.addr": rec.src,
                "dst.addr": rec.dst,
                "src.identity": rec.source_identity.uri if rec.source_identity else None,
                "dst.identity": rec.destination_identity.uri if rec.destination_identity else None,
                "dst.service": rec.destination_service,
                "dst.workload": rec.destination_workload,
                "bytes_sent": sent,
                "bytes_recv": received,
                "duration_ms": round((time.monotonic() - rec.started) * 1000, 1),
                "response_flags": flags,
                "security": rec.security,
                "error": error,
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
    destination_workload: str = "unknown"
    destination_namespace: str = "unknown"
    destination_service: str = "unknown"
    upstream: str | None = None  # the endpoint's address (workload ip:port)
    route: str | None = None
    response_code: int = 0
    response_flags: list[str] = field(default_factory=list)
    request_bytes: int = 0
    response_bytes: int = 0
    attempts: int = 0
    trace_id: str | None = None
    request_id: str | None = None
    user_agent: str | None = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def flags(self) -> str:
        return ",".join(self.response_flags) or "-"

    def labels(self) -> tuple[str, ...]:
        src = self.source_identity
        name, _, ns = self.destination_service.partition(".")
        return (
            "waypoint",
            src.service_account if src else "unknown",
            src.namespace if src else "unknown",
            src.uri if src else "unknown",
            self.destination_workload,
            self.destination_namespace,
            self.destination_identity.uri if self.destination_identity else "unknown",
            self.destination_service,
            name or "unknown",
            ns or "unknown",
            "http",
            str(self.response_code),
            self.flags,
            "mutual_tls",
        )

    def to_json(self, duration_ms: float) -> dict[str, object]:
        """The access-log fields (also given to filters' `on_log` and the `meshd_access_log` hook)."""
        return {
            "reporter": "waypoint",
            "src.addr": self.src,
            "src.identity": self.source_identity.uri if self.source_identity else None,
            "method": self.method,
            "path": self.path,
            "authority": self.authority,
            "protocol": self.protocol,
            "route": self.route,
            "dst.service": self.destination_service,
            "dst.workload": self.destination_workload,
            "dst.identity": self.destination_identity.uri if self.destination_identity else None,
            "upstream": self.upstream,
            "response_code": self.response_code,
            "response_flags": self.flags,
            "bytes_recv": self.request_bytes,
            "bytes_sent": self.response_bytes,
            "duration_ms": duration_ms,
            "attempts": self.attempts,
            "trace_id": self.trace_id,
            "request_id": self.request_id,
            "user_agent": self.user_agent,
            "error": self.error,
        }


class RequestTelemetry:
    """Istio's HTTP metrics and one access-log line per request."""

    def __init__(self, metrics: Metrics, *, access_log: bool) -> None:
        self.metrics = metrics
        self.access_log = access_log

    def finished(self, rec: RequestRecord) -> dict[str, object]:
        """Count the request and log it; returns the access-log record."""
        duration_ms = (time.monotonic() - rec.started) * 1000
        labels = rec.labels()
        m = self.metrics
        m.requests.labels(*labels).inc()
        m.request_duration.labels(*labels).observe(duration_ms)
        m.request_bytes.labels(*labels).observe(rec.request_bytes)
        m.response_bytes.labels(*labels).observe(rec.response_bytes)
        record = rec.to_json(round(duration_ms, 1))
        if self.access_log:
            log.info("request complete" if rec.error is None else "request failed", extra=record)
        return record
