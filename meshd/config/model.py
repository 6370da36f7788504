"""The configuration as frozen, typed objects. Field metadata: `toml` = key name, `doc` = description.

Every default here is one a homelab user need not set. docs/config.md documents each key;
`meshd config keys` prints them from this module, so the two cannot drift far.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

from meshd.config.schema import Issue
from meshd.units import Address

_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
Role = Literal["node", "waypoint", "gateway"]
MtlsMode = Literal["STRICT", "PERMISSIVE"]


def doc(text: str, **kw: object) -> dict[str, object]:
    return {"doc": text, **kw}


def _default_node_name() -> str:
    name = socket.gethostname().split(".")[0].lower()
    return re.sub(r"[^a-z0-9-]", "-", name) or "node"


def _check_name(value: str, key: str) -> list[Issue]:
    if not _NAME.match(value):
        return [Issue((key,), f"{key} {value!r} must be lowercase letters, digits, '.', '-', '_'", None)]
    return []


@dataclass(frozen=True)
class ListenConfig:
    hbone: Address = field(
        default=Address("0.0.0.0", 15008), metadata=doc("HBONE inbound (mTLS + HTTP/2 CONNECT)")
    )
    admin: Address = field(
        default=Address("127.0.0.1", 15000), metadata=doc("admin API; keep it on loopback")
    )
    metrics: Address = field(default=Address("0.0.0.0", 15020), metadata=doc("Prometheus /metrics"))
    readiness: Address = field(default=Address("0.0.0.0", 15021), metadata=doc("/healthz/ready"))
    plaintext: Address | None = field(
        default=None,
        metadata=doc(
            "plaintext inbound for PERMISSIVE workloads; default: listen.hbone's host, its port - 2"
        ),
    )

    def __post_init__(self) -> None:
        # Beside HBONE (15008 -> 15006, as Istio numbers them), so two nodes sharing a host collide on
        # neither once their listen.hbone differ.
        if self.plaintext is None:
            beside = Address(self.hbone.host, max(self.hbone.port - 2, 0) if self.hbone.port else 0)
            object.__setattr__(self, "plaintext", beside)

    @property
    def plaintext_address(self) -> Address:
        assert self.plaintext is not None  # filled in by __post_init__
        return self.plaintext

    def check(self) -> list[Issue]:
        admin = self.admin.host
        if admin not in ("127.0.0.1", "::1", "localhost") and not admin.startswith("127."):
            return [
                Issue(("admin",), f"admin address {self.admin} is not loopback", "the admin API has no auth")
            ]
        return []


@dataclass(frozen=True)
class IdentityConfig:
    ca_dir: Path | None = field(
        default=None, metadata=doc("local CA folder: meshd issues its own certificates")
    )
    cert_dir: Path | None = field(
        default=None, metadata=doc("certificates issued elsewhere: one folder per identity, <ns>.<sa>/")
    )
    cert_ttl: timedelta = field(
        default=timedelta(hours=24), metadata=doc("lifetime of certificates meshd issues")
    )
    state_dir: Path | None = field(
        default=None, metadata=doc("enrolled mode: node key, certificate and bundle from `meshd enroll`")
    )
    ca_server: Address | None = field(
        default=None, metadata=doc("enrolled mode: the CA's HBONE address; default: recorded at enrollment")
    )
    bundle_refresh: timedelta = field(
        default=timedelta(minutes=1), metadata=doc("how often the trust bundle is re-read (CA rotation)")
    )

    def check(self) -> list[Issue]:
        if sum(p is not None for p in (self.ca_dir, self.cert_dir, self.state_dir)) != 1:
            return [
                Issue(
                    (),
                    "set exactly one of identity.ca_dir, identity.cert_dir and identity.state_dir",
                    'for one host: `meshd ca init --dir ./ca --trust-domain home.arpa`, then ca_dir = "./ca"',
                )
            ]
        if self.cert_ttl < timedelta(minutes=2):
            return [Issue(("cert_ttl",), "identity.cert_ttl must be at least 2m", "the default is 24h")]
        return []


@dataclass(frozen=True)
class CaNodeConfig:
    workloads: tuple[str, ...] = field(
        default=(), metadata=doc('identities the node may hold, "namespace/service-account"')
    )

    def check(self) -> list[Issue]:
        return [
            Issue(("workloads", i), f"workload {w!r} is not namespace/service-account", 'e.g. "default/echo"')
            for i, w in enumerate(self.workloads)
            if not re.match(r"^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$", w)
        ]


@dataclass(frozen=True)
class CaConfig:
    serve: bool = field(default=False, metadata=doc("run the mesh CA service on this host"))
    dir: Path | None = field(default=None, metadata=doc("CA folder (root key, tokens, node table)"))
    listen: Address = field(
        default=Address("0.0.0.0", 15012), metadata=doc("enrollment endpoint (TLS, one-time tokens)")
    )
    cert_ttl: timedelta = field(
        default=timedelta(hours=24), metadata=doc("lifetime of certificates the CA service signs")
    )
    nodes: dict[str, CaNodeConfig] = field(
        default_factory=dict, metadata=doc("[ca.nodes.NAME] workloads = [...]: what each node may hold")
    )

    def check(self) -> list[Issue]:
        if self.serve and self.dir is None:
            return [Issue(("dir",), "ca.serve = true needs ca.dir", 'e.g. dir = "/var/lib/meshd/ca"')]
        if self.cert_ttl < timedelta(minutes=2):
            return [Issue(("cert_ttl",), "ca.cert_ttl must be at least 2m", "the default is 24h")]
        return []


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...] = field(
        default=(), metadata=doc('etcd client URLs, tried in turn: ["https://10.0.0.5:2379", ...]')
    )
    prefix: str = field(default="", metadata=doc('key prefix; default "/meshd/<trust_domain>/"'))
    ca: Path | None = field(
        default=None, metadata=doc("CA bundle that signed etcd's server certificates; default: the mesh's")
    )
    cert: Path | None = field(
        default=None, metadata=doc("client certificate for etcd; default: this node's own mesh certificate")
    )
    key: Path | None = field(default=None, metadata=doc("private key of `cert`"))
    user: str = field(default="", metadata=doc("etcd user (RBAC); empty = etcd without auth"))
    password_file: Path | None = field(
        default=None, metadata=doc("file holding `user`'s password (one line); re-read at each reconnect")
    )
    lease_ttl: timedelta = field(
        default=timedelta(seconds=30),
        metadata=doc("our entry's lease; kept alive every third of it, gone this long after we die"),
    )
    advertise: Address | None = field(
        default=None,
        metadata=doc(
            "HBONE address peers dial, written to etcd; default: listen.hbone, or when that is a "
            "wildcard, this host's address towards etcd"
        ),
    )

    def check(self) -> list[Issue]:
        issues = []
        if not self.endpoints:
            issues.append(
                Issue(
                    ("endpoints",),
                    "discovery.etcd needs at least one endpoint",
                    'e.g. ["https://10.0.0.5:2379"]',
                )
            )
        for i, url in enumerate(self.endpoints):
            m = re.match(r"^(https?)://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})/?$", url)
            if m is None or not 0 < int(m.group(3)) < 65536:
                issues.append(
                    Issue(
                        ("endpoints", i),
                        f"etcd endpoint {url!r} is not http(s)://HOST:PORT",
                        "e.g. https://10.0.0.5:2379",
                    )
                )
        if (self.cert is None) != (self.key is None):
            issues.append(
                Issue(
                    ("cert",),
                    "discovery.etcd: set both cert and key, or neither",
                    "neither = this node's own certificate",
                )
            )
        if self.prefix and not (self.prefix.startswith("/") and self.prefix.endswith("/")):
            issues.append(
                Issue(
                    ("prefix",),
                    f"etcd prefix {self.prefix!r} must start and end with '/'",
                    'e.g. "/meshd/home.arpa/"',
                )
            )
        if bool(self.user) != (self.password_file is not None):
            issues.append(
                Issue(
                    ("user",),
                    "discovery.etcd: set both user and password_file, or neither",
                    "etcd's RBAC through its JSON gateway authenticates by password (docs/discovery.md)",
                )
            )
        if self.lease_ttl < timedelta(seconds=2):
            issues.append(
                Issue(("lease_ttl",), "discovery.etcd.lease_ttl must be at least 2s", "the default is 30s")
            )
        if self.advertise is not None and (
            self.advertise.host in ("0.0.0.0", "::", "") or not self.advertise.port
        ):
            issues.append(
                Issue(
                    ("advertise",),
                    f"etcd advertise {self.advertise} is not an address a peer can dial",
                    "name this host's address and HBONE port",
                )
            )
        return issues


@dataclass(frozen=True)
class DiscoveryConfig:
    mdns: bool = field(default=True, metadata=doc("announce and browse _meshd._tcp.local."))
    peers: tuple[Address, ...] = field(default=(), metadata=doc("static peers' HBONE addresses"))
    interfaces: tuple[str, ...] = field(
        default=(), metadata=doc("interfaces for mDNS; empty = all with multicast")
    )
    peer_timeout: timedelta = field(
        default=timedelta(seconds=30), metadata=doc("withdraw a silent peer after")
    )
    refresh: timedelta = field(
        default=timedelta(seconds=10), metadata=doc("how often peers (static and mDNS) are polled")
    )
    etcd: EtcdConfig | None = field(
        default=None, metadata=doc("a shared catalog rendezvous on etcd, for meshes mDNS cannot span")
    )


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = field(default="info", metadata=doc("log level"))
    format: Literal["text", "json"] = field(default="text", metadata=doc("log line format on stderr"))
    access_log: bool = field(default=True, metadata=doc("one line per proxied connection"))


@dataclass(frozen=True)
class TracingConfig:
    otlp: str = field(
        default="",
        metadata=doc('OTLP/HTTP collector, e.g. "http://127.0.0.1:4318" (JSON to /v1/traces); empty = off'),
    )
    sampling: float = field(
        default=1.0, metadata=doc("share of new traces recorded, 0.0-1.0 (a caller's decision is kept)")
    )
    connection_spans: bool = field(default=True, metadata=doc("nodes record one span per proxied connection"))
    batch_size: int = field(default=256, metadata=doc("spans per export request"))
    queue_size: int = field(default=2048, metadata=doc("spans kept waiting; more are dropped and counted"))
    interval: timedelta = field(default=timedelta(seconds=2), metadata=doc("longest wait before an export"))
    timeout: timedelta = field(default=timedelta(seconds=5), metadata=doc("one export request's limit"))

    def check(self) -> list[Issue]:
        issues: list[Issue] = []
        if self.otlp and not re.match(r"^https?://[^/\s:]+(:\d+)?(/\S*)?$", self.otlp):
            issues.append(
                Issue(
                    ("otlp",),
                    f"tracing.otlp {self.otlp!r} is not an http(s) URL",
                    'e.g. "http://127.0.0.1:4318"',
                )
            )
        if not 0.0 <= self.sampling <= 1.0:
            issues.append(
                Issue(
                    ("sampling",),
                    f"tracing.sampling {self.sampling} is not within 0.0-1.0",
                    "1.0 = every trace",
                )
            )
        for key in ("batch_size", "queue_size"):
            if getattr(self, key) < 1:
                issues.append(Issue((key,), f"tracing.{key} must be at least 1", None))
        return issues


@dataclass(frozen=True)
class WorkloadConfig:
    name: str = field(metadata=doc("workload name"))
    ports: tuple[int, ...] = field(
        default=(), metadata=doc("ports the workload listens on; none for a client that only dials out")
    )
    namespace: str = field(default="default", metadata=doc("namespace"))
    service_account: str = field(default="", metadata=doc("service account; default: the name"))
    address: str = field(default="127.0.0.1", metadata=doc("local IP the workload listens on"))
    services: tuple[str, ...] = field(
        default=(), metadata=doc("services this workload serves (name or name.ns)")
    )
    labels: dict[str, str] = field(default_factory=dict, metadata=doc('labels, e.g. version = "v2"'))
    mtls: MtlsMode | None = field(default=None, metadata=doc("STRICT or PERMISSIVE; default from policy"))

    @property
    def sa(self) -> str:
        return self.service_account or self.name

    def check(self) -> list[Issue]:
        issues = _check_name(self.name, "name") + _check_name(self.namespace, "namespace")
        if self.service_account:
            issues += _check_name(self.service_account, "service_account")
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            issues.append(
                Issue(("address",), f"address {self.address!r} is not an IP address", "e.g. 127.0.0.1")
            )
        issues += _check_ports(self.ports, "ports", required=False)
        return issues


def _check_ports(ports: tuple[int, ...], key: str, *, required: bool = True) -> list[Issue]:
    issues = [
        Issue((key, i), f"port {p} is outside 1-65535", None)
        for i, p in enumerate(ports)
        if not 0 < p < 65536
    ]
    if required and not ports:
        issues.append(Issue((key,), f"{key} is empty", "list at least one port"))
    return issues


@dataclass(frozen=True)
class ServicePort:
    port: int = field(metadata=doc("service port clients dial"))
    target_port: int | None = field(default=None, metadata=doc("workload port; default: port"))
    protocol: Literal["tcp", "http", "http2", "grpc", "udp"] = field(
        default="tcp",
        metadata=doc(
            "tcp; or for waypoint L7: http (HTTP/1.1 to the workload), http2 or grpc (HTTP/2 to it); "
            "udp: datagrams, carried as connect-udp (node only)"
        ),
    )

    @property
    def target(self) -> int:
        return self.target_port or self.port

    def check(self) -> list[Issue]:
        return _check_ports((self.port,), "port") + _check_ports((self.target,), "target_port")


@dataclass(frozen=True)
class ServiceConfig:
    name: str = field(metadata=doc("service name"))
    ports: tuple[ServicePort, ...] = field(metadata=doc("[{ port, target_port, protocol }]"))
    namespace: str = field(default="default", metadata=doc("namespace"))
    waypoint: str | None = field(
        default=None,
        metadata=doc('waypoint that handles this service\'s L7; "none": not the namespace default'),
    )

    @property
    def key(self) -> str:
        return f"{self.name}.{self.namespace}"

    def check(self) -> list[Issue]:
        issues = _check_name(self.name, "name") + _check_name(self.namespace, "namespace")
        if not self.ports:
            issues.append(Issue(("ports",), "ports is empty", "add { port = 7000 }"))
        return issues


@dataclass(frozen=True)
class NamespaceConfig:
    name: str = field(metadata=doc("namespace"))
    waypoint: str = field(metadata=doc("waypoint of every service of the namespace that names none"))

    def check(self) -> list[Issue]:
        return _check_name(self.name, "name") + _check_name(self.waypoint, "waypoint")


@dataclass(frozen=True)
class ServiceAccountConfig:
    name: str = field(metadata=doc("service account"))
    waypoint: str = field(
        metadata=doc("waypoint of the services whose workloads run as this account (before the namespace's)")
    )
    namespace: str = field(default="default", metadata=doc("namespace"))

    def check(self) -> list[Issue]:
        return (
            _check_name(self.name, "name")
            + _check_name(self.namespace, "namespace")
            + _check_name(self.waypoint, "waypoint")
        )


@dataclass(frozen=True)
class UpstreamConfig:
    service: str = field(metadata=doc("service to reach, name.namespace (namespace default: default)"))
    port: int = field(metadata=doc("service port"))
    listen: Address = field(metadata=doc("local listener the app dials"))
    workload: str | None = field(default=None, metadata=doc("local workload whose identity the tunnel uses"))
    protocol: Literal["tcp", "udp"] = field(
        default="tcp", metadata=doc("tcp; or udp: a UDP listener, one connect-udp flow per client address")
    )

    @property
    def service_key(self) -> str:
        return self.service if "." in self.service else f"{self.service}.default"

    def check(self) -> list[Issue]:
        return _check_ports((self.port,), "port")


@dataclass(frozen=True)
class PolicyConfig:
    dir: Path | None = field(default=None, metadata=doc("folder of *.toml policy files"))


@dataclass(frozen=True)
class CaptureConfig:
    mode: Literal["off", "nftables"] = field(
        default="off", metadata=doc("nftables: capture TCP to service VIPs (needs CAP_NET_ADMIN)")
    )
    listen: Address = field(
        default=Address("127.0.0.1", 15001), metadata=doc("outbound capture listener (redirect target)")
    )
    vip_range: str = field(
        default="240.240.0.0/16", metadata=doc("IPv4 range service VIPs come from; same on every node")
    )
    inbound: bool = field(
        default=False, metadata=doc("workload ports from other hosts: PERMISSIVE -> 15006, STRICT dropped")
    )
    nft: str = field(default="nft", metadata=doc("the nft binary (name on PATH, or a path)"))

    def check(self) -> list[Issue]:
        try:
            net = ipaddress.IPv4Network(self.vip_range)
        except ValueError as exc:
            return [Issue(("vip_range",), f"capture.vip_range: {exc}", 'e.g. "240.240.0.0/16"')]
        if net.prefixlen > 30:
            return [Issue(("vip_range",), f"capture.vip_range {net} is too small", "use a /30 or larger")]
        return []


@dataclass(frozen=True)
class GatewayConfig:
    """`role = "gateway"`: the network's east-west gateway (docs/multi-network.md)."""

    public: Address | None = field(
        default=None,
        metadata=doc(
            "the address nodes of other networks dial (this host's public ip:15008, or the port forwarded to it)"
        ),
    )
    networks: tuple[str, ...] = field(
        default=(), metadata=doc("networks this gateway fronts; default: its own `network`")
    )
    remote: tuple[Address, ...] = field(
        default=(), metadata=doc("other networks' gateways (their public address), to exchange catalogs with")
    )
    allow_networks: tuple[str, ...] = field(
        default=(), metadata=doc("networks whose nodes may tunnel through; empty = every other network")
    )
    allow_nodes: tuple[str, ...] = field(
        default=(), metadata=doc("node names that may tunnel through; empty = any node of an allowed network")
    )
    max_connections_per_network: int = field(
        default=1024, metadata=doc("forwarded connections open at once from one source network")
    )
    reverse: bool = field(
        default=False,
        metadata=doc(
            "no inbound port can be opened here: dial the `remote` gateways and keep a reverse "
            "connection they send this network's traffic through (meshd's own extension)"
        ),
    )

    def check(self) -> list[Issue]:
        issues: list[Issue] = []
        for n in (*self.networks, *self.allow_networks):
            issues += _check_name(n, "network")
        if self.max_connections_per_network < 1:
            issues.append(
                Issue(
                    ("max_connections_per_network",), "gateway.max_connections_per_network must be >= 1", None
                )
            )
        return issues


