"""Peers over mDNS: announce `_meshd._tcp.local.` and browse for it, with zeroconf.

Rule 1: nothing learnt from mDNS is trusted. An announcement only says "there may be a meshd at
this address; its catalog revision is R". The catalog itself is fetched over mutual TLS
(`NodeProxy.fetch_catalog`), from a peer that must prove a node identity of our trust domain.
A forged announcement costs us a failed handshake, nothing more.

Rule 2: zeroconf runs its own threads (an asyncio loop thread and the browser's thread). Their
callbacks do nothing but hand an `MdnsEvent` to trio through a memory channel
(`trio.from_thread.run`); every decision is taken in trio. Blocking zeroconf calls (register,
resolve, unregister, close) run in worker threads with timeouts.

Theory of operation: `MdnsDiscovery.run` opens zeroconf on the selected interfaces, starts a
browser, registers our announcement in the background, and reports started (readiness does not
wait for the network). Each added/updated service is resolved (SRV/TXT/A, bounded), its TXT parsed
by the pure `parse_txt`, and an acceptable peer is reported through `on_peer(instance, address,
revision)`. A removed service (goodbye, or its records expired) is reported through `on_goodbye`.
`drain()` withdraws our announcement at once (goodbye packets), so peers stop sending new
connections while in-flight ones finish.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ifaddr
import trio
from zeroconf import IPVersion, NonUniqueNameException, ServiceBrowser, ServiceInfo, ServiceListener, Zeroconf

from meshd.identity.spiffe import InvalidSpiffeId, validate_trust_domain
from meshd.units import Address

log = logging.getLogger("meshd.discovery.mdns")

SERVICE_TYPE = "_meshd._tcp.local."
PROTOCOL_VERSION = 1
ROLES = ("node", "waypoint", "gateway")
RESOLVE_TIMEOUT_MS = 3000  # one resolution (SRV + TXT + A) of a peer's announcement
REGISTER_TIMEOUT = 15.0  # probing + announcing takes ~2 s; a name conflict raises at once
CLOSE_TIMEOUT = 5.0  # goodbye + close on shutdown, shielded
EVENT_BUFFER = 64  # events waiting for trio; the browser thread blocks (back-pressure) beyond that
MAX_RESOLVING = 8  # worker threads resolving announcements at once
WILDCARDS = ("0.0.0.0", "::", "")

_NODE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
_REVISION = re.compile(r"^[0-9a-f]{1,64}$")
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_MULTICAST = 0x1000


class TxtError(ValueError):
    """An announcement's TXT record is unusable; the message says why."""


class MdnsConfigError(ValueError):
    """`discovery.interfaces` names something this host does not have."""


# ---- the announcement (pure) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Announcement:
    """What a meshd says about itself in its TXT record. Keys: v, td, role, node, port, rev."""

    trust_domain: str
    role: str
    node: str
    hbone_port: int
    revision: str
    version: int = PROTOCOL_VERSION

    def to_txt(self) -> dict[str, str]:
        return {
            "v": str(self.version),
            "td": self.trust_domain,
            "role": self.role,
            "node": self.node,
            "port": str(self.hbone_port),
            "rev": self.revision,
        }

    @property
    def instance(self) -> str:
        return instance_name(self.node)


def instance_name(node: str) -> str:
    return f"{node}.{SERVICE_TYPE}"


def _text(key: str, props: Mapping[str, str | None]) -> str:
    value = props.get(key)
    if value is None:
        raise TxtError(f"TXT key {key!r} is missing")
    return value


def parse_txt(properties: Mapping[Any, object]) -> Announcement:
    """Parse a TXT record (zeroconf gives bytes keys and bytes-or-None values; str is accepted too).
    Raise TxtError with the reason when the record is not a usable meshd announcement."""
    props: dict[str, str | None] = {}
    for k, v in properties.items():
        try:
            key = k.decode("utf-8") if isinstance(k, bytes) else k
            value = v.decode("utf-8") if isinstance(v, bytes) else v
        except UnicodeDecodeError:
            raise TxtError("TXT record is not UTF-8") from None
        if not isinstance(key, str) or not (value is None or isinstance(value, str)):
            raise TxtError(f"TXT entry {k!r} has an unexpected type")
        props[key.lower()] = value
    version_text = _text("v", props)
    if not (version_text.isascii() and version_text.isdigit()) or len(version_text) > 4:  # not "¹"
        raise TxtError(f"protocol version {version_text!r} is not a number")
    if int(version_text) != PROTOCOL_VERSION:
        raise TxtError(f"protocol version {version_text}, this meshd speaks {PROTOCOL_VERSION}")
    td = _text("td", props)
    try:
        validate_trust_domain(td)
    except InvalidSpiffeId as exc:
        raise TxtError(f"trust domain {td!r} is not valid: {exc}") from None
    role = _text("role", props)
    if role not in ROLES:
        raise TxtError(f"role {role!r} is not one of {', '.join(ROLES)}")
    node = _text("node", props)
    if not _NODE.match(node):
        raise TxtError(f"node name {node!r} is not valid")
    port_text = _text("port", props)
    if (
        not (port_text.isascii() and port_text.isdigit())
        or len(port_text) > 5
        or not 0 < int(port_text) < 65536
    ):
        raise TxtError(f"HBONE port {port_text!r} is not a port")
    rev = _text("rev", props)
    if not _REVISION.match(rev):
        raise TxtError(f"catalog revision {rev!r} is not a hex digest")
    return Announcement(td, role, node, int(port_text), rev)


