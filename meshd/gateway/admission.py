"""Who may tunnel through a gateway, and to where. Pure: no I/O.

An outer CONNECT arrives over mTLS as a node of another network (double HBONE: the node presents its
node identity outside, its workload's identity only inside). It is admitted when:
- the peer is a meshd node identity (a workload certificate is never used for the outer tunnel);
- the node is known (from its network's catalog) and in another network than the ones this gateway
  fronts, in `gateway.allow_networks` if that is set, and in `gateway.allow_nodes` if that is set;
- the authority `ip:port` is a node's HBONE endpoint, or a workload's address and port, in a network
  this gateway fronts (then the workload's node's HBONE endpoint is dialled): never anywhere else;
- or, on a public gateway holding a reverse connection from another network's gateway, the authority
  is in that network and the node is not: the tunnel goes on through the reverse connection.
Each refusal is a `Refused` with the status the outer CONNECT is answered with.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from meshd.config.model import GatewayConfig
from meshd.dataplane.proxied import Refused
from meshd.discovery.catalog import Catalog
from meshd.hbone.connection import parse_authority
from meshd.identity.spiffe import SpiffeId
from meshd.observe.accesslog import FLAG_NO_ROUTE, FLAG_UNAUTHORIZED
from meshd.units import Address


@dataclass(frozen=True, slots=True)
class Forward:
    """An admitted outer CONNECT: the source node and network, and where the inner bytes go."""

    source_node: str
    source_network: str
    target_node: str
    target: Address
    via_reverse: str | None = None  # the network whose reverse connection carries it on


def admit(
    catalog: Catalog,
    gateway: GatewayConfig,
    fronted: tuple[str, ...],
    peer: SpiffeId,
    authority: str,
    reverse: Collection[str] = (),
) -> Forward:
    if not peer.is_node:
        raise Refused(
            401,
            FLAG_UNAUTHORIZED,
            f"{peer.uri} is not a node identity: the outer tunnel is opened as the node",
        )
    node = peer.service_account.removeprefix("node-")
    found = catalog.node(node)
    if found is None:
        raise Refused(401, FLAG_UNAUTHORIZED, f"node {node!r} is in no network this gateway knows")
    network = found[0].network
    dest = parse_authority(authority)
    if dest is None:
        raise Refused(400, None, f"CONNECT authority {authority!r} is not ip:port")
    inner = catalog.inner_endpoint(dest[0], dest[1], fronted)
    via = None
    if inner is None and reverse:
        inner = catalog.inner_endpoint(dest[0], dest[1], reverse)
        via = inner[0].network if inner is not None else None
    if inner is None:
        raise Refused(
            503, FLAG_NO_ROUTE, f"{authority} is no node or workload in network {', '.join(fronted)}"
        )
    if (network in fronted and via is None) or network == via:
        raise Refused(
            401,
            FLAG_UNAUTHORIZED,
            f"node {node!r} is in network {network!r}, as is {authority}: dial directly",
        )
    if gateway.allow_networks and network not in gateway.allow_networks:
        raise Refused(401, FLAG_UNAUTHORIZED, f"network {network!r} is not in gateway.allow_networks")
    if gateway.allow_nodes and node not in gateway.allow_nodes:
        raise Refused(401, FLAG_UNAUTHORIZED, f"node {node!r} is not in gateway.allow_nodes")
    return Forward(node, network, inner[0].node, inner[1], via)


def admit_catalog_read(
    catalog: Catalog, gateway: GatewayConfig, fronted: tuple[str, ...], peer: SpiffeId
) -> None:
    """May `peer` read this gateway's network catalog? Node identities only; a node known to be in
    another network must be in `gateway.allow_networks` (if set). A node not known yet is served: two
    gateways learn each other's networks from each other's catalogs, so neither could start otherwise
    (its mTLS identity is of our trust domain, from our CA). Raises Refused(403)."""
    if not peer.is_node:
        raise Refused(403, None, "the network catalog is served to meshd node identities only")
    found = catalog.node(peer.service_account.removeprefix("node-"))
    if found is None or found[0].network in fronted:
        return
    if gateway.allow_networks and found[0].network not in gateway.allow_networks:
        raise Refused(403, None, f"network {found[0].network!r} is not in gateway.allow_networks")
