"""The node's data plane as one component: HBONE server (inbound), pool (outbound), plaintext
inbound, upstream listeners and static peer polling, all in one nursery the daemon owns."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import trio

from meshd.discovery.catalog import CATALOG_PATH, CatalogError, NodeCatalog, local_catalog, merge
from meshd.discovery.peers import PeerTable, poll_static_peers
from meshd.hbone.pool import HbonePool
from meshd.hbone.server import HboneServer
from meshd.node.contexts import CONTROL_SNI, TlsContexts
from meshd.node.inbound import Inbound
from meshd.node.outbound import Outbound
from meshd.node.state import NodeState
from meshd.readiness import Readiness
from meshd.units import Address

log = logging.getLogger("meshd.node")


class NodeProxy:
    def __init__(self, state: NodeState) -> None:
        self.state = state
        local = state.catalog.local
        self.contexts = TlsContexts(state.identities, state.node_identity, local.tunnel_identity)
        self.pool = HbonePool(self.contexts.client)
        self.inbound = Inbound(state)
        self.outbound = Outbound(state, self.pool)
        self.server = HboneServer(self.contexts.server_for_ip, state.config.trust_domain, self.inbound.handle)
        self.peers = PeerTable(state.config.discovery.peer_timeout.total_seconds())
        self._upstream_scope = trio.CancelScope()

    async def run(
        self, readiness: Readiness, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.state.config
        async with trio.open_nursery() as nursery:
            await nursery.start(self.pool.run)
            await nursery.start(self.server.serve, cfg.listen.hbone.host, cfg.listen.hbone.port)
            await nursery.start(self.inbound.serve_plaintext)
            if cfg.discovery.peers:
                await nursery.start(
                    poll_static_peers,
                    self.peers,
                    cfg.discovery.peers,
                    self.fetch_catalog,
                    cfg.discovery.refresh.total_seconds(),
                    self.rebuild_catalog,
                    self.state.metrics.catalog_fetch_failures.inc,
                )
            nursery.start_soon(self._serve_upstreams, nursery)
            task_status.started()

    async def _serve_upstreams(self, nursery: trio.Nursery) -> None:
        with self._upstream_scope:
            async with trio.open_nursery() as upstreams:
                for up in self.state.config.upstreams:
                    await upstreams.start(self.outbound.serve, up)

    def drain(self) -> None:
        """Stop accepting on every listener; GOAWAY on HBONE connections; open tunnels finish."""
        self._upstream_scope.cancel()
        self.server.drain()
        self.pool.drain()

    async def fetch_catalog(self, address: Address) -> NodeCatalog:
        status, _, body, peer = await self.pool.get_control(
            self.state.node_identity, (address.host, address.port), CATALOG_PATH, server_hostname=CONTROL_SNI
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

    def rebuild_catalog(self) -> None:
        new = merge(local_catalog(self.state.config), self.peers.records())
        for conflict in set(new.conflicts) - set(self.state.catalog.conflicts):
            log.warning("catalog conflict: %s", conflict)
        self.state.catalog = new
        log.info("catalog updated", extra={"nodes": len(new.peers) + 1, "workloads": len(new.workloads)})

    def config_dump(self) -> dict[str, Any]:
        return {
            "catalog": self.state.catalog.to_json(),
            "peers": self.peers.describe(trio.current_time()),
            "hbone_server": dataclasses.asdict(self.server.statistics()),
            "pool": dataclasses.asdict(self.pool.statistics()),
        }