@dataclass(frozen=True)
class DnsConfig:
    enabled: bool = field(default=False, metadata=doc("run the DNS proxy for mesh names"))
    listen: Address = field(default=Address("127.0.0.1", 15053), metadata=doc("DNS proxy, UDP and TCP"))
    domain: str = field(default="mesh", metadata=doc("mesh names are <service>.<namespace>.<domain>"))
    upstreams: tuple[Address, ...] = field(
        default=(), metadata=doc("resolvers for other names; empty = nameservers in /etc/resolv.conf")
    )
    forward_timeout: timedelta = field(
        default=timedelta(seconds=2), metadata=doc("wait per upstream before trying the next")
    )
    capture: bool = field(
        default=False,
        metadata=doc("with capture.mode = nftables: redirect this host's DNS (port 53, IPv4) to the proxy"),
    )

    def check(self) -> list[Issue]:
        issues = _check_name(self.domain, "domain")
        if self.capture and not self.enabled:
            issues.append(Issue(("capture",), "dns.capture needs the DNS proxy", "set dns.enabled = true"))
        if self.capture and self.listen.host not in ("127.0.0.1", "0.0.0.0"):
            issues.append(
                Issue(
                    ("listen",),
                    f"dns.capture redirects to 127.0.0.1, but dns.listen is {self.listen}",
                    f'listen on "127.0.0.1:{self.listen.port}" (or 0.0.0.0)',
                )
            )
        return issues


