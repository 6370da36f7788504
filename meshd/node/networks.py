"""Other networks' catalogs, fetched from gateways (docs/multi-network.md).

Where from: every gateway of this node's own network (a peer whose catalog says role gateway), and,
on a gateway, the other networks' gateways listed in `gateway.remote`. What is kept: the node
catalogs of networks other than ours (`decode_network_catalog` drops our own), per source, until
that source has not answered for `discovery.peer_timeout`. Every `discovery.refresh` seconds; a
change rebuilds the merged catalog. Nodes of other networks are never dialled directly: outbound
goes through their network's gateway (double HBONE).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from meshd.dataplane.state import NodeState
from meshd.discovery.catalog import CatalogError, NodeCatalog, PeerRecord
from meshd.discovery.networks import NETWORK_CATALOG_PATH, decode_network_catalog
from meshd.hbone.errors import HboneConnectError, PeerIdentityError
from meshd.hbone.pool import HbonePool
from meshd.hbone.tls import CONTROL_SNI
from meshd.units import Address

log = logging.getLogger("meshd.networks")


class NetworkCatalogs:
    def __init__(self, state: NodeState, pool: HbonePool, on_change: Callable[[], None]) -> None:
        self.state = state
        self.pool = pool
        self.on_change = on_change
        self._fetched: dict[Address, tuple[float, tuple[NodeCatalog, ...]]] = {}  # source -> (when, what)
        self.errors: dict[str, str] = {}

    def sources(self) -> list[Address]:
        """Our network's gateways (as we reached them) and the configured remote gateways."""
        catalog = self.state.catalog
        out = [
            Address(rec.reached_at, rec.catalog.hbone.port)
            for rec in catalog.peers.values()
            if rec.catalog.role == "gateway" and rec.catalog.network == catalog.network and rec.reached_at
        ]
        return sorted(set(out) | set(self.state.config.gateway.remote), key=str)

    def catalogs(self) -> list[NodeCatalog]:
        """Every other network's node catalog we hold (one per node name; the first source wins)."""
        out: dict[str, NodeCatalog] = {}
        for _, cats in (self._fetched[a] for a in sorted(self._fetched, key=str)):
            for c in cats:
                out.setdefault(c.node, c)
        return [out[n] for n in sorted(out)]

    def records(self) -> list[PeerRecord]:
        # Nodes of other networks are reached through a gateway, never at an address of their own.
        return [PeerRecord(c, "") for c in self.catalogs()]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        disc = self.state.config.discovery
        while True:
            await self.poll_once()
            await trio.sleep(disc.refresh.total_seconds())

    async def poll_once(self) -> None:
        changed = False
        now = trio.current_time()
        timeout = self.state.config.discovery.peer_timeout.total_seconds()
        for source in self.sources():
            try:
                cats = await self.fetch(source)
            except (HboneConnectError, PeerIdentityError, CatalogError, trio.TooSlowError) as exc:
                self.errors[str(source)] = str(exc)
                log.info("network catalog fetch failed", extra={"gateway": str(source), "error": str(exc)})
                held = self._fetched.get(source)
                if held is not None and now - held[0] > timeout:
                    del self._fetched[source]
                    changed = True
                continue
            self.errors.pop(str(source), None)
            held = self._fetched.get(source)
            if held is None or [c.revision for c in held[1]] != [c.revision for c in cats]:
                changed = True
            self._fetched[source] = (now, cats)
        if changed:
            self.on_change()

    async def fetch(self, source: Address) -> tuple[NodeCatalog, ...]:
        status, _, body, peer = await self.pool.get_control(
            self.state.node_identity,
            (source.host, source.port),
            NETWORK_CATALOG_PATH,
            server_hostname=CONTROL_SNI,
        )
        if not peer.is_node:
            raise CatalogError(f"{source} presented {peer}, not a meshd node identity")
        if status != 200:
            raise CatalogError(f"{source} answered {status}: {body[:200].decode(errors='replace')}")
        cfg = self.state.config
        return tuple(decode_network_catalog(body, trust_domain=cfg.trust_domain, own_network=cfg.network))
