"""The node's data plane as one component: HBONE server (inbound), pool (outbound), plaintext
inbound, upstream listeners, peer polling and mDNS discovery, all in one nursery the daemon owns."""

from __future__ import annotations

import dataclasses
import logging
import ssl
from typing import Any

import pluggy
import trio

from meshd.capture.transparent import Capture
from meshd.config.model import UpstreamConfig
from meshd.dataplane.state import NodeState
from meshd.discovery.catalog import (
    CATALOG_PATH,
    MAX_CATALOG_BYTES,
    CatalogError,
    NodeCatalog,
    local_catalog,
    merge,
)
from meshd.discovery.etcd import EtcdDiscovery
from meshd.discovery.mdns import MdnsDiscovery
from meshd.discovery.peers import PeerPoller, PeerTable
from meshd.gateway.forward import Gateway
from meshd.gateway.reverse import ReverseDialer
from meshd.hbone.pool import HbonePool
from meshd.hbone.server import Handler, HboneServer
from meshd.hbone.tls import CONTROL_SNI, load_cert_chain_pem
from meshd.node.contexts import TlsContexts
from meshd.node.inbound import Inbound
from meshd.node.networks import NetworkCatalogs
from meshd.node.outbound import Outbound
from meshd.node.udp_inbound import UdpInbound
from meshd.node.udp_outbound import UdpUpstream
from meshd.observe.graph import MAX_REPORT_BYTES
from meshd.observe.udp import UdpTelemetry
from meshd.readiness import Readiness
from meshd.units import Address
from meshd.waypoint.proxy import Waypoint

log = logging.getLogger("meshd.node")


