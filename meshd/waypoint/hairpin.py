"""Hairpin: a client that dials a waypoint-bound workload directly is sent back through the waypoint.

The destination node cannot hand the client's certificate on: the client's TLS ended there. So it
opens a tunnel to the waypoint as its own node identity and *claims* who the client was and which
workload it dialled, in two CONNECT headers. The waypoint honours the claim only when it cannot widen
what the claiming node could do anyway:

* the peer is the node identity of the node that hosts the claimed target workload (so a node can
  speak only for traffic to its own workloads, which it can reach without any waypoint);
* the target workload serves the tunnel's service on the service port's target port, and that
  service is bound to this waypoint;
* the claimed client is a SPIFFE ID of our trust domain;
* the request then goes to that one workload (pinned), never to another endpoint of the service:
  otherwise a node could borrow a client's identity to reach workloads on other nodes.

Pure functions over the catalog; the node's inbound and the waypoint's proxy do the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshd.discovery.catalog import Catalog, ServiceEntry, ServicePortEntry, WorkloadEntry
from meshd.hbone.connection import parse_authority
from meshd.identity.spiffe import InvalidSpiffeId, SpiffeId

SOURCE_HEADER = "x-meshd-hairpin-source"  # the client's SPIFFE ID, as the destination node verified it
TARGET_HEADER = "x-meshd-hairpin-target"  # the workload ip:port the client dialled


class HairpinRefused(Exception):
    """A hairpin claim the waypoint does not accept (the reason names what is wrong)."""


@dataclass(frozen=True)
class HairpinClaim:
    source: SpiffeId  # the original client
    target: tuple[str, int]  # the workload it dialled: requests are pinned to it
    workload: WorkloadEntry


def bound_service(
    catalog: Catalog, workload: WorkloadEntry, target_port: int
) -> tuple[ServiceEntry, ServicePortEntry] | None:
    """The service (and port) through whose waypoint a direct tunnel to `workload:target_port` is
    hairpinned: the first, by key, of its services that has a waypoint and a port targeting it."""
    for key in sorted(workload.services):
        svc = catalog.services.get(key)
        if svc is None or svc.waypoint is None:
            continue
        for sp in svc.ports:
            if sp.target_port == target_port:
                return svc, sp
    return None


def claim_headers(source: SpiffeId, target: str) -> list[tuple[str, str]]:
    """The CONNECT headers a destination node adds to the tunnel it opens to the waypoint."""
    return [(SOURCE_HEADER, source.uri), (TARGET_HEADER, target)]


def accept_claim(
    catalog: Catalog,
    peer: SpiffeId,
    service: ServiceEntry,
    port: ServicePortEntry,
    source_header: str | None,
    target_header: str | None,
) -> HairpinClaim | None:
    """The claim in a tunnel's headers if the waypoint should honour it; None if the tunnel carries no
    claim (an ordinary client). Raises HairpinRefused when a claim is present but not acceptable."""
    if source_header is None and target_header is None:
        return None
    if source_header is None or target_header is None:
        raise HairpinRefused(f"a hairpin claim needs both {SOURCE_HEADER} and {TARGET_HEADER}")
    try:
        source = SpiffeId.parse(source_header)
    except InvalidSpiffeId as exc:
        raise HairpinRefused(f"{SOURCE_HEADER}: {exc}") from None
    if source.trust_domain != catalog.trust_domain:
        raise HairpinRefused(f"{SOURCE_HEADER} {source} is not of trust domain {catalog.trust_domain!r}")
    target = parse_authority(target_header)
    if target is None:
        raise HairpinRefused(f"{TARGET_HEADER} {target_header!r} is not ip:port")
    if target[1] != port.target_port:
        raise HairpinRefused(
            f"{TARGET_HEADER} port {target[1]} is not the target port of {service.key}:{port.port}"
        )
    workload = next(
        (
            w
            for w in catalog.workloads
            if w.address == target[0] and target[1] in w.ports and service.key in w.services
        ),
        None,
    )
    if workload is None:
        raise HairpinRefused(f"no workload of {service.key} at {target_header} in the catalog")
    host = catalog.node(workload.node)
    if host is None or host[0].role != "node" or peer != SpiffeId.node(catalog.trust_domain, workload.node):
        raise HairpinRefused(
            f"{peer} may not speak for clients of {workload.key} at {target_header} "
            f"(only its node, {workload.node!r}, may hairpin them)"
        )
    return HairpinClaim(source, target, workload)
