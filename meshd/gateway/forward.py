"""The gateway role's data plane: outer HBONE CONNECTs in, their bytes out to a node of the network
it fronts, untouched.

The bytes inside an outer tunnel are the inner HBONE connection's TLS records (double HBONE): the
gateway never holds the keys for them, cannot read or alter what they carry, and does not try to. It
authorizes the outer CONNECT (`admission.py`), opens TCP to the inner endpoint's HBONE port, and pumps.
Telemetry: Istio's TCP metrics with reporter="source" (as Istio's gateways report), the outer
tunnel's peer (a node identity) as source, the inner endpoint's node as destination; one access-log
line per forwarded connection. It also serves `GET /meshd/v1/network-catalog` (docs/multi-network.md)
and hands any other request (its own network's catalog fetch) to `fallback`.
"""

from __future__ import annotations

import logging
from collections import Counter

import trio

from meshd.dataplane.proxied import Refused, proxied
from meshd.dataplane.state import NodeState
from meshd.discovery.catalog import NodeCatalog
from meshd.discovery.networks import NETWORK_CATALOG_PATH, encode_network_catalog, served_catalogs
from meshd.gateway.admission import Forward, admit
from meshd.hbone.server import Handler, InboundRequest, ServerReply
from meshd.observe.accesslog import FLAG_NO_HEALTHY, FLAG_UPSTREAM_CONNECT, ConnectionRecord, WorkloadLabels
from meshd.units import Address

log = logging.getLogger("meshd.gateway")

CONNECT_TIMEOUT = 5.0


class Gateway:
    def __init__(self, state: NodeState, fallback: Handler) -> None:
        self.state = state
        self.fallback = fallback
        self.remote: list[NodeCatalog] = []  # other networks' catalogs, set by the node's fetcher
        self._open_per_network: Counter[str] = Counter()
        self.forwarded = 0

    def statistics(self) -> dict[str, object]:
        return {"open_per_network": dict(self._open_per_network), "forwarded": self.forwarded}

    async def handle(self, req: InboundRequest, reply: ServerReply) -> None:
        if not req.is_connect:
            if req.method == "GET" and req.path == NETWORK_CATALOG_PATH:
                await self._serve_network_catalog(req, reply)
            else:
                await self.fallback(req, reply)
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
                self.state.catalog, cfg.gateway, cfg.fronted_networks, req.peer_identity, req.authority
            )
            upstream = await self._connect(rec, forward)
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

    async def _connect(self, rec: ConnectionRecord, forward: Forward) -> trio.SocketStream:
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
        rec.destination_service = f"{forward.target}"
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                return await trio.open_tcp_stream(forward.target.host, forward.target.port)
        except (OSError, trio.TooSlowError) as exc:
            reason = f"connect to {forward.target_node} at {forward.target} failed: {exc or 'timed out'}"
            raise Refused(503, FLAG_UPSTREAM_CONNECT, reason) from None

    async def _serve_network_catalog(self, req: InboundRequest, reply: ServerReply) -> None:
        # HboneServer checked the trust domain; only meshd nodes get catalogs (as on the node's own).
        if not req.peer_identity.is_node:
            await reply.refuse(403, "the network catalog is served to meshd node identities only")
            return
        cfg = self.state.config
        body = encode_network_catalog(
            cfg.network, served_catalogs(self.state.catalog, cfg.fronted_networks, self.remote)
        )
        await reply.respond(200, [("content-type", "application/json")], body)
