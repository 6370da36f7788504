"""The catalog: which workloads and services exist, on which node, reached how. Pure: no I/O.

Each node publishes a `NodeCatalog` (its own config: workloads, services) at `/meshd/v1/catalog`
on its HBONE port, to authenticated node peers only. A `Catalog` is the merge of this node's
and every peer's: an immutable value; an update builds a new one and swaps one reference.

Tunnel identity rule (both ends compute it the same way, so no extra round trip is needed):
a tunnel dialled to a node at IP X is served with the certificate of the one workload identity
at address X on that node; when no identity or several share X, with the node's own identity.
Give each workload identity its own address for the handshake to prove the workload itself.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from meshd.config.model import Config
from meshd.identity.spiffe import InvalidSpiffeId, SpiffeId, validate_trust_domain
from meshd.units import Address

CATALOG_PATH = "/meshd/v1/catalog"
CATALOG_VERSION = 1
DEFAULT_NETWORK = "default"
MAX_CATALOG_BYTES = 4 << 20
WILDCARDS = ("0.0.0.0", "::", "")


class CatalogError(ValueError):
    """A peer's catalog is malformed or claims what it may not."""


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    node: str
    name: str
    namespace: str
    service_account: str
    address: str
    ports: tuple[int, ...]
    services: tuple[str, ...]  # service keys name.namespace
    labels: tuple[tuple[str, str], ...] = ()
    network: str = DEFAULT_NETWORK  # its node's network

    def identity(self, trust_domain: str) -> SpiffeId:
        return SpiffeId(trust_domain, self.namespace, self.service_account)

    @property
    def key(self) -> str:
        return f"{self.name}.{self.namespace}"

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True, slots=True)
class ServicePortEntry:
    port: int
    target_port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    name: str
    namespace: str
    ports: tuple[ServicePortEntry, ...]
    waypoint: str | None = None

    @property
    def key(self) -> str:
        return f"{self.name}.{self.namespace}"

    def port(self, port: int) -> ServicePortEntry | None:
        return next((p for p in self.ports if p.port == port), None)