# ---- interfaces (pure selection; the system is read at the edge) --------------------------------


@dataclass(frozen=True, slots=True)
class Interface:
    name: str
    ipv4: tuple[ipaddress.IPv4Interface, ...]
    up: bool = True
    multicast: bool = True
    loopback: bool = False


def select_interfaces(available: Iterable[Interface], wanted: tuple[str, ...]) -> list[Interface]:
    """The interfaces mDNS runs on: the ones named (any state), or by default every interface that is
    up, multicast-capable, not loopback and has an IPv4 address. MdnsConfigError for unknown names."""
    ifaces = list(available)
    if wanted:
        by_name = {i.name: i for i in ifaces}
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            have = ", ".join(sorted(by_name)) or "none"
            raise MdnsConfigError(
                f"discovery.interfaces: no interface {', '.join(unknown)} (this host has: {have})"
            )
        chosen = [by_name[n] for n in wanted]
        no_ip = [i.name for i in chosen if not i.ipv4]
        if no_ip:
            raise MdnsConfigError(f"discovery.interfaces: {', '.join(no_ip)} has no IPv4 address")
        return chosen
    return [i for i in ifaces if i.up and i.multicast and not i.loopback and i.ipv4]


def choose_address(candidates: Iterable[str], local: Iterable[ipaddress.IPv4Interface]) -> str | None:
    """Which of a peer's announced IPv4 addresses to dial: one on a network we share, else the first
    that is neither loopback nor unspecified."""
    ips = []
    for c in candidates:
        try:
            ip = ipaddress.IPv4Address(c)
        except ValueError:
            continue
        if not (ip.is_loopback or ip.is_unspecified or ip.is_multicast):
            ips.append(ip)
    nets = [i.network for i in local]
    for ip in ips:
        if any(ip in n for n in nets):
            return str(ip)
    return str(ips[0]) if ips else None


def system_interfaces() -> list[Interface]:
    """This host's interfaces (in the caller's network namespace): ifaddr + /sys/class/net flags."""
    out = []
    for adapter in ifaddr.get_adapters():
        ipv4 = tuple(
            ipaddress.IPv4Interface(f"{ip.ip}/{ip.network_prefix}") for ip in adapter.ips if ip.is_IPv4
        )
        try:
            flags = int(Path(f"/sys/class/net/{adapter.name}/flags").read_text().strip(), 16)
        except (OSError, ValueError):
            loop = any(i.ip.is_loopback for i in ipv4)
            flags = IFF_UP | (IFF_LOOPBACK if loop else IFF_MULTICAST)
        out.append(
            Interface(
                adapter.name,
                ipv4,
                up=bool(flags & IFF_UP),
                multicast=bool(flags & IFF_MULTICAST),
                loopback=bool(flags & IFF_LOOPBACK),
            )
        )
    return out


# ---- the thread bridge ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MdnsEvent:
    kind: Literal["added", "updated", "removed"]
    name: str  # the instance name, e.g. "alpha._meshd._tcp.local."


def thread_poster(
    send: trio.MemorySendChannel[MdnsEvent], token: trio.lowlevel.TrioToken
) -> Callable[[MdnsEvent], None]:
    """A function for foreign threads: hand an event to trio (blocking while the channel is full),
    or drop it quietly when trio is shutting down."""

    def post(event: MdnsEvent) -> None:
        with contextlib.suppress(
            trio.RunFinishedError, trio.BrokenResourceError, trio.ClosedResourceError, trio.Cancelled
        ):
            trio.from_thread.run(send.send, event, trio_token=token)

    return post


