"""The gateway role's data plane: outer HBONE CONNECTs in, their bytes out to a node of the network
it fronts, untouched.

The bytes inside an outer tunnel are the inner HBONE connection's TLS records (double HBONE): the
gateway never holds the keys for them, cannot read or alter what they carry, and does not try to. It
authorizes the outer CONNECT (`admission.py`: an address, or a service hostname as ztunnel names it, for
which it picks the endpoint), opens TCP to the inner endpoint's HBONE port, and pumps.
Telemetry: Istio's TCP metrics with reporter="source" (as Istio's gateways report), the outer
tunnel's peer (a node identity) as source, the inner endpoint's node as destination; one access-log
line per forwarded connection. It also serves `GET /meshd/v1/network-catalog` (docs/multi-network.md)
and hands any other request (its own network's catalog fetch) to `fallback`.

Reverse connections (meshd's own extension, for a site where no inbound port can be opened): a
CONNECT carrying `x-meshd-reverse: <network>` from another network's gateway is accepted and the
tunnel becomes an HBONE connection with the roles swapped: this gateway opens tunnels on it, the
gateway that dialled out serves them (`reverse.py` is that side). Outer CONNECTs for that network are
then forwarded through it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import trio

from meshd.balance import RoundRobin
from meshd.dataplane.proxied import Refused, proxied
from meshd.dataplane.state import NodeState
from meshd.discovery.catalog import NodeCatalog
from meshd.discovery.networks import NETWORK_CATALOG_PATH, encode_network_catalog, served_catalogs
from meshd.gateway.admission import Forward, ServicePick, admit, admit_catalog_read
from meshd.hbone._link import HboneLink
from meshd.hbone.errors import HboneConnectError, PeerIdentityError, TunnelRefused
from meshd.hbone.pool import HbonePool
from meshd.hbone.server import Handler, InboundRequest, ServerReply
from meshd.hbone.stream import TunnelStream
from meshd.observe.accesslog import (
    FLAG_NO_HEALTHY,
    FLAG_UNAUTHORIZED,
    FLAG_UPSTREAM_CONNECT,
    ConnectionRecord,
    WorkloadLabels,
)
from meshd.units import Address

log = logging.getLogger("meshd.gateway")

CONNECT_TIMEOUT = 5.0


REVERSE_HEADER = "x-meshd-reverse"  # meshd's own: this CONNECT opens a reverse connection for <network>


class Gateway:
    def __init__(self, state: NodeState, pool: HbonePool, fallback: Handler) -> None:
        self.state = state
        self.pool = pool
        self.fallback = fallback
        self.remote: list[NodeCatalog] = []  # other networks' catalogs, set by the node's fetcher
        self.reverse: dict[str, HboneLink] = {}  # network -> the reverse connection its gateway keeps
        self.on_reverse_change: Callable[[], None] = lambda: None
        self._open_per_network: Counter[str] = Counter()
        self._rotations: dict[str, RoundRobin[ServicePick]] = {}  # service hostname -> endpoint choice
        self.forwarded = 0

    def statistics(self) -> dict[str, object]:
        return {
            "open_per_network": dict(self._open_per_network),
            "forwarded": self.forwarded,
            "reverse": {n: str(Address(*link.peer_address)) for n, link in self.reverse.items()},
        }

    async def handle(self, req: InboundRequest, reply: ServerReply) -> None:
        if not req.is_connect:
            if req.method == "GET" and req.path == NETWORK_CATALOG_PATH:
                await self._serve_network_catalog(req, reply)
            else:
                await self.fallback(req, reply)
            return
        network = req.header(REVERSE_HEADER)
        if network is not None:
            await self._hold_reverse(req, reply, network)
            return
        cfg = self.state.config
        rec = ConnectionRecord(
            reporter="source",
            src=req.client_address,
            dst=req.authority,
            source_identity=req.peer_identity,
            peer=str(Address(*req.peer_address)),
        )
        try:
            forward = admit(
                self.state.catalog,
                cfg.gateway,
                cfg.fronted_networks,
                req.peer_identity,
                req.target,
                reverse=self.reverse.keys(),
                rotations=self._rotations,
            )
            upstream = await self._connect(rec, forward, req)
        except Refused as refused:
            self.state.telemetry.failed(rec, refused.flag or "-", refused.reason)
            await reply.refuse(refused.status, refused.reason)
            return
        self._open_per_network[forward.source_network] += 1
        self.forwarded += 1
        try:
            async with upstream:
                await proxied(self.state, rec, await reply.accept(), upstream)
        finally:
            self._open_per_network[forward.source_network] -= 1

    async def _connect(
        self, rec: ConnectionRecord, forward: Forward, req: InboundRequest
    ) -> trio.abc.HalfCloseableStream:
        limit = self.state.config.gateway.max_connections_per_network
        if self._open_per_network[forward.source_network] >= limit:
            raise Refused(
                503,
                FLAG_NO_HEALTHY,
                f"network {forward.source_network!r} has {limit} connections open through this gateway "
                "(gateway.max_connections_per_network)",
            )
        rec.destination = WorkloadLabels(
            workload=forward.target_node, namespace="meshd-system", cluster=self.state.config.trust_domain
        )
        rec.destination_service = forward.service or f"{forward.target}"
        if forward.via_reverse is not None:
            return await self._through_reverse(forward.via_reverse, req)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                return await trio.open_tcp_stream(forward.target.host, forward.target.port)
        except (OSError, trio.TooSlowError) as exc:
            reason = f"connect to {forward.target_node} at {forward.target} failed: {exc or 'timed out'}"
            raise Refused(503, FLAG_UPSTREAM_CONNECT, reason) from None

    async def _through_reverse(self, network: str, req: InboundRequest) -> TunnelStream:
        link = self.reverse.get(network)
        if link is None:
            raise Refused(
                503, FLAG_UPSTREAM_CONNECT, f"the reverse connection for network {network!r} is gone"
            )
        headers = [(k, v) for k, v in req.headers if k in ("forwarded", "baggage", "traceparent")]
        try:
            return await self.pool.open_tunnel_on(link, req.authority, headers)
        except TunnelRefused as exc:
            flag = FLAG_UNAUTHORIZED if exc.status == 401 else FLAG_UPSTREAM_CONNECT
            raise Refused(exc.status, flag, f"network {network!r}'s gateway refused: {exc.reason}") from None
        except (HboneConnectError, PeerIdentityError) as exc:
            raise Refused(503, FLAG_UPSTREAM_CONNECT, f"reverse connection for {network!r}: {exc}") from None

    async def _hold_reverse(self, req: InboundRequest, reply: ServerReply, network: str) -> None:
        """Keep another network's reverse connection until it ends. Only a node identity of our
        trust domain (checked by the server) of another network, allowed by `gateway.allow_networks`.
        What it may claim is bounded: the inner TLS is still verified end to end, so a false claim
        can only make that network's traffic fail, never read it."""
        cfg = self.state.config
        if not req.peer_identity.is_node:
            await reply.refuse(401, "a reverse connection is opened as a gateway's node identity")
            return
        if network in cfg.fronted_networks or (
            cfg.gateway.allow_networks and network not in cfg.gateway.allow_networks
        ):
            await reply.refuse(401, f"network {network!r} may not hold a reverse connection here")
            return
        stream = await reply.accept()
        link = self.pool.client_link_over(stream, req.peer_identity, req.peer_address)
        old = self.reverse.get(network)
        self.reverse[network] = link
        log.info("reverse connection up", extra={"network": network, "gateway": str(req.peer_identity)})
        self.on_reverse_change()
        try:
            await link.run()
        finally:
            if self.reverse.get(network) is link:
                del self.reverse[network]
                if old is not None and old.usable:
                    self.reverse[network] = old
                self.on_reverse_change()
            log.info("reverse connection down", extra={"network": network, "failure": link.failure})

    async def _serve_network_catalog(self, req: InboundRequest, reply: ServerReply) -> None:
        cfg = self.state.config
        try:
            admit_catalog_read(self.state.catalog, cfg.gateway, cfg.fronted_networks, req.peer_identity)
        except Refused as refused:
            await reply.refuse(refused.status, refused.reason)
            return
        body = encode_network_catalog(
            cfg.network, served_catalogs(self.state.catalog, cfg.fronted_networks, self.remote)
        )
        await reply.respond(200, [("content-type", "application/json")], body)