@dataclass(frozen=True, slots=True)
class GatewayEntry:
    """What a gateway publishes: the address other networks dial (None: it accepts no inbound
    connection, it dials out instead: `gateway.reverse`), and the networks behind it."""

    public: Address | None
    networks: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NodeCatalog:
    """What one node publishes about itself."""

    node: str
    trust_domain: str
    role: str
    hbone: Address  # as configured; a wildcard host means "where you reached me"
    workloads: tuple[WorkloadEntry, ...]
    services: tuple[ServiceEntry, ...]
    namespaces: tuple[tuple[str, str], ...] = ()  # (namespace, default waypoint), sorted
    service_accounts: tuple[tuple[str, str, str], ...] = ()  # (namespace, account, waypoint), sorted
    metrics: Address | None = None  # Prometheus endpoint as configured (a wildcard host: as hbone's)
    network: str = DEFAULT_NETWORK
    gateway: GatewayEntry | None = None  # role gateway only

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId.node(self.trust_domain, self.node)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": CATALOG_VERSION,
            "node": self.node,
            "trust_domain": self.trust_domain,
            "role": self.role,
            "hbone": str(self.hbone),
            "workloads": [
                {
                    "name": w.name,
                    "namespace": w.namespace,
                    "service_account": w.service_account,
                    "address": w.address,
                    "ports": list(w.ports),
                    "services": list(w.services),
                    "labels": dict(w.labels),
                }
                for w in self.workloads
            ],
            "services": [
                {
                    "name": s.name,
                    "namespace": s.namespace,
                    "ports": [
                        {"port": p.port, "target_port": p.target_port, "protocol": p.protocol}
                        for p in s.ports
                    ],
                    "waypoint": s.waypoint,
                }
                for s in self.services
            ],
            # Only when set: catalogs without namespace defaults keep the encoding (and revision) they had.
            **(
                {"namespaces": [{"name": n, "waypoint": w} for n, w in self.namespaces]}
                if self.namespaces
                else {}
            ),
            **(
                {
                    "service_accounts": [
                        {"namespace": n, "name": a, "waypoint": w} for n, a, w in self.service_accounts
                    ]
                }
                if self.service_accounts
                else {}
            ),
            **({"metrics": str(self.metrics)} if self.metrics is not None else {}),
            # Only when not the default: single-network catalogs keep their encoding and revision.
            **({"network": self.network} if self.network != DEFAULT_NETWORK else {}),
            **(
                {
                    "gateway": {
                        "public": None if self.gateway.public is None else str(self.gateway.public),
                        "networks": list(self.gateway.networks),
                    }
                }
                if self.gateway is not None
                else {}
            ),
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def revision(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()[:16]

    @classmethod
    def decode(cls, data: bytes, *, expected_node: str | None = None, trust_domain: str) -> NodeCatalog:
        """Parse a peer's catalog; CatalogError if malformed, too large, or not the node that served it."""
        if len(data) > MAX_CATALOG_BYTES:
            raise CatalogError(f"catalog is {len(data)} bytes, over the {MAX_CATALOG_BYTES} limit")
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CatalogError(f"catalog is not JSON: {exc}") from None
        try:
            cat = _from_json(raw)
        except (KeyError, TypeError, ValueError, InvalidSpiffeId) as exc:
            raise CatalogError(f"malformed catalog: {exc!r}") from None
        if cat.trust_domain != trust_domain:
            raise CatalogError(f"catalog is for trust domain {cat.trust_domain!r}, not {trust_domain!r}")
        if expected_node is not None and cat.node != expected_node:
            raise CatalogError(f"catalog claims node {cat.node!r} but was served by node {expected_node!r}")
        return cat

    def tunnel_identity(self, dialed_ip: str) -> SpiffeId:
        """The identity this node presents to a tunnel dialled at `dialed_ip` (see module docstring)."""
        ids = {w.identity(self.trust_domain) for w in self.workloads if w.address == dialed_ip}
        return ids.pop() if len(ids) == 1 else self.identity


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v


def _port(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 65536:
        raise ValueError(f"bad port {v!r}")
    return v


def _from_json(raw: Any) -> NodeCatalog:
    if not isinstance(raw, dict) or raw.get("version") != CATALOG_VERSION:
        raise ValueError(
            f"unsupported catalog version {raw.get('version') if isinstance(raw, dict) else raw!r}"
        )
    td = validate_trust_domain(_str(raw["trust_domain"]))
    node = _str(raw["node"])
    network = _str(raw.get("network", DEFAULT_NETWORK))
    gateway = None
    if (g := raw.get("gateway")) is not None:
        if not isinstance(g, dict) or not isinstance(g.get("networks"), list):
            raise TypeError("gateway must be a table with a list of networks")
        public = None if g.get("public") is None else Address.parse(_str(g["public"]))
        gateway = GatewayEntry(public, tuple(_str(n) for n in g["networks"]))
    workloads = []
    for w in raw["workloads"]:
        ipaddress.ip_address(_str(w["address"]))
        SpiffeId.parse(SpiffeId(td, _str(w["namespace"]), _str(w["service_account"])).uri)  # segment check
        labels = w.get("labels", {})
        if not isinstance(labels, dict):
            raise TypeError("labels must be a table")
        workloads.append(
            WorkloadEntry(
                node=node,
                name=_str(w["name"]),
                namespace=w["namespace"],
                service_account=w["service_account"],
                address=w["address"],
                ports=tuple(_port(p) for p in w["ports"]),
                services=tuple(_str(s) for s in w["services"]),
                labels=tuple(sorted((_str(k), _str(v)) for k, v in labels.items())),
                network=network,
            )
        )
    services = []
    for s in raw["services"]:
        ports = tuple(
            ServicePortEntry(_port(p["port"]), _port(p["target_port"]), _str(p["protocol"]))
            for p in s["ports"]
        )
        waypoint = s.get("waypoint")
        services.append(
            ServiceEntry(
                _str(s["name"]), _str(s["namespace"]), ports, None if waypoint is None else _str(waypoint)
            )
        )
    namespaces = tuple(sorted((_str(n["name"]), _str(n["waypoint"])) for n in raw.get("namespaces", [])))
    accounts = tuple(
        sorted(
            (_str(a["namespace"]), _str(a["name"]), _str(a["waypoint"]))
            for a in raw.get("service_accounts", [])
        )
    )
    return NodeCatalog(
        node=node,
        trust_domain=td,
        role=_str(raw["role"]),
        hbone=Address.parse(_str(raw["hbone"])),
        workloads=tuple(workloads),
        services=tuple(services),
        namespaces=namespaces,
        service_accounts=accounts,
        metrics=Address.parse(_str(raw["metrics"])) if "metrics" in raw else None,
        network=network,
        gateway=gateway,
    )


def local_catalog(config: Config) -> NodeCatalog:
    """This node's own catalog, from its config."""
    services = tuple(
        ServiceEntry(
            s.name,
            s.namespace,
            tuple(ServicePortEntry(p.port, p.target, p.protocol) for p in s.ports),
            s.waypoint,
        )
        for s in config.services
    )
    workloads = tuple(
        WorkloadEntry(
            node=config.node_name,
            name=w.name,
            namespace=w.namespace,
            service_account=w.sa,
            address=w.address,
            ports=w.ports,
            services=tuple(s if "." in s else f"{s}.{w.namespace}" for s in w.services),
            labels=tuple(sorted(w.labels.items())),
            network=config.network,
        )
        for w in config.workloads
    )
    namespaces = tuple(sorted((n.name, n.waypoint) for n in config.namespaces))
    accounts = tuple(sorted((a.namespace, a.name, a.waypoint) for a in config.service_accounts))
    gateway = None
    if config.role == "gateway":
        gateway = GatewayEntry(config.gateway.public, config.fronted_networks)
    return NodeCatalog(
        config.node_name,
        config.trust_domain,
        config.role,
        config.listen.hbone,
        workloads,
        services,
        namespaces,
        accounts,
        config.listen.metrics,
        network=config.network,
        gateway=gateway,
    )


# ---- the merged view ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One way to reach a service port: a workload on a node, through that node's HBONE port."""

    workload: WorkloadEntry
    target_port: int
    dial: Address  # where the TCP+TLS connection goes
    identity: SpiffeId  # what the server must prove in the handshake
    authority: str  # the CONNECT :authority, workload ip:port

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.workload.node, self.workload.key, self.target_port)


@dataclass(frozen=True, slots=True)
class PeerRecord:
    catalog: NodeCatalog
    reached_at: str  # host this node reached the peer at (for wildcard listeners)


@dataclass(frozen=True)
class Catalog:
    trust_domain: str
    local: NodeCatalog
    peers: Mapping[str, PeerRecord] = field(default_factory=dict)
    services: Mapping[str, ServiceEntry] = field(default_factory=dict)
    workloads: tuple[WorkloadEntry, ...] = ()
    conflicts: tuple[str, ...] = ()
    bindings: Mapping[str, str] = field(default_factory=dict)  # service -> which binding set its waypoint

    def node(self, name: str) -> tuple[NodeCatalog, str] | None:
        if name == self.local.node:
            return self.local, _self_host(self.local.hbone.host)
        rec = self.peers.get(name)
        return (rec.catalog, rec.reached_at) if rec else None

    def endpoints(self, service_key: str, port: int) -> list[Endpoint]:
        """Every workload serving the service port, in a stable order (node, workload)."""
        svc = self.services.get(service_key)
        if svc is None:
            return []
        sp = svc.port(port)
        if sp is None:
            return []
        out = []
        for w in self.workloads:
            if service_key not in w.services or sp.target_port not in w.ports:
                continue
            found = self.node(w.node)
            if found is None:
                continue
            node, reached = found
            dial_host = _dial_host(node.hbone.host, reached, w.address)
            out.append(
                Endpoint(
                    workload=w,
                    target_port=sp.target_port,
                    dial=Address(dial_host, node.hbone.port),
                    identity=node.tunnel_identity(dial_host),
                    authority=str(Address(w.address, sp.target_port)),
                )
            )
        return out

    @cached_property
    def _by_identity(self) -> dict[SpiffeId, list[WorkloadEntry]]:
        index: dict[SpiffeId, list[WorkloadEntry]] = {}
        for w in self.workloads:
            index.setdefault(w.identity(self.trust_domain), []).append(w)
        return index

    def source_workload(self, identity: SpiffeId, client_ip: str) -> WorkloadEntry | None:
        """The workload a tunnel authenticated as `identity` came from (for telemetry only): the one
        workload with that identity, or among several the one at the client's address. None when
        no workload has it (a node identity) or several could be it."""
        found = self._by_identity.get(identity, [])
        if len(found) > 1:
            found = [w for w in found if w.address == client_ip]
        return found[0] if len(found) == 1 else None

    # ---- waypoints (see docs/waypoint.md) ----------------------------------------------------------

    def waypoint_node(self, name: str) -> tuple[NodeCatalog, str] | None:
        """The waypoint called `name` (a node of role waypoint), and where it was reached."""
        found = self.node(name)
        return found if found is not None and found[0].role == "waypoint" else None

    def waypoint_hbone(self, name: str) -> tuple[NodeCatalog, Address] | None:
        """The waypoint called `name` and the HBONE address it is dialled at; None if unknown."""
        found = self.waypoint_node(name)
        if found is None:
            return None
        node, reached = found
        host = (
            _self_host(node.hbone.host)
            if node is self.local
            else _dial_host(node.hbone.host, reached, reached)
        )
        return node, Address(host, node.hbone.port)

    def waypoint_endpoint(self, service_key: str, port: int, vip: str) -> Endpoint | None:
        """Where a node sends a tunnel for a service bound to a waypoint: the waypoint's HBONE port,
        its node identity, `:authority` = the service VIP:port. None if the service has no waypoint
        or the waypoint is not in the catalog (yet)."""
        svc = self.services.get(service_key)
        if svc is None or svc.waypoint is None or svc.port(port) is None:
            return None
        found = self.waypoint_hbone(svc.waypoint)
        if found is None:
            return None
        node, address = found
        host = address.host
        pseudo = WorkloadEntry(
            node=node.node,
            name=f"waypoint-{node.node}",
            namespace=node.identity.namespace,
            service_account=node.identity.service_account,
            address=host,
            ports=(),
            services=(),
            network=node.network,
        )
        return Endpoint(
            workload=pseudo,
            target_port=port,
            dial=Address(host, node.hbone.port),
            identity=node.identity,
            authority=str(Address(vip, port)),
        )

    # ---- networks (see docs/multi-network.md) -----------------------------------------------------

    @property
    def network(self) -> str:
        return self.local.network

    def gateways_for(self, network: str) -> list[NodeCatalog]:
        """The gateways that front `network` and can be dialled (a public address), by node name."""
        nodes = [self.local, *(p.catalog for p in self.peers.values())]
        return sorted(
            (
                n
                for n in nodes
                if n.gateway is not None and n.gateway.public is not None and network in n.gateway.networks
            ),
            key=lambda n: n.node,
        )

    def inner_endpoint(
        self, ip: str, port: int, networks: Iterable[str]
    ) -> tuple[NodeCatalog, Address] | None:
        """Where a gateway sends an outer CONNECT to `ip:port`: the node of one of `networks` whose
        HBONE endpoint that is (a node or waypoint), or that hosts a workload listening there (then
        that node's HBONE endpoint, dialled at the workload's address as a peer would). None if no
        node of those networks has it: a gateway is no open proxy."""
        wanted = set(networks)
        candidates = [(self.local, _self_host(self.local.hbone.host))]
        candidates += [(p.catalog, p.reached_at) for p in self.peers.values()]
        for cat, reached in candidates:
            if cat.network not in wanted or cat.gateway is not None:
                continue
            host = cat.hbone.host if cat.hbone.host not in WILDCARDS else reached
            if cat.hbone.port == port and ip == host:
                return cat, Address(host, port)
            for w in cat.workloads:
                if w.address == ip and port in w.ports:
                    return cat, Address(_dial_host(cat.hbone.host, reached, w.address), cat.hbone.port)
        return None

    def workloads_of(self, identity: SpiffeId) -> list[WorkloadEntry]:
        """Every workload whose identity (namespace, service account) is `identity`."""
        return list(self._by_identity.get(identity, []))

    def service_endpoints(
        self, service_key: str, port: int, networks: Iterable[str]
    ) -> list[tuple[NodeCatalog, Address, WorkloadEntry]]:
        """Where a gateway may send an outer CONNECT naming a service hostname (ztunnel's double
        HBONE): for each workload of one of `networks` serving the service port, its node and that
        node's HBONE endpoint (dialled at the workload's address, as `inner_endpoint` does), in a
        stable order. Empty if the service or port is unknown."""
        svc = self.services.get(service_key)
        sp = svc.port(port) if svc is not None else None
        if sp is None:
            return []
        wanted = set(networks)
        out = []
        for w in self.workloads:
            if w.network not in wanted or service_key not in w.services or sp.target_port not in w.ports:
                continue
            found = self.node(w.node)
            if found is None or found[0].gateway is not None:
                continue
            cat, reached = found
            out.append((cat, Address(_dial_host(cat.hbone.host, reached, w.address), cat.hbone.port), w))
        return out

    def waypoints_bound(self, workload: WorkloadEntry, target_port: int) -> list[str]:
        """Names of the waypoints of the services this workload serves on `target_port`."""
        out = []
        for key in workload.services:
            svc = self.services.get(key)
            if svc is None or svc.waypoint is None:
                continue
            if any(p.target_port == target_port for p in svc.ports):
                out.append(svc.waypoint)
        return sorted(set(out))

    def to_json(self) -> dict[str, Any]:
        return {
            "local": self.local.node,
            "nodes": sorted([self.local.node, *self.peers]),
            "services": sorted(self.services),
            "service_entries": [
                {
                    "service": key,
                    "ports": [
                        {"port": p.port, "target_port": p.target_port, "protocol": p.protocol}
                        for p in self.services[key].ports
                    ],
                    "waypoint": self.services[key].waypoint,
                }
                for key in sorted(self.services)
            ],
            "workloads": [
                {
                    "node": w.node,
                    "workload": w.key,
                    "address": w.address,
                    "ports": list(w.ports),
                    "services": list(w.services),
                }
                for w in self.workloads
            ],
            "waypoints": {
                k: {"waypoint": s.waypoint, "binding": self.bindings.get(k)}
                for k, s in sorted(self.services.items())
                if s.waypoint is not None
            },
            "conflicts": list(self.conflicts),
            "network": self.local.network,
            "networks": sorted({self.local.network, *(p.catalog.network for p in self.peers.values())}),
        }


def metrics_target(cat: NodeCatalog, reached_at: str) -> str | None:
    """Where Prometheus scrapes a node that was reached at `reached_at`: its published metrics address,
    with a wildcard host replaced by where it was reached. None if its catalog does not say."""
    if cat.metrics is None:
        return None
    host = reached_at if cat.metrics.host in WILDCARDS else cat.metrics.host
    return str(Address(host, cat.metrics.port))


def _self_host(host: str) -> str:
    return "127.0.0.1" if host in WILDCARDS else host


def _dial_host(listen_host: str, reached_at: str, workload_address: str) -> str:
    if listen_host not in WILDCARDS:
        return listen_host
    ip = ipaddress.ip_address(workload_address)
    return reached_at if ip.is_loopback or ip.is_unspecified else workload_address


NO_WAYPOINT = "none"  # a service's `waypoint = "none"`: not its namespace's default waypoint


# Which binding gave a service its waypoint (`Catalog.bindings`), in precedence order.
BY_SERVICE, BY_SERVICE_ACCOUNT, BY_NAMESPACE = "service", "service-account", "namespace"


def _effective_waypoint(
    svc: ServiceEntry,
    namespaces: Mapping[str, tuple[str, str]],
    accounts: Mapping[tuple[str, str], tuple[str, str]],
    workloads: Iterable[WorkloadEntry],
) -> tuple[ServiceEntry, str | None]:
    """The service as the merged catalog serves it, and the binding that applied. One precedence rule
    (Istio ambient's): the service's own `waypoint`, else the waypoint bound to the service account its
    workloads run as, else its namespace's default; `waypoint = "none"` opts out of both defaults.
    Every consumer (nodes' outbound and inbound, the waypoint) reads `ServiceEntry.waypoint` of the
    merged catalog, so the rule is applied in this one place."""
    if svc.waypoint == NO_WAYPOINT:
        return replace(svc, waypoint=None), BY_SERVICE
    if svc.waypoint is not None:
        return svc, BY_SERVICE
    # Accounts in a stable order: workloads of one service under several bound accounts take the first.
    bound = sorted(
        {(w.namespace, w.service_account) for w in workloads if svc.key in w.services} & set(accounts)
    )
    if bound:
        return replace(svc, waypoint=accounts[bound[0]][0]), BY_SERVICE_ACCOUNT
    if svc.namespace in namespaces:
        return replace(svc, waypoint=namespaces[svc.namespace][0]), BY_NAMESPACE
    return svc, None


def merge(local: NodeCatalog, peers: Iterable[PeerRecord] = ()) -> Catalog:
    """One catalog from ours and the peers'. Conflicts resolve deterministically and are reported:
    a workload claimed by several nodes stays with ours, else with the lowest node name; a service
    defined differently by several nodes takes ours, else the lowest node name's definition."""
    by_node = {p.catalog.node: p for p in peers if p.catalog.node != local.node}
    order = [local, *(by_node[n].catalog for n in sorted(by_node))]
    conflicts: list[str] = []
    services: dict[str, ServiceEntry] = {}
    service_owner: dict[str, str] = {}
    workloads: dict[str, WorkloadEntry] = {}
    namespace_waypoints: dict[str, tuple[str, str]] = {}  # namespace -> (waypoint, node that set it)
    account_waypoints: dict[tuple[str, str], tuple[str, str]] = {}  # (ns, account) -> (waypoint, node)
    for cat in order:
        for s in cat.services:
            if s.key in services and services[s.key] != s:
                conflicts.append(
                    f"service {s.key}: node {cat.node} defines it differently from node {service_owner[s.key]}; "
                    f"using {service_owner[s.key]}'s"
                )
                continue
            services.setdefault(s.key, s)
            service_owner.setdefault(s.key, cat.node)
        for w in cat.workloads:
            if w.key in workloads:
                conflicts.append(
                    f"workload {w.key}: claimed by node {cat.node} and node {workloads[w.key].node}; "
                    f"keeping {workloads[w.key].node}"
                )
                continue
            workloads[w.key] = w
        for ns, wp in cat.namespaces:
            if ns in namespace_waypoints and namespace_waypoints[ns][0] != wp:
                conflicts.append(
                    f"namespace {ns}: node {cat.node} sets waypoint {wp!r}, node {namespace_waypoints[ns][1]} "
                    f"sets {namespace_waypoints[ns][0]!r}; using {namespace_waypoints[ns][1]}'s"
                )
                continue
            namespace_waypoints.setdefault(ns, (wp, cat.node))
        for ns, account, wp in cat.service_accounts:
            have = account_waypoints.get((ns, account))
            if have is not None and have[0] != wp:
                conflicts.append(
                    f"service account {ns}/{account}: node {cat.node} sets waypoint {wp!r}, node {have[1]} "
                    f"sets {have[0]!r}; using {have[1]}'s"
                )
                continue
            account_waypoints.setdefault((ns, account), (wp, cat.node))
    effective: dict[str, ServiceEntry] = {}
    bindings: dict[str, str] = {}
    for k, svc in services.items():
        effective[k], binding = _effective_waypoint(
            svc, namespace_waypoints, account_waypoints, workloads.values()
        )
        if binding is not None and effective[k].waypoint is not None:
            bindings[k] = binding
    return Catalog(
        trust_domain=local.trust_domain,
        local=local,
        peers=by_node,
        services=effective,
        workloads=tuple(workloads.values()),
        conflicts=tuple(conflicts),
        bindings=bindings,
    )
