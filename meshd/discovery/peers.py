"""Peers and their catalogs: fetched over mTLS, kept while they answer, withdrawn when they go quiet.

`PeerTable` is the bookkeeping (pure, clock passed in); `poll_static_peers` is the trio loop for
`discovery.peers`. mDNS (the discovery issue) feeds the same table. A peer whose catalog cannot be
fetched keeps its last catalog until `peer_timeout` has passed since it last answered; then its
endpoints are withdrawn. Connections already open are not cut: they hold their own streams.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from meshd.discovery.catalog import NodeCatalog, PeerRecord
from meshd.units import Address

log = logging.getLogger("meshd.discovery")

Fetch = Callable[[Address], Awaitable[NodeCatalog]]


@dataclass
class PeerInfo:
    address: Address
    how: str  # "static" or "mdns"
    catalog: NodeCatalog | None = None
    last_seen: float | None = None  # trio clock
    last_error: str | None = None
    failures: int = 0


class PeerTable:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.peers: dict[Address, PeerInfo] = {}

    def add(self, address: Address, how: str) -> PeerInfo:
        return self.peers.setdefault(address, PeerInfo(address, how))

    def answered(self, address: Address, catalog: NodeCatalog, now: float) -> bool:
        """Record a fetched catalog; True if what the mesh sees changed."""
        info = self.peers[address]
        changed = info.catalog is None or info.catalog.revision != catalog.revision
        info.catalog, info.last_seen, info.last_error = catalog, now, None
        return changed

    def failed(self, address: Address, error: str, now: float) -> bool:
        """Record a failed fetch; True if the peer's endpoints were withdrawn by it."""
        info = self.peers[address]
        info.failures += 1
        info.last_error = error
        expired = info.catalog is not None and (info.last_seen is None or now - info.last_seen > self.timeout)
        if expired:
            log.warning("peer withdrawn: no answer", extra={"peer": str(address), "error": error})
            info.catalog = None
        return expired

    def records(self) -> list[PeerRecord]:
        return [PeerRecord(i.catalog, i.address.host) for i in self.peers.values() if i.catalog is not None]

    def describe(self, now: float) -> list[dict[str, object]]:
        return [
            {
                "address": str(i.address),
                "how": i.how,
                "name": i.catalog.node if i.catalog else None,
                "role": i.catalog.role if i.catalog else None,
                "revision": i.catalog.revision if i.catalog else None,
                "last_seen_s_ago": None if i.last_seen is None else round(now - i.last_seen, 1),
                "last_error": i.last_error,
            }
            for i in self.peers.values()
        ]


async def poll_static_peers(
    table: PeerTable,
    addresses: tuple[Address, ...],
    fetch: Fetch,
    interval: float,
    on_change: Callable[[], None],
    on_failure: Callable[[], None] = lambda: None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Fetch every static peer's catalog now (reporting started once each has been tried), then every
    `interval`; a peer that did not answer is retried sooner, with backoff from 0.5 s up to `interval`.
    A peer that is down at start-up does not hold up readiness."""
    for a in addresses:
        table.add(a, "static")

    async def attempt(address: Address) -> bool:
        try:
            with trio.fail_after(max(interval, 2.0)):
                catalog = await fetch(address)
        except Exception as exc:  # whatever went wrong, it went wrong with that peer
            on_failure()
            if table.failed(address, f"{type(exc).__name__}: {exc}", trio.current_time()):
                on_change()
            return False
        if table.answered(address, catalog, trio.current_time()):
            on_change()
        return True

    first_round_left = len(addresses)
    first_round_done = trio.Event()

    async def follow(address: Address) -> None:
        nonlocal first_round_left
        ok = await attempt(address)
        first_round_left -= 1
        if first_round_left == 0:
            first_round_done.set()
        backoff = 0.5
        while True:
            if ok:
                backoff = 0.5
                await trio.sleep(interval)
            else:
                await trio.sleep(min(backoff, interval))
                backoff *= 2
            ok = await attempt(address)

    async with trio.open_nursery() as nursery:
        for a in addresses:
            nursery.start_soon(follow, a)
        if addresses:
            await first_round_done.wait()
        task_status.started()
