"""Node outbound: one listener per `[[upstream]]`; each connection is tunnelled to an endpoint of the
service over pooled HBONE, as the upstream's source identity.

Endpoint choice: round robin over the service's endpoints, skipping ones ejected after a connect
failure (for a growing time); a failed connect is retried on the next endpoint. A policy refusal
(401) is final: another endpoint would say the same.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from meshd.balance import ConnectBackoff, RoundRobin
from meshd.config.model import UpstreamConfig
from meshd.dataplane.proxied import Refused, proxied
from meshd.dataplane.state import NodeState
from meshd.discovery.catalog import Endpoint
from meshd.discovery.hostnames import service_hostname
from meshd.discovery.vip import VipIndex
from meshd.hbone.errors import HboneConnectError, PeerIdentityError, TunnelRefused
from meshd.hbone.pool import HbonePool
from meshd.hbone.stream import TunnelStream
from meshd.identity.spiffe import SpiffeId
from meshd.listeners import open_listeners, peer_of, per_connection
from meshd.node.tcp import TcpStream
from meshd.observe.accesslog import (
    FLAG_NO_HEALTHY,
    FLAG_NO_ROUTE,
    FLAG_UNAUTHORIZED,
    FLAG_UPSTREAM_CONNECT,
    ConnectionRecord,
    WorkloadLabels,
    source_of,
)
from meshd.observe.tracecontext import trace_header
from meshd.units import Address

log = logging.getLogger("meshd.outbound")

EJECT_BASE = 1.0
EJECT_MAX = 30.0


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
    """Round robin per service port, endpoints whose connect failed lately last. Pure: the clock is
    passed in."""

    def __init__(self) -> None:
        self.health: ConnectBackoff[Endpoint] = ConnectBackoff(EJECT_BASE, EJECT_MAX)
        self._rotation: dict[str, RoundRobin[Endpoint]] = {}

    def candidates(self, key: str, endpoints: list[Endpoint], now: float) -> list[Endpoint]:
        """Round-robin order starting after the last pick; healthy endpoints first, ejected ones last."""
        order = self._rotation.setdefault(key, RoundRobin()).rotation(endpoints)
        return self.health.healthy_first(order, now)


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
            try:
                tunnel = await self.open_tunnel(rec, source, up, f"{peer[0]}:{peer[1]}")
            except Refused as refused:  # the client is plain TCP: counted and logged, then closed
                self.state.telemetry.failed(rec, refused.flag or "-", refused.reason)
                return
            async with tunnel:
                await proxied(self.state, rec, client, tunnel)

    async def open_tunnel(
        self,
        rec: ConnectionRecord,
        source: SpiffeId,
        up: UpstreamConfig,
        client: str,
        *,
        udp: bool = False,
    ) -> TunnelStream:
        """A tunnel to the first endpoint that takes it (healthy ones first; connect-udp with `udp`),
        or Refused: NR with nowhere to go, UAEX when a destination's policy refused the client (no
        other endpoint is tried: they share the policy), UH (UF for a UDP flow) when every endpoint
        failed. Waypoints carry HTTP, not datagrams: a UDP flow goes to the workloads themselves,
        authorized (L4) by their node."""
        if udp:
            endpoints = self.state.catalog.endpoints(up.service_key, up.port)
            why = f"no endpoint for {up.service_key}:{up.port} in the catalog"
        else:
            endpoints, why = self.endpoints(up.service_key, up.port)
        if not endpoints:
            raise Refused(503, FLAG_NO_ROUTE, why)
        last_error = "no endpoint tried"
        for ep in self.picker.candidates(f"{up.service_key}:{up.port}", endpoints, time.monotonic()):
            rec.destination_identity = ep.identity
            rec.destination = WorkloadLabels.of(ep.workload, self.state.config.trust_domain)
            rec.peer = str(ep.dial)
            started = time.monotonic()
            headers = [
                ("forwarded", f'for="{client}"'),
                ("baggage", _baggage(source)),
                *trace_header(rec.trace),
            ]
            remote = ep.workload.network != self.state.catalog.network
            try:
                if udp and remote:
                    raise HboneConnectError(
                        f"{ep.workload.key} is in network {ep.workload.network!r}: UDP flows do not cross "
                        "networks (a gateway carries TCP HBONE only)"
                    )
                if udp:
                    target = Address.parse(ep.authority)
                    tunnel = await self.pool.open_udp_tunnel(
                        source, ep.identity, (ep.dial.host, ep.dial.port), (target.host, target.port), headers
                    )
                elif remote:
                    tunnel = await self.through_gateway(
                        rec, source, ep, headers, service=(up.service_key, up.port)
                    )
                else:
                    tunnel = await self.pool.open_tunnel(
                        source, ep.identity, (ep.dial.host, ep.dial.port), ep.authority, headers=headers
                    )
            except TunnelRefused as exc:
                last_error = f"{exc.status} from {ep.dial}: {exc.reason}"
                if exc.status == 401:
                    raise Refused(401, FLAG_UNAUTHORIZED, last_error) from None
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
            return tunnel
        raise Refused(503, FLAG_UPSTREAM_CONNECT if udp else FLAG_NO_HEALTHY, last_error)

    async def through_gateway(
        self,
        rec: ConnectionRecord,
        source: SpiffeId,
        ep: Endpoint,
        headers: list[tuple[str, str]],
        *,
        service: tuple[str, int] | None = None,
    ) -> TunnelStream:
        """Double HBONE to an endpoint in another network: an outer tunnel to that network's gateway,
        as this node's identity, and inside it the inner HBONE connection to the endpoint's node, as
        `source`, verified end to end, plus `x-forwarded-network` (docs/hbone.md, "Double HBONE").

        To a service (key, service port) both CONNECTs name it as ztunnel does, waypoint or not:
        `:authority` `<name>.<namespace>.svc.cluster.local:<service port>`, `forwarded:
        for="...";host=<that name>`; the gateway picks the endpoint, so the inner TLS accepts any
        identity serving the service in the networks that gateway fronts (ztunnel checks the
        service's SANs); for a service bound to a waypoint, the waypoint's identity (`ep`). Without a
        service both name the address: the workload's `ip:port` outside (or its node's HBONE
        endpoint), the CONNECT it would get in its own network inside. Raises what `open_tunnel`
        raises."""
        network = ep.workload.network
        gateways = self.state.catalog.gateways_for(network)
        if not gateways:
            raise HboneConnectError(f"no gateway fronts network {network!r} (is its gateway in the catalog?)")
        gateway = gateways[0]
        assert gateway.gateway is not None and gateway.gateway.public is not None  # see gateways_for
        public = gateway.gateway.public
        rec.peer = str(public)
        expected: SpiffeId | frozenset[SpiffeId] = ep.identity
        if service is not None:
            hostname = service_hostname(service[0])
            outer_authority = inner_authority = f"{hostname}:{service[1]}"
            headers = ztunnel_headers(headers, hostname)
            svc = self.state.catalog.services.get(service[0])
            if svc is None or svc.waypoint is None:
                fronted = {network, *gateway.gateway.networks}  # the gateway picks among all of these
                expected = frozenset(
                    e.identity
                    for e in self.state.catalog.endpoints(*service)
                    if e.workload.network in fronted
                )
        else:
            ip = ep.authority.rsplit(":", 1)[0].strip("[]")
            outer_authority = ep.authority if ip == ep.workload.address else str(ep.dial)
            inner_authority = ep.authority
        outer = await self.pool.open_tunnel(
            self.state.node_identity, gateway.identity, (public.host, public.port), outer_authority, headers
        )
        return await self.pool.open_nested_tunnel(
            outer,
            source,
            expected,
            inner_authority,
            [*headers, (FORWARDED_NETWORK_HEADER, self.state.catalog.network)],
            peer_address=(ep.dial.host, ep.dial.port),
        )


def ztunnel_headers(headers: list[tuple[str, str]], hostname: str) -> list[tuple[str, str]]:
    """The CONNECT headers in ztunnel's order (`create_hbone_request`: baggage, forwarded,
    traceparent), `forwarded` with the `;host=<service hostname>` ztunnel adds when it knows the
    service (`build_forwarded`)."""
    baggage = [(k, v) for k, v in headers if k == "baggage"]
    forwarded = [(k, f"{v};host={hostname}") for k, v in headers if k == "forwarded"]
    return [*baggage, *forwarded, *((k, v) for k, v in headers if k not in ("baggage", "forwarded"))]


FORWARDED_NETWORK_HEADER = "x-forwarded-network"  # ztunnel's, on the inner CONNECT of double HBONE


def _baggage(source: SpiffeId) -> str:
    return f"k8s.namespace.name={source.namespace},service.name={source.service_account}"
