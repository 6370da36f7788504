"""Who may tunnel through a gateway, and to where. Pure: no I/O.

An outer CONNECT arrives over mTLS from another network (double HBONE). It is admitted when:
- the peer is a meshd node identity (a meshd node presents its node identity outside, its workload's
  identity only inside), or a workload identity (a ztunnel client presents its workload's certificate
  on both), and the node, or the workloads with that identity, are known (from their network's
  catalog) and in one network other than the ones this gateway fronts, in `gateway.allow_networks` if
  that is set, and (the node, or every node running those workloads) in `gateway.allow_nodes` if set;
- the authority `ip:port` is a node's HBONE endpoint, or a workload's address and port, in a network
  this gateway fronts (then the workload's node's HBONE endpoint is dialled): never anywhere else;
- or the authority is a service hostname `<name>.<namespace>.svc.cluster.local:<service port>`
  (ztunnel's form, meshd/discovery/hostnames.py) of a service with an endpoint in a network this
  gateway fronts: one is picked, round robin, and its node's HBONE endpoint is dialled (for a service
  bound to a waypoint: the waypoint's HBONE endpoint, if the waypoint is in such a network);
- or, on a public gateway holding a reverse connection from another network's gateway, the authority
  is in that network and the node is not: the tunnel goes on through the reverse connection.
Each refusal is a `Refused` with the status the outer CONNECT is answered with.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from meshd.balance import RoundRobin
from meshd.config.model import GatewayConfig
from meshd.dataplane.proxied import Refused
from meshd.discovery.catalog import Catalog, NodeCatalog, WorkloadEntry
from meshd.discovery.hostnames import hostname_hint, service_key_of
from meshd.hbone.target import ConnectTarget, HostnameTarget, SocketTarget
from meshd.identity.spiffe import SpiffeId
from meshd.observe.accesslog import FLAG_NO_ROUTE, FLAG_UNAUTHORIZED
from meshd.units import Address


@dataclass(frozen=True, slots=True)
class Forward:
    """An admitted outer CONNECT: the source node (for a workload identity: the node its workload runs
    on) and network, and where the inner bytes go."""

    source_node: str
    source_network: str
    target_node: str
    target: Address
    via_reverse: str | None = None  # the network whose reverse connection carries it on
    service: str | None = None  # the service key, when the CONNECT named a service hostname


ServicePick = tuple[NodeCatalog, Address, WorkloadEntry]


def _source(catalog: Catalog, gateway: GatewayConfig, peer: SpiffeId) -> tuple[str, str]:
    """(node, network) of the outer TLS peer: a meshd node identity (meshd's nodes), or a workload
    identity (a ztunnel client presents its workload's certificate outside too), located by the
    catalog entries of the workloads that have it. Raises Refused(401)."""
    if peer.is_node:
        node = peer.service_account.removeprefix("node-")
        found = catalog.node(node)
        if found is None:
            raise Refused(401, FLAG_UNAUTHORIZED, f"node {node!r} is in no network this gateway knows")
        nodes, network = [node], found[0].network
    else:
        workloads = catalog.workloads_of(peer)
        networks = sorted({w.network for w in workloads})
        if not networks:
            raise Refused(
                401,
                FLAG_UNAUTHORIZED,
                f"{peer.uri} is neither a node identity nor a workload this gateway knows of",
            )
        if len(networks) > 1:
            raise Refused(
                401,
                FLAG_UNAUTHORIZED,
                f"workload identity {peer.uri} is in several networks ({', '.join(networks)}): "
                "its network cannot be told",
            )
        nodes, network = sorted({w.node for w in workloads}), networks[0]
    if gateway.allow_networks and network not in gateway.allow_networks:
        raise Refused(401, FLAG_UNAUTHORIZED, f"network {network!r} is not in gateway.allow_networks")
    outside = [n for n in nodes if n not in gateway.allow_nodes]
    if gateway.allow_nodes and outside:
        raise Refused(401, FLAG_UNAUTHORIZED, f"node {outside[0]!r} is not in gateway.allow_nodes")
    return nodes[0], network


def _to_address(
    catalog: Catalog, fronted: tuple[str, ...], target: SocketTarget, reverse: Collection[str]
) -> tuple[NodeCatalog, Address, str | None]:
    inner = catalog.inner_endpoint(target.host, target.port, fronted)
    via = None
    if inner is None and reverse:
        inner = catalog.inner_endpoint(target.host, target.port, reverse)
        via = inner[0].network if inner is not None else None
    if inner is None:
        raise Refused(503, FLAG_NO_ROUTE, f"{target} is no node or workload in network {', '.join(fronted)}")
    return inner[0], inner[1], via


def _to_waypoint(
    catalog: Catalog, fronted: tuple[str, ...], key: str, name: str, reverse: Collection[str]
) -> tuple[NodeCatalog, Address, str | None]:
    found = catalog.waypoint_hbone(name)
    if found is None:
        raise Refused(
            503, FLAG_NO_ROUTE, f"service {key} uses waypoint {name!r}, which is not in the catalog"
        )
    waypoint, address = found
    if waypoint.network in fronted:
        return waypoint, address, None
    if waypoint.network in reverse:
        return waypoint, address, waypoint.network
    raise Refused(
        503, FLAG_NO_ROUTE, f"service {key}'s waypoint {name!r} is in no network this gateway fronts"
    )


def _to_service(
    catalog: Catalog,
    fronted: tuple[str, ...],
    target: HostnameTarget,
    reverse: Collection[str],
    rotations: dict[str, RoundRobin[ServicePick]],
) -> tuple[NodeCatalog, Address, str | None, str]:
    """ztunnel's double HBONE names the service, and the gateway picks the endpoint (round robin)."""
    key = service_key_of(target.hostname)
    if key is None:
        raise Refused(
            400, None, f"CONNECT authority {str(target)!r} is not ip:port nor a service {hostname_hint()}"
        )
    svc = catalog.services.get(key)
    if svc is None:
        raise Refused(503, FLAG_NO_ROUTE, f"no service {key} in the networks this gateway knows")
    if svc.port(target.port) is None:
        raise Refused(503, FLAG_NO_ROUTE, f"service {key} has no port {target.port}")
    if svc.waypoint is not None:  # ztunnel names the service waypoint or not; its waypoint serves it
        return (*_to_waypoint(catalog, fronted, key, svc.waypoint, reverse), key)
    candidates = catalog.service_endpoints(key, target.port, fronted)
    via = None
    if not candidates and reverse:
        candidates = catalog.service_endpoints(key, target.port, reverse)
        via = candidates[0][0].network if candidates else None
    picked = rotations.setdefault(f"{key}:{target.port}", RoundRobin()).pick(candidates)
    if picked is None:
        raise Refused(
            503,
            FLAG_NO_ROUTE,
            f"service {key} port {target.port} has no endpoint in network {', '.join(fronted)}",
        )
    return picked[0], picked[1], via, key


def admit(
    catalog: Catalog,
    gateway: GatewayConfig,
    fronted: tuple[str, ...],
    peer: SpiffeId,
    target: ConnectTarget | None,
    reverse: Collection[str] = (),
    rotations: dict[str, RoundRobin[ServicePick]] | None = None,
) -> Forward:
    """Admit an outer CONNECT from `peer` to `target` (its parsed `:authority`; None if the core could
    not parse it), or raise Refused. `rotations` keeps the round robin of service hostnames between
    calls (the gateway owns it)."""
    node, network = _source(catalog, gateway, peer)
    service = None
    if isinstance(target, SocketTarget):
        dest_node, dest, via = _to_address(catalog, fronted, target, reverse)
    elif isinstance(target, HostnameTarget):
        dest_node, dest, via, service = _to_service(
            catalog, fronted, target, reverse, {} if rotations is None else rotations
        )
    else:
        raise Refused(400, None, f"CONNECT authority is not ip:port nor a service {hostname_hint()}")
    if (network in fronted and via is None) or network == via:
        raise Refused(
            401,
            FLAG_UNAUTHORIZED,
            f"{'node ' + repr(node) if peer.is_node else peer.uri} is in network {network!r}, as is "
            f"{target}: dial directly",
        )
    return Forward(node, network, dest_node.node, dest, via, service)


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
