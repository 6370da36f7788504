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
    source_workload: str = "unknown"
    source_namespace: str = "unknown"
    destination_workload: str = "unknown"
    destination_namespace: str = "unknown"
    destination_service: str = "unknown"
    security: str = "mutual_tls"
    started: float = field(default_factory=time.monotonic)
    opened: bool = False

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
