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
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

import trio

from meshd.dataplane.state import NodeState
from meshd.discovery.catalog import CatalogError, NodeCatalog, PeerRecord
from meshd.discovery.networks import NETWORK_CATALOG_PATH, decode_network_catalog
from meshd.hbone._link import HboneLink
from meshd.hbone.errors import HboneConnectError, PeerIdentityError
from meshd.hbone.pool import HbonePool
from meshd.hbone.tls import CONTROL_SNI
from meshd.units import Address

log = logging.getLogger("meshd.networks")


class NetworkCatalogs:
    def __init__(
        self,
        state: NodeState,
        pool: HbonePool,
        on_change: Callable[[], None],
        reverse: Callable[[], Mapping[str, HboneLink]] = dict,
    ) -> None:
        self.state = state
        self.pool = pool
        self.on_change = on_change
        self.reverse = reverse  # a public gateway's reverse connections, by network: asked over them
        self._fetched: dict[str, tuple[float, tuple[NodeCatalog, ...]]] = {}  # source -> (when, what)
        self.errors: dict[str, str] = {}
        self._wake = trio.Event()

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
        for _, cats in (self._fetched[a] for a in sorted(self._fetched)):
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
            with trio.move_on_after(disc.refresh.total_seconds()):
                await self._wake.wait()
            self._wake = trio.Event()

    def poll_soon(self) -> None:
        """Poll now (a reverse connection came up) instead of at the next refresh."""
        self._wake.set()

    async def poll_once(self) -> None:
        changed = False
        now = trio.current_time()
        timeout = self.state.config.discovery.peer_timeout.total_seconds()
        sources: list[tuple[str, Callable[[], Awaitable[tuple[NodeCatalog, ...]]]]] = [
            (str(a), partial(self.fetch, a)) for a in self.sources()
        ]
        sources += [(f"reverse:{n}", partial(self.fetch_reverse, link)) for n, link in self.reverse().items()]
        for source, fetch in sources:
            try:
                cats = await fetch()
            except (HboneConnectError, PeerIdentityError, CatalogError, trio.TooSlowError) as exc:
                self.errors[source] = str(exc)
                log.info("network catalog fetch failed", extra={"gateway": source, "error": str(exc)})
                held = self._fetched.get(source)
                if held is not None and now - held[0] > timeout:
                    del self._fetched[source]
                    changed = True
                continue
            self.errors.pop(source, None)
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
        return self._decode(body)

    async def fetch_reverse(self, link: HboneLink) -> tuple[NodeCatalog, ...]:
        status, body = await self.pool.get_on(link, NETWORK_CATALOG_PATH)
        if status != 200:
            raise CatalogError(f"reverse connection answered {status}: {body[:200].decode(errors='replace')}")
        return self._decode(body)

    def _decode(self, body: bytes) -> tuple[NodeCatalog, ...]:
        cfg = self.state.config
        return tuple(decode_network_catalog(body, trust_domain=cfg.trust_domain, own_network=cfg.network))
