"""The NAT'd side of a reverse connection (`gateway.reverse = true`; meshd's own extension).

A gateway that cannot accept inbound connections dials each `gateway.remote` gateway out, as its node
identity, and sends `CONNECT` with `x-meshd-reverse: <its network>`. Once answered 200, the tunnel is an
HBONE connection with the roles swapped: the public gateway opens tunnels (outer CONNECTs for this
network, network-catalog GETs) and this gateway serves them with its ordinary handler, as if they had
come in on 15008. When the connection ends it dials again (1 s, doubling to 30 s while it fails).
"""

from __future__ import annotations

import logging

import trio

from meshd.dataplane.state import NodeState
from meshd.discovery.networks import NETWORK_CATALOG_PATH
from meshd.gateway.forward import REVERSE_HEADER
from meshd.hbone.errors import HboneConnectError, PeerIdentityError, TunnelRefused
from meshd.hbone.pool import HbonePool
from meshd.hbone.server import HboneServer
from meshd.hbone.tls import CONTROL_SNI
from meshd.units import Address

log = logging.getLogger("meshd.gateway.reverse")

RETRY_FIRST = 1.0
RETRY_MAX = 30.0


class ReverseDialer:
    def __init__(self, state: NodeState, pool: HbonePool, server: HboneServer) -> None:
        self.state = state
        self.pool = pool
        self.server = server
        self.up: dict[str, bool] = {}  # remote gateway address -> connection up

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for address in self.state.config.gateway.remote:
                nursery.start_soon(self._keep, address)
            task_status.started()

    async def _keep(self, address: Address) -> None:
        delay = RETRY_FIRST
        while True:
            self.up[str(address)] = False
            try:
                await self._once(address)
                delay = RETRY_FIRST  # it was up: dial again at once-ish
            except (HboneConnectError, PeerIdentityError, TunnelRefused) as exc:
                log.warning("reverse connection failed", extra={"gateway": str(address), "error": str(exc)})
                delay = min(delay * 2, RETRY_MAX)
            self.up[str(address)] = False
            await trio.sleep(delay)

    async def _once(self, address: Address) -> None:
        node = self.state.node_identity
        where = (address.host, address.port)
        # Who answers there (a node identity of our trust domain): the tunnel must be pinned to it.
        _, _, _, peer = await self.pool.get_control(
            node, where, NETWORK_CATALOG_PATH, server_hostname=CONTROL_SNI
        )
        if not peer.is_node:
            raise PeerIdentityError(f"{address} presented {peer}, not a meshd node identity")
        tunnel = await self.pool.open_tunnel(
            node, peer, where, str(address), headers=[(REVERSE_HEADER, self.state.config.network)]
        )
        self.up[str(address)] = True
        log.info("reverse connection up", extra={"gateway": str(address), "peer": peer.uri})
        await self.server.serve_stream(tunnel, peer, where)
        log.info("reverse connection down", extra={"gateway": str(address)})
