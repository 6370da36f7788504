"""Peers and their catalogs: fetched over mTLS, kept while they answer, withdrawn when they go quiet.

`PeerTable` is the bookkeeping (pure, clock passed in); `PeerPoller` is the trio component that
polls every known peer: the static ones (`discovery.peers`) from the start, the ones mDNS
reports (`mdns_seen` / `mdns_goodbye`) while they are announced, and the ones etcd lists
(`etcd_seen` / `etcd_gone`) while their entry is there. An etcd entry names the node it is for:
the catalog fetched from its address must be that node's, or the entry adds nothing. A peer whose catalog cannot be
fetched keeps its last catalog until `peer_timeout` has passed since it last answered; then its
endpoints are withdrawn. A goodbye withdraws them at once and stops polling that peer. Connections
already open are not cut: they hold their own streams.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from meshd.discovery.catalog import NodeCatalog, PeerRecord, metrics_target
from meshd.units import Address

log = logging.getLogger("meshd.discovery")

Fetch = Callable[[Address], Awaitable[NodeCatalog]]


class ForgedEntry(Exception):
    """A peer found through etcd proved a node other than the one its entry names."""


@dataclass
class PeerInfo:
    address: Address
    sources: set[str]  # who told us of it: "static", "mdns", "etcd"
    catalog: NodeCatalog | None = None
    last_seen: float | None = None  # trio clock
    last_error: str | None = None
    failures: int = 0

    @property
    def how(self) -> str:
        """How it was found, as `meshd peers` shows it ("etcd", "mdns+static", ...)."""
        return "+".join(sorted(self.sources))


class PeerTable:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.peers: dict[Address, PeerInfo] = {}

    def add(self, address: Address, how: str) -> PeerInfo:
        info = self.peers.setdefault(address, PeerInfo(address, set()))
        info.sources.add(how)
        return info

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

    def remove(self, address: Address) -> bool:
        """Forget a peer; True if it had endpoints in the mesh (which are now withdrawn)."""
        info = self.peers.pop(address, None)
        return info is not None and info.catalog is not None

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
                "metrics": metrics_target(i.catalog, i.address.host) if i.catalog else None,
                "last_seen_s_ago": None if i.last_seen is None else round(now - i.last_seen, 1),
                "last_error": i.last_error,
            }
            for i in self.peers.values()
        ]


@dataclass
class _Follower:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    wake: trio.Event = field(default_factory=trio.Event)


class PeerPoller:
    """Fetches each known peer's catalog now, then every `interval`; a peer that did not answer is
    retried sooner, with backoff from 0.5 s up to `interval`. One task per peer, all in the nursery
    `run` owns. `on_change` is called whenever what the mesh sees changed (rebuild the catalog)."""

    def __init__(
        self,
        table: PeerTable,
        fetch: Fetch,
        interval: float,
        on_change: Callable[[], None],
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.table = table
        self.fetch = fetch
        self.interval = interval
        self.on_change = on_change
        self.on_failure = on_failure
        self._nursery: trio.Nursery | None = None
        self._followers: dict[Address, _Follower] = {}
        self._mdns: dict[str, Address] = {}  # mDNS instance name -> the address it announced
        self._etcd: dict[str, Address] = {}  # node name in an etcd entry -> the address it gives
        self._unconfirmed: set[tuple[str, Address, str]] = set()  # etcd claims refuted (logged once)

    async def run(
        self,
        static: tuple[Address, ...] = (),
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Poll until cancelled. Reports started once every static peer has been tried once, so a
        node that starts with its peers up is ready with their catalogs; a peer that is down does not
        hold up readiness (its first attempt fails fast or times out)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            first_round = [self._add(a, "static") for a in static]
            for done in first_round:
                if done is not None:
                    await done.wait()
            task_status.started()
            await trio.sleep_forever()

    # ---- mDNS reports (called from trio) ----
    def mdns_seen(self, instance: str, address: Address, revision: str) -> None:
        """An announcement: poll the peer; fetch at once if it is new or its revision is not the
        one we hold."""
        old = self._mdns.get(instance)
        if old is not None and old != address:
            self._forget(old)
        self._mdns[instance] = address
        if self._add(address, "mdns") is not None:
            return  # new: its first fetch is under way
        info = self.table.peers.get(address)
        if info is not None and (info.catalog is None or info.catalog.revision != revision):
            self.refresh_now(address)

    def mdns_goodbye(self, instance: str) -> None:
        """The peer withdrew its announcement (or its records expired): withdraw its endpoints now
        and stop polling it (a static peer at the same address stays)."""
        address = self._mdns.pop(instance, None)
        if address is not None:
            self._forget(address, "mdns")

    # ---- etcd hints (called from trio) ----
    def etcd_seen(self, node: str, address: Address, revision: str) -> None:
        """An entry in etcd says `node` is at `address`: poll it (fetch now if new or changed)."""
        old = self._etcd.get(node)
        self._etcd[node] = address
        if old is not None and old != address:
            self._forget(old, "etcd")
        if self._add(address, "etcd") is not None:
            return
        info = self.table.peers.get(address)
        if info is not None and (info.catalog is None or info.catalog.revision != revision):
            self.refresh_now(address)

    def etcd_gone(self, node: str) -> None:
        """The node's entry left etcd (deleted, or its lease expired): withdraw it now."""
        address = self._etcd.pop(node, None)
        if address is not None:
            self._forget(address, "etcd")

    def refresh_now(self, address: Address) -> None:
        follower = self._followers.get(address)
        if follower is not None:
            follower.wake.set()

    # ---- internals ----
    def _add(self, address: Address, how: str) -> trio.Event | None:
        """Start following a peer; returns an event set after its first attempt, None if followed already."""
        if self._nursery is None:
            raise RuntimeError("PeerPoller.run() is not running")
        self.table.add(address, how)
        if address in self._followers:
            return None
        follower = self._followers[address] = _Follower()
        first = trio.Event()
        self._nursery.start_soon(self._follow, address, follower, first)
        return first

    def _forget(self, address: Address, how: str = "mdns") -> None:
        """`how` no longer reports the peer at `address`; stop following it when nothing else does."""
        info = self.table.peers.get(address)
        if info is None or how not in info.sources:
            return
        if how == "etcd":
            remaining = {n for n, a in self._etcd.items() if a == address}
            proved = info.catalog.node if info.catalog is not None else None
            if remaining and (proved is None or proved in remaining):
                return  # another entry still points here (and does not contradict the peer)
        info.sources.discard(how)
        if info.sources:
            return  # still known another way (a static peer, or announced over mDNS too)
        follower = self._followers.pop(address, None)
        if follower is not None:
            follower.scope.cancel()
        if self.table.remove(address):
            log.info("peer withdrawn: goodbye", extra={"peer": str(address)})
            self.on_change()

    async def _attempt(self, address: Address) -> bool:
        try:
            with trio.fail_after(max(self.interval, 2.0)):
                catalog = await self.fetch(address)
            self._check_claims(address, catalog)
        except Exception as exc:  # whatever went wrong, it went wrong with that peer
            if address not in self.table.peers:
                return False  # forgotten while we fetched
            self.on_failure()
            error = f"{type(exc).__name__}: {exc}"
            info = self.table.peers[address]
            if "etcd" in info.sources and info.catalog is None and info.last_error != error:
                names = sorted(n for n, a in self._etcd.items() if a == address)
                log.warning(
                    "etcd entry not confirmed: its address does not prove the node",
                    extra={"node": ", ".join(names), "peer": str(address), "error": error},
                )
            if self.table.failed(address, error, trio.current_time()):
                self.on_change()
            return False
        if address in self.table.peers and self.table.answered(address, catalog, trio.current_time()):
            self.on_change()
        return True

    def _check_claims(self, address: Address, catalog: NodeCatalog) -> None:
        """The node at `address` proved `catalog.node`. Etcd entries naming another node at that
        address are refuted (logged once each); a peer known only through etcd must be one of the
        nodes its entries name, or its catalog is refused."""
        names = {n for n, a in self._etcd.items() if a == address}
        for name in sorted(names - {catalog.node}):
            claim = (name, address, catalog.node)
            if claim not in self._unconfirmed:
                self._unconfirmed.add(claim)
                log.warning(
                    "etcd entry ignored: forged or stale",
                    extra={
                        "node": name,
                        "peer": str(address),
                        "reason": f"{address} proved node {catalog.node!r}, not {name!r}",
                    },
                )
        info = self.table.peers.get(address)
        if info is not None and info.sources == {"etcd"} and names and catalog.node not in names:
            raise ForgedEntry(
                f"etcd names node(s) {', '.join(sorted(names))} at {address}, but it proved node {catalog.node!r}"
            )

    async def _follow(self, address: Address, follower: _Follower, first: trio.Event) -> None:
        with follower.scope:
            try:
                ok = await self._attempt(address)
            finally:
                first.set()
            backoff = 0.5
            while True:
                wait = self.interval if ok else min(backoff, self.interval)
                backoff = 0.5 if ok else backoff * 2
                with trio.move_on_after(wait):
                    await follower.wake.wait()
                follower.wake = trio.Event()
                ok = await self._attempt(address)
