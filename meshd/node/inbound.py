"""Node inbound (15008 and 15006): authorize, connect to the local workload, pump.

HBONE: the peer is already authenticated (mTLS, our trust domain) by HboneServer; this module
decides what its CONNECT may reach: the authority must be a local workload's ip:port (else 503), or a
service hostname:port (ztunnel's double HBONE: a local workload of that service is picked; else 400),
L4 authorization must allow it (else 401), and the workload must accept the connection (else 503).
A workload bound to a waypoint is reached only from that waypoint; any other HBONE client is
hairpinned: tunnelled on to the waypoint as our node identity (docs/waypoint.md, "Hairpin").
Plaintext (15006): no identity; only PERMISSIVE workloads, the destination taken from the
connection's original destination (capture) and L4 policy applied with no principal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from meshd.balance import RoundRobin
from meshd.dataplane.proxied import Refused, proxied
from meshd.dataplane.state import NodeState
from meshd.discovery.catalog import CATALOG_PATH, WorkloadEntry
from meshd.discovery.hostnames import hostname_hint, service_key_of
from meshd.discovery.vip import VipIndex
from meshd.hbone.errors import HboneConnectError, PeerIdentityError, TunnelRefused
from meshd.hbone.pool import HbonePool
from meshd.hbone.server import Handler, InboundRequest, ServerReply
from meshd.hbone.target import HostnameTarget
from meshd.identity.spiffe import SpiffeId
from meshd.listeners import open_listeners, original_destination, peer_of, per_connection
from meshd.node.tcp import TcpStream
from meshd.observe import dry_run
from meshd.observe.accesslog import (
    FLAG_NO_ROUTE,
    FLAG_UNAUTHORIZED,
    FLAG_UPSTREAM_CONNECT,
    ConnectionRecord,
    WorkloadLabels,
    source_of,
)
from meshd.observe.graph import CONTROL_PATHS
from meshd.observe.tracecontext import extract, trace_header
from meshd.policy.evaluate import ConnectionAttrs, authorize_connection, mtls_mode
from meshd.units import Address
from meshd.waypoint.hairpin import bound_service, claim_headers

log = logging.getLogger("meshd.inbound")

CONNECT_TIMEOUT = 5.0
CA_PATH_PREFIX = "/meshd/v1/ca/"  # meshd.ca_service.service


class Inbound:
    def __init__(self, state: NodeState, pool: HbonePool, vips: VipIndex) -> None:
        self.state = state
        self.pool = pool  # hairpin tunnels to waypoints
        self.vips = vips
        self.ca_handler: Handler | None = None  # the CA service's endpoints, on the CA host only
        self.udp_handler: Handler | None = None  # connect-udp streams (meshd.node.udp_inbound)
        # The dashboard's node-only GETs (graph.CONTROL_PATHS): (path, query) -> (status, JSON body).
        self.control: Callable[[str, str], tuple[int, bytes]] | None = None
        self._by_service: dict[str, RoundRobin[WorkloadEntry]] = {}  # service hostname CONNECTs

    def _local_service_workload(self, target: HostnameTarget) -> tuple[str, int] | None:
        """ztunnel's double HBONE names a service, not an address (meshd/discovery/hostnames.py): the
        (address, target port) of a local workload serving that service port, round robin among
        several; None if this node has none."""
        key = service_key_of(target.hostname)
        svc = self.state.catalog.services.get(key) if key is not None else None
        port = svc.port(target.port) if svc is not None else None
        if svc is None or port is None:
            return None
        local = [
            w
            for w in self.state.catalog.local.workloads
            if svc.key in w.services and port.target_port in w.ports
        ]
        picked = self._by_service.setdefault(svc.key, RoundRobin()).pick(local)
        return None if picked is None else (picked.address, port.target_port)

    def _why_not_served(self, target: HostnameTarget) -> str:
        key = service_key_of(target.hostname)
        if key is None:
            return f"CONNECT authority {str(target)!r} is not ip:port nor a service {hostname_hint()}"
        svc = self.state.catalog.services.get(key)
        if svc is None:
            return f"no service {key} in this node's catalog (CONNECT {target})"
        if svc.port(target.port) is None:
            return f"service {key} has no port {target.port}"
        return f"no workload of service {key} port {target.port} on this node"

    def _local_workload(self, ip: str, port: int) -> WorkloadEntry | None:
        for w in self.state.catalog.local.workloads:
            if w.address == ip and port in w.ports:
                return w
        return None

    async def handle(self, req: InboundRequest, reply: ServerReply) -> None:
        if not req.is_connect:
            await self._handle_request(req, reply)
            return
        if req.is_udp:
            if self.udp_handler is None:
                await reply.refuse(501, "this node does not carry UDP")
                return
            await self.udp_handler(req, reply)
            return
        dest = req.destination
        if dest is None and isinstance(req.target, HostnameTarget):
            dest = self._local_service_workload(req.target)
            if dest is None:
                await reply.refuse(400, self._why_not_served(req.target))
                return
        if dest is None:
            await reply.refuse(
                400, f"CONNECT authority {req.authority!r} is not ip:port nor a service {hostname_hint()}"
            )
            return
        ip, port = dest
        rec = ConnectionRecord(
            reporter="destination",
            src=req.client_address,
            dst=req.authority,
            source_identity=req.peer_identity,
            source=source_of(self.state.catalog, req.peer_identity, req.client_address),
            peer=str(Address(*req.peer_address)),
        )
        tracer = self.state.tracer
        if tracer.connection_spans:  # a child of the CONNECT's traceparent (the sender's span)
            rec.trace = tracer.start(extract(req.header))
        try:
            upstream = await self._admit(rec, req.peer_identity, req.peer_address[0], ip, port)
        except Refused as refused:  # the one place an HBONE tunnel's refusal is answered
            self._count_refusal(rec, refused)
            await reply.refuse(refused.status, refused.reason)
            return
        async with upstream:
            await proxied(self.state, rec, await reply.accept(), upstream)

    async def _admit(
        self, rec: ConnectionRecord, source: SpiffeId | None, source_ip: str, ip: str, port: int
    ) -> trio.abc.HalfCloseableStream:
        """Find the local workload, apply mTLS mode (plaintext only) and L4 policy, connect to it;
        the connection to the workload, or Refused with the HBONE status and the access log's flag."""
        workload = self._local_workload(ip, port)
        if workload is None:
            raise Refused(503, FLAG_NO_ROUTE, f"no workload on this node listens on {ip}:{port}")
        self._describe_destination(rec, workload)
        bound = self.state.catalog.waypoints_bound(workload, port)
        if bound:
            # Bound to a waypoint: only that waypoint may reach the workload. It authorized the request
            # (L7, with the client's identity) already, so L4 policy is not evaluated again here.
            if source is not None and self._is_waypoint(source, bound):
                return await self._connect(ip, port)
            if source is not None:
                return await self._hairpin(rec, source, workload, ip, port)
            raise Refused(
                401,
                FLAG_UNAUTHORIZED,
                f"workload {workload.key} is bound to waypoint {', '.join(bound)}: plaintext cannot be "
                "sent through it (no client identity to vouch for); connect over HBONE",
            )
        if source is None:
            configured = next(
                (
                    w.mtls
                    for w in self.state.config.workloads
                    if (w.name, w.namespace) == (workload.name, workload.namespace)
                ),
                None,
            )
            if mtls_mode(self.state.policy, workload.namespace, workload.name, configured) == "STRICT":
                raise Refused(401, FLAG_UNAUTHORIZED, "plaintext refused: workload is STRICT mTLS")
        decision = authorize_connection(
            self.state.policy,
            ConnectionAttrs(
                source=source,
                source_ip=source_ip,
                destination_ip=ip,
                destination_port=port,
                workload_namespace=workload.namespace,
                workload_name=workload.name,
                workload_labels=workload.label_map,
            ),
        )
        rec.dry_run = dry_run.record(self.state.telemetry.metrics, decision)
        if not decision.allowed:
            raise Refused(401, FLAG_UNAUTHORIZED, decision.reason)
        return await self._connect(ip, port)

    def _is_waypoint(self, source: SpiffeId, names: list[str]) -> bool:
        """Is `source` the node identity of one of these waypoints (role waypoint in the catalog)?"""
        catalog = self.state.catalog
        return any(
            source == SpiffeId.node(catalog.trust_domain, name) and catalog.waypoint_node(name) is not None
            for name in names
        )

    async def _hairpin(
        self, rec: ConnectionRecord, source: SpiffeId, workload: WorkloadEntry, ip: str, port: int
    ) -> trio.abc.HalfCloseableStream:
        """A client dialled a waypoint-bound workload directly: send it through the waypoint, as our
        node identity, claiming the client's identity and the workload it dialled (see
        meshd/waypoint/hairpin.py for why the waypoint may believe us)."""
        catalog = self.state.catalog
        found = bound_service(catalog, workload, port)
        vip = self.vips.table(catalog.services)[0].vip(found[0].key) if found else None
        ep = catalog.waypoint_endpoint(found[0].key, found[1].port, vip) if found and vip else None
        if found is None or ep is None:
            reason = f"workload {workload.key} is bound to a waypoint that is not in the catalog (yet)"
            raise Refused(503, FLAG_NO_ROUTE, reason)
        svc = found[0]
        rec.destination_service = svc.key
        headers = [
            ("forwarded", f'for="{rec.src}"'),
            *claim_headers(source, str(Address(ip, port))),
            *trace_header(rec.trace),
        ]
        try:
            tunnel = await self.pool.open_tunnel(
                self.state.node_identity, ep.identity, (ep.dial.host, ep.dial.port), ep.authority, headers
            )
        except TunnelRefused as exc:
            raise Refused(
                exc.status,
                FLAG_UNAUTHORIZED if exc.status == 401 else FLAG_UPSTREAM_CONNECT,
                f"waypoint {svc.waypoint} refused the hairpin: {exc}",
            ) from None
        except (HboneConnectError, PeerIdentityError) as exc:
            raise Refused(503, FLAG_UPSTREAM_CONNECT, f"waypoint {svc.waypoint}: {exc}") from None
        log.info(
            "hairpinned a direct tunnel through the waypoint",
            extra={
                "source": source.uri,
                "workload": workload.key,
                "waypoint": svc.waypoint,
                "via": ep.authority,
            },
        )
        return tunnel

    async def _connect(self, ip: str, port: int) -> TcpStream:
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                return await TcpStream.connect(ip, port)
        except (OSError, trio.TooSlowError) as exc:
            reason = f"connect to workload {ip}:{port} failed: {exc or 'timed out'}"
            raise Refused(503, FLAG_UPSTREAM_CONNECT, reason) from None

    def _count_refusal(self, rec: ConnectionRecord, refused: Refused) -> None:
        self.state.telemetry.failed(rec, refused.flag or "-", refused.reason)

    def _describe_destination(self, rec: ConnectionRecord, w: WorkloadEntry) -> None:
        rec.destination_identity = w.identity(self.state.config.trust_domain)
        rec.destination = WorkloadLabels.of(w, self.state.config.trust_domain)
        rec.destination_service = w.services[0] if w.services else "unknown"

    async def _handle_request(self, req: InboundRequest, reply: ServerReply) -> None:
        if self.ca_handler is not None and (req.path or "").startswith(CA_PATH_PREFIX):
            await self.ca_handler(req, reply)
            return
        if req.method == "GET" and req.path == CATALOG_PATH:
            # Only other meshd nodes of our trust domain (HboneServer checked the domain) get the catalog.
            if not req.peer_identity.is_node:
                await reply.refuse(403, "the catalog is served to meshd node identities only")
                return
            cat = self.state.catalog.local
            await reply.respond(
                200, [("content-type", "application/json"), ("x-meshd-revision", cat.revision)], cat.encode()
            )
            return
        path, _, query = (req.path or "").partition("?")
        if req.method == "GET" and path in CONTROL_PATHS and self.control is not None:
            # The dashboard's view of this node: as the catalog, for meshd node identities only.
            if not req.peer_identity.is_node:
                await reply.refuse(403, f"{path} is served to meshd node identities only")
                return
            status, body = self.control(path, query)
            await reply.respond(status, [("content-type", "application/json")], body)
            return
        await reply.refuse(
            400, f"HBONE expects CONNECT (or GET {CATALOG_PATH}), got {req.method} {req.path or ''}"
        )

    # ---- plaintext inbound (15006) -----------------------------------------------------------
    async def serve_plaintext(
        self, connections: trio.Nursery, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept on 15006 until cancelled; connections run in `connections` and outlive the accept loop."""
        address = self.state.config.listen.plaintext_address
        listeners = await open_listeners("listen.plaintext", address)
        await trio.serve_listeners(
            per_connection(self._handle_plaintext, "plaintext inbound"),
            listeners,
            handler_nursery=connections,
            task_status=task_status,
        )

    async def _handle_plaintext(self, accepted: trio.SocketStream) -> None:
        peer = peer_of(accepted)
        async with TcpStream.adopt(accepted) as stream:
            if peer is None:
                return
            dest = original_destination(stream.socket)
            src = str(Address(str(peer[0]), int(peer[1])))
            rec = ConnectionRecord(reporter="destination", src=src, dst="", peer=src, security="none")
            if dest is None:
                if peer_of(stream) is None:  # reset meanwhile (a port scan): nothing to report
                    return
                self.state.telemetry.failed(
                    rec, FLAG_NO_ROUTE, "plaintext connection without an original destination"
                )
                return
            ip, port = dest
            rec.dst = f"{ip}:{port}"
            try:
                upstream = await self._admit(rec, None, str(peer[0]), ip, port)
            except Refused as refused:  # plaintext has no refusal to send: the connection closes
                self._count_refusal(rec, refused)
                return
            async with upstream:
                await proxied(self.state, rec, stream, upstream)