class NodeProxy:
    def __init__(self, state: NodeState, plugins: pluggy.PluginManager | None = None) -> None:
        self.state = state
        local = state.catalog.local
        # Through state: a reload swaps the catalog, and the rule must follow it.
        self.contexts = TlsContexts(
            state.identities, state.node_identity, lambda ip: self.state.catalog.local.tunnel_identity(ip)
        )
        self.pool = HbonePool(self.contexts.client)
        self.outbound = Outbound(state, self.pool)
        self.inbound = Inbound(state, self.pool, self.outbound.vips)
        self.udp_telemetry = UdpTelemetry(state.metrics, access_log=state.telemetry.access_log)
        self.udp_inbound = UdpInbound(state, self.udp_telemetry)
        self.inbound.udp_handler = self.udp_inbound.handle
        self.udp_upstreams: dict[UpstreamConfig, UdpUpstream] = {}
        # Transparent mode (TCP and UDP to service VIPs) and the DNS proxy, handed the outbound paths.
        self.capture = Capture(state, self.outbound.handle, self.udp_upstream)
        self.waypoint: Waypoint | None = None
        handler: Handler = self.inbound.handle
        if state.config.role == "waypoint":
            # A waypoint's HBONE port carries HTTP to services bound to it, not tunnels to local workloads.
            self.waypoint = Waypoint(state, self.pool, plugins)
            self.waypoint.fallback = self.inbound.handle
            handler = self.waypoint.handle
        self.gateway: Gateway | None = None
        if state.config.role == "gateway":
            # A gateway's HBONE port carries other networks' outer tunnels; catalog fetches go to inbound.
            self.gateway = Gateway(state, self.pool, self.inbound.handle)
            handler = self.gateway.handle
        gateway = self.gateway
        self.networks = NetworkCatalogs(
            state, self.pool, self.rebuild_catalog, (lambda: gateway.reverse) if gateway is not None else dict
        )
        if gateway is not None:
            gateway.on_reverse_change = self._reverse_changed
        self.server = HboneServer(self.contexts.server_for_ip, state.config.trust_domain, handler)
        self.reverse_dialer: ReverseDialer | None = None
        if gateway is not None and state.config.gateway.reverse:
            self.reverse_dialer = ReverseDialer(state, self.pool, self.server)
        disc = state.config.discovery
        self.peers = PeerTable(disc.peer_timeout.total_seconds())
        self.poller = PeerPoller(
            self.peers,
            self.fetch_catalog,
            disc.refresh.total_seconds(),
            self.rebuild_catalog,
            state.metrics.catalog_fetch_failures.inc,
        )
        self.mdns: MdnsDiscovery | None = None
        if disc.mdns:
            self.mdns = MdnsDiscovery(
                trust_domain=local.trust_domain,
                node=local.node,
                role=local.role,
                hbone=state.config.listen.hbone,
                interfaces=disc.interfaces,
                revision=local.revision,
                on_peer=self.poller.mdns_seen,
                on_goodbye=self.poller.mdns_goodbye,
            )
        self.etcd: EtcdDiscovery | None = None
        if disc.etcd is not None:
            self.etcd = EtcdDiscovery(
                disc.etcd,
                trust_domain=local.trust_domain,
                node=local.node,
                role=local.role,
                hbone=state.config.listen.hbone,
                revision=local.revision,
                on_peer=self.poller.etcd_seen,
                on_gone=self.poller.etcd_gone,
                ssl_context=self.etcd_ssl_context,
                credentials_changed=state.identities.wait_changed if disc.etcd.cert is None else None,
                on_state=self._etcd_state,
            )
        self._accept_loops: set[trio.CancelScope] = set()  # all but HBONE's (which drains itself)
        self._draining = False
        self._upstreams: dict[UpstreamConfig, trio.CancelScope] = {}
        self._connections: trio.Nursery | None = None

    async def run(
        self, readiness: Readiness, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.state.config
        async with trio.open_nursery() as connections, trio.open_nursery() as nursery:
            self._connections = connections
            await nursery.start(self.pool.run)
            await nursery.start(self.server.serve, cfg.listen.hbone.host, cfg.listen.hbone.port)
            if self.waypoint is not None:
                await nursery.start(self.waypoint.upstreams.run)  # expires idle upstream tunnels
            await nursery.start(self._accept_until_drained, self.inbound.serve_plaintext)
            for up in cfg.upstreams:
                await self.start_upstream(up)
            if self.capture.enabled:
                await nursery.start(self._accept_until_drained, self.capture.serve)
            if self.capture.dns is not None:
                await nursery.start(self._accept_until_drained, self.capture.dns.serve)
            await nursery.start(self.poller.run, cfg.discovery.peers)
            await nursery.start(self.networks.run)
            if self.reverse_dialer is not None:
                await nursery.start(self.reverse_dialer.run)
            if self.mdns is not None:
                await nursery.start(self.mdns.run)
            if self.etcd is not None:
                await nursery.start(self.etcd.run)
            task_status.started()

    async def _accept_until_drained(
        self, serve: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert self._connections is not None
        with trio.CancelScope() as scope:
            self._accept_loops.add(scope)
            if self._draining:
                scope.cancel()
            try:
                await serve(self._connections, task_status=task_status)
            finally:
                self._accept_loops.discard(scope)

    def udp_upstream(self, up: UpstreamConfig) -> UdpUpstream:
        """A UDP upstream for `up` (an [[upstream]] with protocol "udp", or a captured VIP port)."""
        return UdpUpstream(self.outbound, self.udp_telemetry, up)

    async def start_upstream(self, up: UpstreamConfig) -> None:
        """Listen for an upstream (at start, or added by a reload); ListenError if it cannot bind."""
        assert self._connections is not None
        scope = self._upstreams[up] = trio.CancelScope()

        async def serve(connections: trio.Nursery, *, task_status: trio.TaskStatus[None]) -> None:
            with scope:
                if up.protocol == "udp":
                    udp = self.udp_upstreams[up] = self.udp_upstream(up)
                    try:
                        await udp.serve(task_status=task_status)
                    finally:
                        self.udp_upstreams.pop(up, None)
                else:
                    await self.outbound.serve(up, connections, task_status=task_status)

        try:
            await self._connections.start(self._accept_until_drained, serve)
        except BaseException:
            del self._upstreams[up]
            raise

    def stop_upstream(self, up: UpstreamConfig) -> None:
        """Stop accepting for an upstream a reload removed; its open connections carry on."""
        scope = self._upstreams.pop(up, None)
        if scope is not None:
            scope.cancel()

    def drain(self) -> None:
        """Stop accepting on every listener; GOAWAY on HBONE connections; open tunnels finish."""
        self._draining = True
        for scope in list(self._accept_loops):
            scope.cancel()
        if self.mdns is not None:
            self.mdns.drain()  # goodbye first: peers stop choosing us while tunnels finish
        if self.etcd is not None:
            self.etcd.drain()  # our entry's lease revoked: peers see it deleted at once
        self.server.drain()
        if self.waypoint is not None:
            self.waypoint.drain()  # keep-alive clients inside the tunnels: connection: close / GOAWAY
        self.pool.drain()

    async def fetch_catalog(self, address: Address) -> NodeCatalog:
        status, _, body, peer = await self.pool.get_control(
            self.state.node_identity,
            (address.host, address.port),
            CATALOG_PATH,
            server_hostname=CONTROL_SNI,
            max_body=MAX_CATALOG_BYTES,  # stop reading at the limit decode() enforces anyway
        )
        if not peer.is_node:
            raise CatalogError(f"{address} presented {peer}, not a meshd node identity")
        if status != 200:
            raise CatalogError(f"{address} answered {status}: {body[:200].decode(errors='replace')}")
        return NodeCatalog.decode(
            body,
            trust_domain=self.state.config.trust_domain,
            expected_node=peer.service_account.removeprefix("node-"),
        )

    def etcd_ssl_context(self) -> ssl.SSLContext:
        """TLS to etcd: its server certificate checked against `etcd.ca` (default: the mesh's bundle),
        and as client certificate `etcd.cert`/`etcd.key`, or this node's own mesh certificate."""
        settings = self.state.config.discovery.etcd
        assert settings is not None
        node_cert = self.state.identities.certificate(self.state.node_identity)
        if settings.ca is not None:
            ctx = ssl.create_default_context(cafile=str(settings.ca))
        else:
            ctx = ssl.create_default_context(cadata=node_cert.ca_pem.decode("ascii"))
        if settings.cert is not None and settings.key is not None:
            ctx.load_cert_chain(str(settings.cert), str(settings.key))
        else:
            load_cert_chain_pem(ctx, node_cert.cert_pem, node_cert.key_pem)
        return ctx

    def _etcd_state(self, connected: bool) -> None:
        self.state.metrics.etcd_connected.set(1 if connected else 0)
        if not connected:
            self.state.metrics.etcd_failures.inc()

    async def fetch_control(self, address: Address, path: str) -> tuple[str, int, bytes]:
        """A dashboard GET of a peer (graph.CONTROL_PATHS, with its query), over mTLS as the catalog is
        fetched: (the node name its certificate says, status, JSON body). CatalogError if the peer is
        not a meshd node, or refused."""
        status, _, body, peer = await self.pool.get_control(
            self.state.node_identity,
            (address.host, address.port),
            path,
            server_hostname=CONTROL_SNI,
            max_body=MAX_REPORT_BYTES,
        )
        if not peer.is_node:
            raise CatalogError(f"{address} presented {peer}, not a meshd node identity")
        if status not in (200, 400):  # 400: a query the peer explains as not valid (its JSON says why)
            raise CatalogError(f"{address} answered {status}: {body[:200].decode(errors='replace')}")
        return peer.service_account.removeprefix("node-"), status, body

    def _reverse_changed(self) -> None:
        self.rebuild_catalog()  # we front (or stop fronting) the network behind it
        self.networks.poll_soon()  # its catalogs come over it

    def rebuild_catalog(self) -> None:
        local = local_catalog(self.state.config)
        if self.gateway is not None and self.gateway.reverse and local.gateway is not None:
            fronted = tuple(sorted({*local.gateway.networks, *self.gateway.reverse}))
            local = dataclasses.replace(local, gateway=dataclasses.replace(local.gateway, networks=fronted))
        remote = self.networks.records()
        if self.gateway is not None:
            self.gateway.remote = [r.catalog for r in remote]
        new = merge(local, [*remote, *self.peers.records()])  # a peer of our own network wins a name
        for conflict in set(new.conflicts) - set(self.state.catalog.conflicts):
            log.warning("catalog conflict: %s", conflict)
        self.state.catalog = new
        self.state.metrics.peers.set(len(new.peers))
        if self.mdns is not None:
            self.mdns.set_revision(local.revision)
        if self.etcd is not None:
            self.etcd.set_revision(local.revision)
        log.info("catalog updated", extra={"nodes": len(new.peers) + 1, "workloads": len(new.workloads)})

    def etcd_status(self) -> dict[str, Any] | None:
        if self.etcd is None:
            return None
        stats = dataclasses.asdict(self.etcd.statistics())
        since = stats.pop("since")
        stats["for_s"] = None if since is None else round(trio.current_time() - since, 1)
        return stats

    def config_dump(self) -> dict[str, Any]:
        return {
            "catalog": self.state.catalog.to_json(),
            "peers": self.peers.describe(trio.current_time()),
            "mdns": dataclasses.asdict(self.mdns.statistics()) if self.mdns else None,
            "etcd": self.etcd_status(),
            "hbone_server": dataclasses.asdict(self.server.statistics()),
            "pool": dataclasses.asdict(self.pool.statistics()),
            "capture": self.capture.config_dump(),
            "waypoint": self.waypoint.statistics() if self.waypoint is not None else None,
            "udp": {
                "inbound_flows": self.udp_inbound.active,
                "upstreams": {
                    f"{up.listen}/udp": dataclasses.asdict(u.statistics())
                    for up, u in self.udp_upstreams.items()
                },
            },
            "gateway": self.gateway.statistics() if self.gateway is not None else None,
            "networks": {
                "sources": [str(a) for a in self.networks.sources()],
                "errors": self.networks.errors,
                "nodes": [c.node for c in self.networks.catalogs()],
            },
        }
