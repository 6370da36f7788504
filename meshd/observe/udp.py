"""UDP flow telemetry: the UDP counterparts of Istio's TCP metrics, drops, and one access-log line per flow.

A flow is what a TCP connection is for TCP: one client (address, port) talking to one service port,
carried by one connect-udp stream. Labels are Istio's TCP labels (metrics.TCP_LABELS) with
request_protocol "udp", so a dashboard's TCP panels work with the metric name changed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from meshd.observe.accesslog import ConnectionRecord
from meshd.observe.metrics import FAILED_LABELS, TCP_LABELS, Metrics

log = logging.getLogger("meshd.access")

# Why a datagram was dropped (the `reason` label of meshd_udp_dropped_packets_total).
DROP_FLOW_LIMIT = "flow_limit"  # no flow for a new client: max_flows or max_flows_per_client reached
DROP_QUEUE_FULL = "queue_full"  # the flow's queue was full (the tunnel or the workload is slower)
DROP_SOCKET_FULL = "socket_full"  # the kernel refused the datagram (socket buffer full)
DROP_FLOW_FAILED = "flow_failed"  # queued for a flow whose tunnel could not be opened
DROP_TOO_LARGE = "too_large"  # a datagram the socket could not send (EMSGSIZE)
DROP_REFUSED = "refused"  # the destination's port is closed (ICMP port unreachable on an earlier send)
DROP_UNKNOWN_CONTEXT = "unknown_context"  # a DATAGRAM capsule for a context id other than 0


@dataclass
class FlowCounters:
    """Datagrams and payload bytes of one flow. `sent` = towards the client side, `received` = from it
    (as Istio's istio_tcp_sent_bytes / istio_tcp_received_bytes)."""

    sent_packets: int = 0
    sent_bytes: int = 0
    received_packets: int = 0
    received_bytes: int = 0
    dropped: int = 0
    last_active: float = 0.0  # trio's clock: set when the flow starts and by every datagram

    def from_client(self, size: int, now: float) -> None:
        self.received_packets += 1
        self.received_bytes += size
        self.last_active = now

    def to_client(self, size: int, now: float) -> None:
        self.sent_packets += 1
        self.sent_bytes += size
        self.last_active = now


class UdpMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.opened = Counter("meshd_udp_flows_opened", "UDP flows opened", TCP_LABELS, registry=r)
        self.closed = Counter("meshd_udp_flows_closed", "UDP flows closed", TCP_LABELS, registry=r)
        self.sent_bytes = Counter(
            "meshd_udp_sent_bytes", "UDP payload bytes sent to the client side", TCP_LABELS, registry=r
        )
        self.received_bytes = Counter(
            "meshd_udp_received_bytes",
            "UDP payload bytes received from the client side",
            TCP_LABELS,
            registry=r,
        )
        self.sent_packets = Counter(
            "meshd_udp_sent_packets", "datagrams sent to the client side", TCP_LABELS, registry=r
        )
        self.received_packets = Counter(
            "meshd_udp_received_packets", "datagrams received from the client side", TCP_LABELS, registry=r
        )
        self.failed = Counter(
            "meshd_udp_flows_failed",
            "UDP flows refused or failed before a datagram passed",
            FAILED_LABELS,
            registry=r,
        )
        self.dropped = Counter(
            "meshd_udp_dropped_packets",
            "datagrams dropped by meshd, by reporter and reason",
            ("reporter", "reason"),
            registry=r,
        )
        self.active = Gauge("meshd_udp_flows_active", "UDP flows open now", ("reporter",), registry=r)


FLUSH_INTERVAL = 5.0  # seconds between updates of a live flow's byte and packet counters


class FlowMeter:
    """The metric children of one flow, and what of its counters they already hold: a long-lived
    flow (WireGuard, a game) shows up in the byte and packet counters while it lasts, not at its end."""

    def __init__(self, metrics: UdpMetrics, labels: tuple[str, ...]) -> None:
        self._children = (
            metrics.sent_bytes.labels(*labels),
            metrics.received_bytes.labels(*labels),
            metrics.sent_packets.labels(*labels),
            metrics.received_packets.labels(*labels),
        )
        self._flushed = (0, 0, 0, 0)

    def flush(self, c: FlowCounters) -> None:
        now = (c.sent_bytes, c.received_bytes, c.sent_packets, c.received_packets)
        for child, new, old in zip(self._children, now, self._flushed, strict=True):
            if new != old:
                child.inc(new - old)
        self._flushed = now


class UdpTelemetry:
    def __init__(self, metrics: Metrics, *, access_log: bool) -> None:
        self.metrics = UdpMetrics(metrics)
        self.access_log = access_log

    def opened(self, rec: ConnectionRecord) -> FlowMeter:
        """Count the flow open; returns its meter (`flush` it now and then; `closed` does at the end)."""
        rec.opened = True
        labels = rec.labels()
        self.metrics.opened.labels(*labels).inc()
        self.metrics.active.labels(rec.reporter).inc()
        return FlowMeter(self.metrics, labels)

    def closed(
        self,
        rec: ConnectionRecord,
        meter: FlowMeter,
        counters: FlowCounters,
        reason: str,
        error: str | None = None,
    ) -> None:
        meter.flush(counters)
        self.metrics.closed.labels(*rec.labels()).inc()
        self.metrics.active.labels(rec.reporter).dec()
        self._log(rec, counters, "-", reason, error)

    def failed(self, rec: ConnectionRecord, flag: str, reason: str) -> None:
        self.metrics.failed.labels(*rec.failed_labels(flag)).inc()
        self._log(rec, FlowCounters(), flag, "refused", reason)

    def dropped(self, reporter: str, reason: str, count: int = 1) -> None:
        self.metrics.dropped.labels(reporter, reason).inc(count)

    def _log(self, rec: ConnectionRecord, c: FlowCounters, flags: str, ended: str, error: str | None) -> None:
        if not self.access_log:
            return
        log.info(
            "udp flow complete" if error is None else "udp flow failed",
            extra={
                **rec.log_fields(),
                "protocol": "udp",
                "bytes_sent": c.sent_bytes,
                "bytes_recv": c.received_bytes,
                "packets_sent": c.sent_packets,
                "packets_recv": c.received_packets,
                "packets_dropped": c.dropped,
                "duration_ms": round((time.monotonic() - rec.started) * 1000, 1),
                "ended": ended,
                "response_flags": flags,
                "security": rec.security,
                "error": error,
            },
        )
