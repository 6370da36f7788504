"""The node's data plane as one component: HBONE server (inbound), pool (outbound), plaintext
inbound, upstream listeners, peer polling and mDNS discovery, all in one nursery the daemon owns."""

from __future__ import annotations

import dataclasses
import logging
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
from meshd.discovery.mdns import MdnsDiscovery
from meshd.discovery.peers import PeerPoller, PeerTable
from meshd.gateway.forward import Gateway
from meshd.gateway.reverse import ReverseDialer
from meshd.hbone.pool import HbonePool
from meshd.hbone.server import Handler, HboneServer
from meshd.hbone.tls import CONTROL_SNI
from meshd.node.contexts import TlsContexts
from meshd.node.inbound import Inbound
from meshd.node.networks import NetworkCatalogs
from meshd.node.outbound import Outbound
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
        self.capture = Capture(state, self.outbound.handle)  # transparent mode and the DNS proxy
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

    async def start_upstream(self, up: UpstreamConfig) -> None:
        """Listen for an upstream (at start, or added by a reload); ListenError if it cannot bind."""
        assert self._connections is not None
        scope = self._upstreams[up] = trio.CancelScope()

        async def serve(connections: trio.Nursery, *, task_status: trio.TaskStatus[None]) -> None:
            with scope:
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
        log.info("catalog updated", extra={"nodes": len(new.peers) + 1, "workloads": len(new.workloads)})

    def config_dump(self) -> dict[str, Any]:
        return {
            "catalog": self.state.catalog.to_json(),
            "peers": self.peers.describe(trio.current_time()),
            "mdns": dataclasses.asdict(self.mdns.statistics()) if self.mdns else None,
            "hbone_server": dataclasses.asdict(self.server.statistics()),
            "pool": dataclasses.asdict(self.pool.statistics()),
            "capture": self.capture.config_dump(),
            "waypoint": self.waypoint.statistics() if self.waypoint is not None else None,
            "gateway": self.gateway.statistics() if self.gateway is not None else None,
            "networks": {
                "sources": [str(a) for a in self.networks.sources()],
                "errors": self.networks.errors,
                "nodes": [c.node for c in self.networks.catalogs()],
            },
        }