@dataclass(frozen=True)
class UdpConfig:
    idle_timeout: timedelta = field(
        default=timedelta(seconds=30),
        metadata=doc("a UDP flow with no datagram either way for this long ends"),
    )
    max_flows: int = field(default=4096, metadata=doc("UDP flows per upstream listener; more are dropped"))
    max_flows_per_client: int = field(
        default=256, metadata=doc("UDP flows one client IP may hold per upstream listener")
    )
    queue_packets: int = field(
        default=256, metadata=doc("datagrams queued per flow and direction; more are dropped (counted)")
    )

    def check(self) -> list[Issue]:
        issues = []
        if self.idle_timeout < timedelta(seconds=1):
            issues.append(Issue(("idle_timeout",), "udp.idle_timeout is under 1 s", 'e.g. "30s"'))
        for key in ("max_flows", "max_flows_per_client", "queue_packets"):
            if getattr(self, key) < 1:
                issues.append(Issue((key,), f"udp.{key} must be at least 1", None))
        return issues


@dataclass(frozen=True)
class Config:
    role: Role = field(default="node", metadata=doc("node (ztunnel role), waypoint or gateway"))
    network: str = field(
        default="default", metadata=doc("the network this host is in: hosts of one network reach each other")
    )
    trust_domain: str = field(default="home.arpa", metadata=doc("SPIFFE trust domain"))
    node_name: str = field(
        default_factory=_default_node_name, metadata=doc("this host's name; default: hostname")
    )
    drain_timeout: timedelta = field(
        default=timedelta(seconds=10), metadata=doc("in-flight grace on SIGTERM")
    )
    listen: ListenConfig = field(default_factory=ListenConfig, metadata=doc("listener addresses"))
    identity: IdentityConfig = field(default_factory=IdentityConfig, metadata=doc("certificates"))
    ca: CaConfig = field(default_factory=CaConfig, metadata=doc("mesh CA service"))
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig, metadata=doc("finding peers"))
    log: LogConfig = field(default_factory=LogConfig, metadata=doc("logging"))
    tracing: TracingConfig = field(default_factory=TracingConfig, metadata=doc("trace export (OTLP)"))
    policy: PolicyConfig = field(default_factory=PolicyConfig, metadata=doc("policy files"))
    capture: CaptureConfig = field(default_factory=CaptureConfig, metadata=doc("transparent capture"))
    dns: DnsConfig = field(default_factory=DnsConfig, metadata=doc("DNS proxy for mesh names"))
    udp: UdpConfig = field(default_factory=UdpConfig, metadata=doc("UDP flows (connect-udp)"))
    gateway: GatewayConfig = field(
        default_factory=GatewayConfig, metadata=doc("east-west gateway (role gateway)")
    )
    workloads: tuple[WorkloadConfig, ...] = field(
        default=(), metadata=doc("workloads on this host", toml="workload")
    )
    services: tuple[ServiceConfig, ...] = field(default=(), metadata=doc("services", toml="service"))
    namespaces: tuple[NamespaceConfig, ...] = field(
        default=(), metadata=doc("namespace defaults (waypoint)", toml="namespace")
    )
    service_accounts: tuple[ServiceAccountConfig, ...] = field(
        default=(), metadata=doc("service-account waypoint bindings", toml="service_account")
    )
    upstreams: tuple[UpstreamConfig, ...] = field(
        default=(), metadata=doc("explicit outbound", toml="upstream")
    )

    def check(self) -> list[Issue]:
        issues: list[Issue] = []
        if not re.match(r"^[a-z0-9._-]+$", self.trust_domain):
            issues.append(
                Issue(("trust_domain",), f"trust_domain {self.trust_domain!r} is not valid", "e.g. home.arpa")
            )
        issues += _check_name(self.node_name, "node_name")
        issues += _check_name(self.network, "network")
        if self.role == "gateway" and self.gateway.reverse and not self.gateway.remote:
            issues.append(
                Issue(
                    ("gateway", "reverse"),
                    "gateway.reverse needs gateway.remote: the public gateways to dial out to",
                    'e.g. remote = ["203.0.113.7:15008"]',
                )
            )
        if self.role == "gateway" and self.gateway.public is None and not self.gateway.reverse:
            issues.append(
                Issue(
                    ("gateway", "public"),
                    "a gateway needs gateway.public: the address other networks dial",
                    'e.g. public = "203.0.113.7:15008"',
                )
            )
        issues += _duplicates([(w.namespace, w.name) for w in self.workloads], "workload", "name", "workload")
        issues += _duplicates([s.key for s in self.services], "service", "name", "service")
        issues += _duplicates([n.name for n in self.namespaces], "namespace", "name", "namespace")
        issues += _duplicates(
            [(a.namespace, a.name) for a in self.service_accounts],
            "service_account",
            "name",
            "service account",
        )
        issues += _duplicates(
            [f"{u.listen}/{u.protocol}" for u in self.upstreams], "upstream", "listen", "listen address"
        )
        if self.dns.capture and self.capture.mode == "off":
            issues.append(
                Issue(
                    ("dns", "capture"),
                    "dns.capture needs transparent capture",
                    'set capture.mode = "nftables"',
                )
            )
        local = {w.name for w in self.workloads}
        for i, up in enumerate(self.upstreams):
            if up.workload is not None and up.workload not in local:
                hint = (
                    f"workloads here: {', '.join(sorted(local))}" if local else "declare it in [[workload]]"
                )
                issues.append(
                    Issue(
                        ("upstream", i, "workload"),
                        f"upstream workload {up.workload!r} is not declared",
                        hint,
                    )
                )
        return issues

    @property
    def fronted_networks(self) -> tuple[str, ...]:
        """The networks a gateway fronts (its own by default)."""
        return self.gateway.networks or (self.network,)

    @property
    def node_identity_name(self) -> str:
        return f"node-{self.node_name}"


def _duplicates(keys: list[object], table: str, key: str, what: str) -> list[Issue]:
    seen: set[object] = set()
    issues = []
    for i, k in enumerate(keys):
        if k in seen:
            issues.append(Issue((table, i, key), f"duplicate {what} {k!r}", "each must be unique"))
        seen.add(k)
    return issues
