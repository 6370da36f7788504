"""Node outbound: one listener per `[[upstream]]`; each connection is tunnelled to an endpoint of the
service over pooled HBONE, as the upstream's source identity.

Endpoint choice: round robin over the service's endpoints, skipping ones ejected after a connect
failure (for a growing time); a failed connect is retried on the next endpoint. A policy refusal
(401) is final: another endpoint would say the same.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from meshd.capture.vip import VipIndex
from meshd.config.model import UpstreamConfig
from meshd.discovery.catalog import Endpoint
from meshd.hbone.errors import HboneConnectError, PeerIdentityError, TunnelRefused
from meshd.hbone.pool import HbonePool
from meshd.hbone.stream import TunnelStream
from meshd.identity.spiffe import SpiffeId
from meshd.listeners import open_listeners, peer_of, per_connection
from meshd.node.pump import pump
from meshd.node.state import NodeState
from meshd.node.tcp import TcpStream
from meshd.observe.accesslog import (
    FLAG_NO_HEALTHY,
    FLAG_NO_ROUTE,
    FLAG_UNAUTHORIZED,
    ConnectionRecord,
    WorkloadLabels,
    source_of,
)
from meshd.observe.tracecontext import trace_header

log = logging.getLogger("meshd.outbound")

EJECT_BASE = 1.0
EJECT_MAX = 30.0


@dataclass
class _Ejection:
    until: float = 0.0
    failures: int = 0


@dataclass
class EndpointHealth:
    """Connect-failure ejection per endpoint: 1 s, 2 s, 4 s ... up to 30 s; a success resets it."""

    ejected: dict[tuple[str, str, int], _Ejection] = field(default_factory=dict)

    def healthy(self, ep: Endpoint, now: float) -> bool:
        e = self.ejected.get(ep.key)
        return e is None or e.until <= now

    def failed(self, ep: Endpoint, now: float) -> None:
        e = self.ejected.setdefault(ep.key, _Ejection())
        e.failures += 1
        # The exponent is capped: 2 ** 1024 does not fit a float (OverflowError after 1025 failures).
        e.until = now + min(EJECT_BASE * 2 ** min(e.failures - 1, 32), EJECT_MAX)

    def succeeded(self, ep: Endpoint) -> None:
        self.ejected.pop(ep.key, None)


def source_identity(state: NodeState, up: UpstreamConfig) -> SpiffeId:
    cfg = state.config
    if up.workload is not None:
        w = next(w for w in cfg.workloads if w.name == up.workload)
    elif len(cfg.workloads) == 1:
        w = cfg.workloads[0]
    else:
        return state.node_identity
    return SpiffeId(cfg.trust_domain, w.namespace, w.sa)


class EndpointPicker:
    """Round robin per service port, healthy endpoints first. Pure: the clock is passed in."""

    def __init__(self) -> None:
        self.health = EndpointHealth()
        self._next: dict[str, int] = {}

    def candidates(self, key: str, endpoints: list[Endpoint], now: float) -> list[Endpoint]:
        """Round-robin order starting after the last pick; healthy endpoints first, ejected ones last."""
        if not endpoints:
            return []
        start = self._next.get(key, 0) % len(endpoints)
        self._next[key] = start + 1
        ordered = endpoints[start:] + endpoints[:start]
        healthy = [e for e in ordered if self.health.healthy(e, now)]
        return healthy + [e for e in ordered if e not in healthy]


class Outbound:
    def __init__(self, state: NodeState, pool: HbonePool) -> None:
        self.state = state
        self.pool = pool
        self.picker = EndpointPicker()
        self.health = self.picker.health
        self.vips = VipIndex(state.config.capture.vip_range)

    def endpoints(self, service_key: str, port: int) -> tuple[list[Endpoint], str]:
        """Where tunnels for a service port go: its waypoint if it has one (`:authority` = the service
        VIP:port), else its endpoints. ([], why) if there is nowhere to go."""
        catalog = self.state.catalog
        svc = catalog.services.get(service_key)
        if svc is not None and svc.waypoint is not None:
            vip = self.vips.table(catalog.services)[0].vip(service_key)
            ep = catalog.waypoint_endpoint(service_key, port, vip) if vip else None
            if ep is None:
                return [], f"{service_key}:{port} uses waypoint {svc.waypoint!r}, which is not in the catalog"
            return [ep], ""
        endpoints = catalog.endpoints(service_key, port)
        return endpoints, "" if endpoints else f"no endpoint for {service_key}:{port} in the catalog"

    async def serve(
        self,
        up: UpstreamConfig,
        connections: trio.Nursery,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on the upstream's listener until cancelled. Connections run in `connections`, so
        cancelling the accept loop (drain, or a reload removing the upstream) does not cut them."""
        listeners = await open_listeners("[[upstream]] listen", up.listen, f"{up.service_key}:{up.port}")
        log.info(
            "upstream listening", extra={"listen": str(up.listen), "service": f"{up.service_key}:{up.port}"}
        )

        async def handle(stream: trio.SocketStream) -> None:
            await self.handle(stream, up)

        await trio.serve_listeners(
            per_connection(handle, "upstream"),
            listeners,
            handler_nursery=connections,
            task_status=task_status,
        )

    async def handle(self, accepted: trio.SocketStream, up: UpstreamConfig) -> None:
        peer = peer_of(accepted)
        async with TcpStream.adopt(accepted) as client:
            if peer is None:
                return
            source = source_identity(self.state, up)
            rec = ConnectionRecord(
                reporter="source",
                src=f"{peer[0]}:{peer[1]}",
                dst=f"{up.service_key}:{up.port}",
                source_identity=source,
                source=source_of(self.state.catalog, source, f"{peer[0]}:{peer[1]}"),
                destination_service=up.service_key,
            )
            if self.state.tracer.connection_spans:  # the root of the trace that follows the connection
                rec.trace = self.state.tracer.start(None)
            endpoints, why = self.endpoints(up.service_key, up.port)
            if not endpoints:
                self.state.telemetry.failed(rec, FLAG_NO_ROUTE, why)
                return
            tunnel, last_error = await self._open(rec, source, endpoints, up, f"{peer[0]}:{peer[1]}")
            if tunnel is None:
                flag = FLAG_UNAUTHORIZED if last_error.startswith("401") else FLAG_NO_HEALTHY
                self.state.telemetry.failed(rec, flag, last_error)
                return
            async with tunnel:
                self.state.telemetry.opened(rec)
                self.state.track_inflight(1)
                try:
                    result = await pump(client, tunnel)
                finally:
                    self.state.track_inflight(-1)
                self.state.telemetry.closed(
                    rec, sent=result.b_to_a, received=result.a_to_b, error=result.error
                )

    async def _open(
        self,
        rec: ConnectionRecord,
        source: SpiffeId,
        endpoints: list[Endpoint],
        up: UpstreamConfig,
        client: str,
    ) -> tuple[TunnelStream | None, str]:
        last_error = "no endpoint tried"
        for ep in self.picker.candidates(f"{up.service_key}:{up.port}", endpoints, time.monotonic()):
            rec.destination_identity = ep.identity
            rec.destination = WorkloadLabels.of(ep.workload, self.state.config.trust_domain)
            rec.peer = str(ep.dial)
            started = time.monotonic()
            try:
                tunnel = await self.pool.open_tunnel(
                    source,
                    ep.identity,
                    (ep.dial.host, ep.dial.port),
                    ep.authority,
                    headers=[
                        ("forwarded", f'for="{client}"'),
                        ("baggage", _baggage(source)),
                        *trace_header(rec.trace),
                    ],
                )
            except TunnelRefused as exc:
                last_error = f"{exc.status} from {ep.dial}: {exc.reason}"
                if exc.status == 401:
                    return None, last_error
                self.health.failed(ep, time.monotonic())
                continue
            except (HboneConnectError, PeerIdentityError) as exc:
                last_error = f"{ep.dial}: {exc}"
                log.warning(
                    "endpoint failed, trying the next", extra={"endpoint": str(ep.dial), "error": str(exc)}
                )
                self.health.failed(ep, time.monotonic())
                continue
            self.state.metrics.connect_duration.observe(time.monotonic() - started)
            self.health.succeeded(ep)
            return tunnel, ""
        return None, last_error


def _baggage(source: SpiffeId) -> str:
    return f"k8s.namespace.name={source.namespace},service.name={source.service_account}"