class _Listener(ServiceListener):
    """zeroconf calls these from its browser thread: post the event, nothing else."""

    def __init__(self, post: Callable[[MdnsEvent], None]) -> None:
        self._post = post

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._post(MdnsEvent("added", name))

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._post(MdnsEvent("updated", name))

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._post(MdnsEvent("removed", name))


# ---- the component ----------------------------------------------------------------------------------

OnPeer = Callable[[str, Address, str], None]  # (instance name, HBONE address, announced revision)
OnGoodbye = Callable[[str], None]  # (instance name)


@dataclass
class MdnsStatistics:
    interfaces: list[str] = field(default_factory=list)
    announced: dict[str, str] = field(default_factory=dict)
    registered: bool = False
    peers: dict[str, str] = field(default_factory=dict)  # instance -> address
    ignored: dict[str, str] = field(default_factory=dict)  # instance -> why
    error: str | None = None


class MdnsDiscovery:
    def __init__(
        self,
        *,
        trust_domain: str,
        node: str,
        role: str,
        hbone: Address,
        interfaces: tuple[str, ...],
        revision: str,
        on_peer: OnPeer,
        on_goodbye: OnGoodbye,
        list_interfaces: Callable[[], list[Interface]] = system_interfaces,
    ) -> None:
        self.trust_domain = trust_domain
        self.node = node
        self.role = role
        self.hbone = hbone
        self.wanted = interfaces
        self.on_peer = on_peer
        self.on_goodbye = on_goodbye
        self._list_interfaces = list_interfaces
        self._revision = revision  # what we should announce
        self._announced: str | None = None  # what we did announce
        self._draining = False
        self._wake = trio.Event()
        self._generation: dict[str, int] = {}
        self._limiter = trio.CapacityLimiter(MAX_RESOLVING)
        self._local: list[ipaddress.IPv4Interface] = []
        self._stats = MdnsStatistics()

    # -- called from trio by the node --
    def set_revision(self, revision: str) -> None:
        """Our catalog revision changed: re-announce (no-op if it did not)."""
        if revision != self._revision:
            self._revision = revision
            self._wake.set()

    def drain(self) -> None:
        """Say goodbye now: peers withdraw our endpoints while in-flight connections finish."""
        self._draining = True
        self._wake.set()

    def statistics(self) -> MdnsStatistics:
        return self._stats

    # -- the component --
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            chosen = select_interfaces(await trio.to_thread.run_sync(self._list_interfaces), self.wanted)
        except MdnsConfigError as exc:
            self._stats.error = str(exc)
            log.error("mDNS disabled: %s", exc)
            task_status.started()
            return
        if not chosen:
            self._stats.error = "no interface is up with multicast and an IPv4 address"
            log.warning(
                "mDNS disabled: %s (set discovery.interfaces, or use static peers)", self._stats.error
            )
            task_status.started()
            return
        self._local = [a for i in chosen for a in i.ipv4]
        self._stats.interfaces = [f"{i.name} ({', '.join(str(a) for a in i.ipv4)})" for i in chosen]
        bind = [str(a.ip) for a in self._local]
        try:
            zc = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=bind, ip_version=IPVersion.V4Only))
        except OSError as exc:
            self._stats.error = f"cannot open mDNS sockets: {exc}"
            log.error("mDNS disabled: %s (is UDP 5353 blocked or multicast off?)", self._stats.error)
            task_status.started()
            return
        send, receive = trio.open_memory_channel[MdnsEvent](EVENT_BUFFER)
        post = thread_poster(send, trio.lowlevel.current_trio_token())
        browser: ServiceBrowser | None = None
        try:
            browser = await trio.to_thread.run_sync(
                lambda: ServiceBrowser(zc, SERVICE_TYPE, listener=_Listener(post))
            )
            log.info("mDNS browsing", extra={"interfaces": ", ".join(bind), "type": SERVICE_TYPE})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._announce, zc)
                nursery.start_soon(self._consume, zc, receive, nursery)
                task_status.started()
        finally:
            receive.close()  # a browser thread blocked on a full channel gets BrokenResourceError
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT) as scope:
                await trio.to_thread.run_sync(self._close, zc, browser, abandon_on_cancel=True)
            if scope.cancelled_caught:
                log.warning("mDNS did not close within %.0f s; exiting anyway", CLOSE_TIMEOUT)

    def _service_info(self, revision: str) -> ServiceInfo:
        ann = Announcement(self.trust_domain, self.role, self.node, self.hbone.port, revision)
        host = self.hbone.host
        addresses = [host] if host not in WILDCARDS else [str(a.ip) for a in self._local]
        self._stats.announced = ann.to_txt()
        return ServiceInfo(
            SERVICE_TYPE,
            ann.instance,
            port=self.hbone.port,
            properties=ann.to_txt(),
            server=f"{self.node}.local.",
            parsed_addresses=addresses,
        )

    async def _announce(self, zc: Zeroconf) -> None:
        """Register, re-announce on revision changes, say goodbye on drain."""
        revision = self._revision
        info = self._service_info(revision)
        try:
            with trio.fail_after(REGISTER_TIMEOUT):
                await trio.to_thread.run_sync(zc.register_service, info, abandon_on_cancel=True)
        except NonUniqueNameException:
            self._stats.error = f"another host already announces node name {self.node!r}"
            log.error("mDNS: %s; not announcing (give each host its own node_name)", self._stats.error)
            return
        except trio.TooSlowError:
            self._stats.error = f"registration did not finish within {REGISTER_TIMEOUT:.0f} s"
            log.error("mDNS: %s", self._stats.error)
            return
        self._announced = revision
        self._stats.registered = True
        log.info("mDNS announced", extra={"instance": info.name, "revision": revision})
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self._draining:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await trio.to_thread.run_sync(zc.unregister_service, info, abandon_on_cancel=True)
                self._stats.registered = False
                log.info("mDNS goodbye sent", extra={"instance": info.name})
                return
            if self._revision != self._announced:
                revision = self._revision
                info = self._service_info(revision)
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await trio.to_thread.run_sync(zc.update_service, info, abandon_on_cancel=True)
                    self._announced = revision
                    log.info("mDNS re-announced", extra={"revision": revision})

    def _close(self, zc: Zeroconf, browser: ServiceBrowser | None) -> None:
        """In a worker thread: stop browsing, withdraw what is still registered (goodbye), close."""
        if browser is not None:
            browser.cancel()
        zc.unregister_all_services()  # no-op when the drain already said goodbye
        self._stats.registered = False
        zc.close()

    async def _consume(
        self, zc: Zeroconf, receive: trio.MemoryReceiveChannel[MdnsEvent], nursery: trio.Nursery
    ) -> None:
        async for event in receive:
            gen = self._generation[event.name] = self._generation.get(event.name, 0) + 1
            if event.kind == "removed":
                if self._stats.peers.pop(event.name, None) is not None:
                    log.info("mDNS peer said goodbye", extra={"instance": event.name})
                    self.on_goodbye(event.name)
                self._stats.ignored.pop(event.name, None)
            else:
                nursery.start_soon(self._resolve, zc, event.name, gen)

    async def _resolve(self, zc: Zeroconf, name: str, gen: int) -> None:
        if name.lower() == instance_name(self.node).lower():
            return  # ourselves
        info = await trio.to_thread.run_sync(
            lambda: zc.get_service_info(SERVICE_TYPE, name, timeout=RESOLVE_TIMEOUT_MS),
            limiter=self._limiter,
            abandon_on_cancel=True,
        )
        if self._generation.get(name) != gen:
            return  # a newer event for this name is being handled
        if info is None:
            self._ignore(name, f"no answer to resolution within {RESOLVE_TIMEOUT_MS} ms")
            return
        try:
            ann = parse_txt(info.properties)
        except TxtError as exc:
            self._ignore(name, str(exc))
            return
        if ann.trust_domain != self.trust_domain:
            self._ignore(name, f"trust domain {ann.trust_domain}, not ours", level=logging.DEBUG)
            return
        if ann.node == self.node:
            self._ignore(name, "announces our own node name", level=logging.WARNING)
            return
        if ann.instance.lower() != name.lower():
            self._ignore(name, f"TXT node {ann.node!r} does not match the instance name")
            return
        ip = choose_address(info.parsed_addresses(IPVersion.V4Only), self._local)
        if ip is None:
            self._ignore(name, "no usable IPv4 address")
            return
        address = Address(ip, ann.hbone_port)
        self._stats.ignored.pop(name, None)
        if self._stats.peers.get(name) != str(address):
            log.info(
                "mDNS peer seen", extra={"instance": name, "address": str(address), "revision": ann.revision}
            )
        self._stats.peers[name] = str(address)
        self.on_peer(name, address, ann.revision)

    def _ignore(self, name: str, why: str, *, level: int = logging.INFO) -> None:
        if self._stats.ignored.get(name) != why:
            log.log(level, "mDNS announcement ignored", extra={"instance": name, "reason": why})
        self._stats.ignored[name] = why
        if self._stats.peers.pop(name, None) is not None:
            self.on_goodbye(name)
