"""Catalog entries for table tests, in one place: services, workloads and nodes of trust domain home.arpa
in namespace `default` unless told otherwise, and a merged view of several nodes."""

from __future__ import annotations

from meshd.discovery.catalog import (
    DEFAULT_NETWORK,
    Catalog,
    GatewayEntry,
    NodeCatalog,
    PeerRecord,
    ServiceEntry,
    ServicePortEntry,
    WorkloadEntry,
    merge,
)
from meshd.units import Address

TD = "home.arpa"


def service(
    name: str,
    port: int,
    target_port: int | None = None,
    protocol: str = "tcp",
    *,
    namespace: str = "default",
    waypoint: str | None = None,
) -> ServiceEntry:
    """Service `name` with one port (forwarded to `target_port`, else the same port)."""
    return ServiceEntry(name, namespace, (ServicePortEntry(port, target_port or port, protocol),), waypoint)


ECHO = service("echo", 7000)


def workload(
    node: str,
    name: str,
    address: str,
    port: int = 7000,
    *,
    sa: str | None = None,
    services: tuple[str, ...] = ("echo.default",),
    network: str = DEFAULT_NETWORK,
) -> WorkloadEntry:
    """Workload `name` of `node` at address:port, service account `sa` (else its name)."""
    return WorkloadEntry(node, name, "default", sa or name, address, (port,), services, network=network)


def node(
    name: str,
    hbone: str,
    *workloads: WorkloadEntry,
    services: tuple[ServiceEntry, ...] = (ECHO,),
    role: str = "node",
    namespaces: tuple[tuple[str, str], ...] = (),
    accounts: tuple[tuple[str, str, str], ...] = (),
    network: str = DEFAULT_NETWORK,
    gateway: GatewayEntry | None = None,
) -> NodeCatalog:
    """The catalog node `name` publishes, its HBONE listener at `hbone` ("ip:port")."""
    return NodeCatalog(
        name,
        TD,
        role,
        Address.parse(hbone),
        workloads,
        services,
        namespaces,
        accounts,
        network=network,
        gateway=gateway,
    )


def one_workload_node(name: str, workload_name: str = "w") -> NodeCatalog:
    """Node `name` (HBONE on 0.0.0.0:15008) publishing one workload at 10.0.0.1:80, of no service."""
    return node(
        name, "0.0.0.0:15008", workload(name, workload_name, "10.0.0.1", 80, services=()), services=()
    )


def merged(local: NodeCatalog, *peers: tuple[NodeCatalog, str]) -> Catalog:
    """`local`'s merged catalog with each (peer's catalog, the host it was reached at)."""
    return merge(local, [PeerRecord(catalog, reached_at) for catalog, reached_at in peers])
