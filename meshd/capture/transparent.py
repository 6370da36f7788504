"""Transparent mode on a node: the capture listener (15001), meshd's nftables table, the DNS proxy.

The table's lifetime is the capture listener's: installed (replacing a stale one) once 15001 is
bound, removed when the listener stops (drain, exit). A connection redirected to 15001 is mapped
from its original destination (SO_ORIGINAL_DST) VIP:port to the service and port, and then handled
exactly as one accepted by an `[[upstream]]` listener for that service port (the upstream rule for
the source identity: the host's single workload, else the node's own).

UDP to a VIP: every service port with `protocol = "udp"` in the catalog gets a UDP upstream of its own
on capture.listen's host and an ephemeral port, and the table's `udp_vips` map sends VIP:port there
(a UDP socket cannot learn a redirected datagram's original destination, so each service port has
its own socket). Both follow the catalog, checked every UDP_SYNC_INTERVAL seconds.

Without the `nft` binary or CAP_NET_ADMIN, meshd logs why and keeps running in explicit mode.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import trio
from prometheus_client import Counter

from meshd.capture import nft
from meshd.capture.dns_server import DnsServer
from meshd.config.model import UpstreamConfig
from meshd.dataplane.state import NodeState
from meshd.discovery.catalog import ServiceEntry
from meshd.discovery.vip import VipIndex, VipTable
from meshd.listeners import open_listeners, original_destination, peer_of, per_connection
from meshd.observe.accesslog import FLAG_NO_ROUTE, ConnectionRecord
from meshd.policy.evaluate import mtls_mode
from meshd.units import Address

log = logging.getLogger("meshd.capture")

UDP_SYNC_INTERVAL = 1.0

# The node's outbound path, handed in by the node: a captured connection is handled exactly as one
# accepted by an [[upstream]] listener for the service port it was headed to.
OutboundHandler = Callable[[trio.SocketStream, UpstreamConfig], Awaitable[None]]


class UdpListener(Protocol):
    """A UDP upstream for one service port, as the node makes them (meshd/node/udp_outbound.py)."""

    @property
    def address(self) -> tuple[str, int] | None: ...

    async def serve(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None: ...


# Handed in by the node, as the TCP path is: a UDP upstream listening where the `udp_vips` map points.
UdpUpstreamFactory = Callable[[UpstreamConfig], UdpListener]


class Capture:
    def __init__(
        self, state: NodeState, outbound: OutboundHandler, udp_upstream: UdpUpstreamFactory | None = None
    ) -> None:
        self.state = state
        self.outbound = outbound
        self.udp_upstream = udp_upstream
        self.udp_upstreams: dict[tuple[str, int], tuple[UdpListener, trio.CancelScope]] = {}
        self.udp_map: dict[tuple[str, int], int] = {}  # (VIP, port) -> local UDP port, as installed
        cfg = state.config
        self.vips = VipIndex(cfg.capture.vip_range)
        self.status = "off" if cfg.capture.mode == "off" else "starting"
        self.dns: DnsServer | None = None
        if cfg.dns.enabled:
            queries = Counter(
                "meshd_dns_queries",
                "DNS proxy queries by result",
                ("result",),
                registry=state.metrics.registry,
            )
            self.dns = DnsServer(cfg.dns, self.view, queries)

    @property
    def enabled(self) -> bool:
        return self.state.config.capture.mode != "off"

    def table(self) -> VipTable:
        """VIPs of the current catalog's services (follows reloads and peers' catalogs)."""
        table, new = self.vips.table(self.state.catalog.services)
        for collision in new:
            log.warning("VIP collision: %s", collision)
        return table

    def view(self) -> tuple[Mapping[str, ServiceEntry], VipTable]:
        return self.state.catalog.services, self.table()

    def inbound_rules(self) -> list[nft.InboundRule]:
        """Workload ports reachable from other hosts, by mTLS mode (loopback ones are not)."""
        cfg = self.state.config
        if not cfg.capture.inbound:
            return []
        rules = []
        for w in cfg.workloads:
            if ipaddress.ip_address(w.address).is_loopback:
                continue
            mode = mtls_mode(self.state.policy, w.namespace, w.name, w.mtls)
            action: Any = "drop" if mode == "STRICT" else "redirect"
            rules += [nft.InboundRule(w.address, p, action) for p in w.ports]
        return rules

    def ruleset(self) -> str:
        cfg = self.state.config
        return nft.ruleset(
            cfg.capture.vip_range,
            cfg.capture.listen.port,
            cfg.listen.plaintext_address.port,
            self.inbound_rules(),
            dns_port=cfg.dns.listen.port if cfg.dns.capture else None,
        )

    async def serve(
        self, connections: trio.Nursery, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind 15001, install the table, accept until cancelled, remove the table."""
        cfg = self.state.config.capture
        listeners = await open_listeners("capture.listen", cfg.listen)
        try:
            await nft.install(cfg.nft, self.ruleset())
        except nft.NftUnavailable as exc:
            for listener in listeners:
                await listener.aclose()
            self.status = f"unavailable: {exc}"
            log.error("capture disabled, running in explicit mode only: %s", exc)
            task_status.started()
            return
        self.status = "active"
        if self.dns is not None and self.state.config.dns.capture:
            # Port 53 is redirected to the proxy now: its own forwarded queries must be let through.
            self.dns.mark = nft.DNS_MARK
        log.info(
            "capture installed",
            extra={
                "table": f"{nft.FAMILY} {nft.TABLE}",
                "vip_range": cfg.vip_range,
                "listen": str(cfg.listen),
                "inbound_rules": len(self.inbound_rules()),
                "dns_capture": self.state.config.dns.capture,
            },
        )
        try:
            async with trio.open_nursery() as udp:
                if self.udp_upstream is not None:
                    udp.start_soon(self._serve_udp)
                await trio.serve_listeners(
                    per_connection(self.handle, "capture"),
                    listeners,
                    handler_nursery=connections,
                    task_status=task_status,
                )
        finally:
            self.status = "removed"
            await nft.remove(cfg.nft)
            if self.dns is not None:
                self.dns.mark = None

    async def handle(self, stream: trio.SocketStream) -> None:
        dest = original_destination(stream.socket)
        service = self.table().service(dest[0]) if dest is not None else None
        if dest is None or service is None:
            async with stream:
                peer = peer_of(stream)
                if peer is None:
                    return
                rec = ConnectionRecord(
                    reporter="source", src=f"{peer[0]}:{peer[1]}", dst=f"{dest[0]}:{dest[1]}" if dest else ""
                )
                why = "is not a service VIP" if dest else "has no original destination (not redirected)"
                self.state.telemetry.failed(rec, FLAG_NO_ROUTE, f"captured connection {rec.dst or ''} {why}")
            return
        up = UpstreamConfig(service=service, port=dest[1], listen=Address(*dest))
        await self.outbound(stream, up)

    async def _serve_udp(self) -> None:
        """Keep one UDP upstream per UDP service port of the catalog, and the `udp_vips` map, in step."""
        seen = None
        async with trio.open_nursery() as nursery:
            while True:
                if self.state.catalog is not seen:
                    seen = self.state.catalog
                    try:
                        await self._sync_udp(nursery)
                    except nft.NftUnavailable as exc:
                        log.error("could not update UDP capture (the map %s): %s", nft.UDP_MAP, exc)
                        seen = None  # try again
                await trio.sleep(UDP_SYNC_INTERVAL)

    async def _sync_udp(self, nursery: trio.Nursery) -> None:
        assert self.udp_upstream is not None
        cfg = self.state.config
        table = self.table()
        wanted: dict[tuple[str, int], str] = {}
        for service_key, svc in self.state.catalog.services.items():
            vip = table.vip(service_key)
            if vip is not None:
                wanted.update({(service_key, p.port): vip for p in svc.ports if p.protocol == "udp"})
        for key in set(self.udp_upstreams) - set(wanted):
            self.udp_upstreams.pop(key)[1].cancel()
        for key in sorted(set(wanted) - set(self.udp_upstreams)):
            up = UpstreamConfig(
                service=key[0], port=key[1], listen=Address(cfg.capture.listen.host, 0), protocol="udp"
            )
            upstream = self.udp_upstream(up)
            scope = trio.CancelScope()
            await nursery.start(_scoped, scope, upstream)
            self.udp_upstreams[key] = (upstream, scope)
        entries = {}
        for key, vip in wanted.items():
            address = self.udp_upstreams[key][0].address
            assert address is not None
            entries[(vip, key[1])] = address[1]
        if entries != self.udp_map:
            await nft.run_nft(cfg.capture.nft, nft.udp_map_script(entries))
            self.udp_map = entries
            log.info("UDP capture updated", extra={"udp_vips": len(entries)})

    def config_dump(self) -> dict[str, Any]:
        return {
            "mode": self.state.config.capture.mode,
            "status": self.status,
            "udp": {f"{vip}:{port}": local for (vip, port), local in sorted(self.udp_map.items())},
            **self.table().to_json(),
            "dns": self.dns.statistics() if self.dns is not None else None,
        }


async def _scoped(
    scope: trio.CancelScope, upstream: UdpListener, *, task_status: trio.TaskStatus[Any]
) -> None:
    with scope:
        await upstream.serve(task_status=task_status)
