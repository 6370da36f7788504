"""Admission: an HBONE CONNECT to the waypoint -> the `Tunnel` it serves, or a `Refused`.

Must never know: HTTP inside the tunnel, routes, endpoints. Pure over the catalog (ztunnel's
`build_inbound_request`): the caller answers a `Refused` once, where the tunnel's reply is written.

A tunnel is admitted when its `:authority` is the VIP:port of a service bound to this waypoint, or
that service's hostname and port (`<name>.<namespace>.svc.cluster.local:<port>`, as ztunnel's double
HBONE names it through a gateway: meshd/discovery/hostnames.py).
A hairpin claim (hairpin.py) makes the tunnel the claimed client's, pinned to the workload it dialled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshd.dataplane.proxied import Refused
from meshd.discovery.catalog import Catalog, ServiceEntry, ServicePortEntry, WorkloadEntry
from meshd.discovery.hostnames import hostname_hint, service_key_of
from meshd.discovery.vip import VipIndex
from meshd.hbone.server import InboundRequest
from meshd.hbone.target import HostnameTarget
from meshd.identity.spiffe import SpiffeId
from meshd.observe.accesslog import (
    FLAG_NO_ROUTE,
    FLAG_UNAUTHORIZED,
    UNKNOWN_WORKLOAD,
    WorkloadLabels,
    source_of,
)
from meshd.observe.tracecontext import SpanContext, extract
from meshd.policy.evaluate import ConnectionAttrs
from meshd.units import Address
from meshd.waypoint.hairpin import SOURCE_HEADER, TARGET_HEADER, HairpinRefused, accept_claim


@dataclass(frozen=True, eq=False)
class Tunnel:
    """One client tunnel to a service bound to this waypoint."""

    source: SpiffeId
    source_address: str  # the client node's IP (policy ip_blocks)
    src: str  # the original client ip:port (forwarded header), for logs
    service: ServiceEntry
    port: ServicePortEntry
    vip: str
    pinned: tuple[str, int] | None = None  # hairpin: the workload ip:port the client dialled, the only target
    source_labels: WorkloadLabels = UNKNOWN_WORKLOAD  # the client as telemetry labels it
    peer: str | None = None  # the node that opened the tunnel, ip:port
    trace_parent: SpanContext | None = None  # the CONNECT's trace context (the client node's span)
    # Per-tunnel values computed once, not per request.
    default_authority: str = field(init=False)
    upstream_headers: tuple[tuple[str, str], ...] = field(init=False)
    _attrs: dict[tuple[str, int], ConnectionAttrs] = field(init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "default_authority", f"{self.vip}:{self.port.port}")
        # Headers of the tunnels this client's requests take upstream (informational at the node).
        set_(
            self,
            "upstream_headers",
            (("forwarded", f'for="{self.src}"'), ("baggage", f"source.principal={self.source.uri}")),
        )
        set_(self, "_attrs", {})

    def connection_attrs(self, w: WorkloadEntry | None, port: int) -> ConnectionAttrs:
        """What L4 authorization sees of this tunnel towards workload `w` (None: the service VIP)."""
        key = (w.key if w is not None else "", port)
        attrs = self._attrs.get(key)
        if attrs is None:
            attrs = self._attrs[key] = ConnectionAttrs(
                source=self.source,
                source_ip=self.source_address,
                destination_ip=w.address if w is not None else self.vip,
                destination_port=port,
                workload_namespace=w.namespace if w is not None else self.service.namespace,
                workload_name=w.name if w is not None else "",
                workload_labels=w.label_map if w is not None else {},
            )
        return attrs


def admit(req: InboundRequest, catalog: Catalog, vips: VipIndex, me: str) -> Tunnel:
    """The tunnel a CONNECT asks for; raises Refused (400 bad request, 503 not ours, 401 bad hairpin)."""
    table = vips.table(catalog.services)[0]
    dest = req.destination
    if isinstance(req.target, HostnameTarget):
        # ztunnel's double HBONE names the service through a gateway, waypoint or not.
        key = service_key_of(req.target.hostname)
        if key is None:
            raise Refused(
                400,
                None,
                f"CONNECT authority {req.authority!r} is not ip:port nor a service {hostname_hint()}",
            )
        vip = table.vip(key)
        if key not in catalog.services or vip is None:
            raise Refused(
                503, FLAG_NO_ROUTE, f"no service {key} this waypoint knows (CONNECT {req.authority})"
            )
        dest = (vip, req.target.port)
    if dest is None:
        raise Refused(400, None, f"CONNECT authority {req.authority!r} is not ip:port")
    ip, port = dest
    key = table.service(ip)
    svc = catalog.services.get(key) if key is not None else None
    if svc is None:
        raise Refused(503, FLAG_NO_ROUTE, f"{req.authority} is not a service VIP this waypoint knows")
    if svc.waypoint != me:
        raise Refused(503, FLAG_NO_ROUTE, f"service {svc.key} is not bound to waypoint {me!r}")
    sp = svc.port(port)
    if sp is None:
        raise Refused(503, FLAG_NO_ROUTE, f"service {svc.key} has no port {port}")
    try:
        claim = accept_claim(
            catalog, req.peer_identity, svc, sp, req.header(SOURCE_HEADER), req.header(TARGET_HEADER)
        )
    except HairpinRefused as exc:
        raise Refused(401, FLAG_UNAUTHORIZED, f"hairpin refused: {exc}") from None
    # claim: a destination node sent back a client that dialled its workload directly.
    source = req.peer_identity if claim is None else claim.source
    return Tunnel(
        source,
        req.peer_address[0],
        req.client_address,
        svc,
        sp,
        ip,
        None if claim is None else claim.target,
        source_of(catalog, source, req.client_address),
        str(Address(*req.peer_address)),
        extract(req.header),
    )
