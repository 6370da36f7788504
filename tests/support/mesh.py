"""A mesh of real daemons for tests: typed builders for what goes in a node's config, and `Mesh`, which
writes one config per host (every host a static peer of every other, mDNS off), starts the daemons,
waits until each is ready, and waits until their catalogs know what the test is about to use.

    mesh = Mesh(tmp, [
        Host("alpha", upstreams=[Upstream("echo.default", 7000, f"{a_ip}:17000")]),
        Host("beta", workloads=[Workload("echo", b_ip, [7000], services=["echo"])],
             services=[Service("echo", [7000])]),
    ])
    with mesh.running():
        mesh.wait_knows("alpha", services=["echo.default"])
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from meshd.identity.ca import LocalCA
from tests.support.configs import node_config
from tests.support.procs import Meshd, http_get, unique_loopback, wait_for


def _strings(items: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


@dataclass(frozen=True)
class Workload:
    name: str
    address: str
    ports: Sequence[int]
    services: Sequence[str] = ()
    namespace: str | None = None
    service_account: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def toml(self) -> str:
        out = f'[[workload]]\nname = "{self.name}"\naddress = "{self.address}"\n'
        out += f"ports = [{', '.join(map(str, self.ports))}]\n"
        if self.services:
            out += f"services = {_strings(self.services)}\n"
        if self.namespace:
            out += f'namespace = "{self.namespace}"\n'
        if self.service_account:
            out += f'service_account = "{self.service_account}"\n'
        if self.labels:
            out += "labels = { " + ", ".join(f'{k} = "{v}"' for k, v in self.labels.items()) + " }\n"
        return out


@dataclass(frozen=True)
class Port:
    port: int
    protocol: str | None = None
    target_port: int | None = None

    def toml(self) -> str:
        parts = [f"port = {self.port}"]
        if self.target_port is not None:
            parts.append(f"target_port = {self.target_port}")
        if self.protocol is not None:
            parts.append(f'protocol = "{self.protocol}"')
        return "{ " + ", ".join(parts) + " }"


@dataclass(frozen=True)
class Service:
    name: str
    ports: Sequence[int | Port]
    waypoint: str | None = None
    namespace: str | None = None

    def toml(self) -> str:
        out = f'[[service]]\nname = "{self.name}"\n'
        if self.namespace:
            out += f'namespace = "{self.namespace}"\n'
        if self.waypoint:
            out += f'waypoint = "{self.waypoint}"\n'
        ports = [p if isinstance(p, Port) else Port(p) for p in self.ports]
        return out + f"ports = [{', '.join(p.toml() for p in ports)}]\n"


@dataclass(frozen=True)
class Upstream:
    service: str  # "name.namespace"
    port: int
    listen: str  # "ip:port"
    protocol: str | None = None  # "udp" for a UDP upstream

    def toml(self) -> str:
        out = f'[[upstream]]\nservice = "{self.service}"\nport = {self.port}\nlisten = "{self.listen}"\n'
        return out + (f'protocol = "{self.protocol}"\n' if self.protocol else "")


@dataclass
class Host:
    """One daemon to be: its name, its loopback address and what its config holds."""

    name: str
    ip: str = field(default_factory=unique_loopback)
    role: Literal["node", "waypoint"] = "node"
    workloads: Sequence[Workload] = ()
    services: Sequence[Service] = ()
    upstreams: Sequence[Upstream] = ()
    top: str = ""  # top-level keys, written before the first table (drain_timeout = "30s")
    body: str = ""  # any further TOML, after the tables above
    policy: Mapping[str, str] | None = None  # file name -> text in its policy dir; None: no dir
    env: Mapping[str, str] = field(default_factory=dict)  # added to the daemon's environment
    more_peers: Sequence[str] = ()  # static peers beyond the other hosts (a fake peer's ip:port)

    def config_body(self) -> str:
        parts = [w.toml() for w in self.workloads] + [s.toml() for s in self.services]
        return "".join(parts + [u.toml() for u in self.upstreams]) + self.body


def client_host(name: str, ip: str, *upstreams: Upstream, **more: Any) -> Host:
    """A host whose app is the `client` workload (namespace default, port 8000), dialling services
    through `upstreams` on its own address; `more` sets any other Host field."""
    return Host(name, ip, workloads=[Workload("client", ip, [8000])], upstreams=upstreams, **more)


def reviews(
    version: str, ip: str, port: int, *, services: Sequence[str] = ("reviews",), labelled: bool = False
) -> Workload:
    """Workload reviews-<version> (service account reviews) of `services`, labelled version=<version>
    if `labelled` (for subsets)."""
    labels = {"version": version} if labelled else {}
    return Workload(
        f"reviews-{version}", ip, [port], services=services, service_account="reviews", labels=labels
    )


def waypoint_path(
    tmp: Path, client_ip: str, workload: Workload, port: Port, listen_port: int, routes: str | None = None
) -> Mesh:
    """Client alpha, dialling the service of `workload` (its first, in namespace default) on `port`
    through a listener at client_ip:listen_port; beta, hosting `workload`; waypoint wp, which that
    service names, with `routes` as routes.toml in its policy dir if given."""
    name = workload.services[0]
    return Mesh(
        tmp,
        [
            client_host(
                "alpha", client_ip, Upstream(f"{name}.default", port.port, f"{client_ip}:{listen_port}")
            ),
            Host("beta", workloads=[workload], services=[Service(name, [port], waypoint="wp")]),
            Host("wp", role="waypoint", policy=None if routes is None else {"routes.toml": routes}),
        ],
    )


def echo_host(name: str, ip: str, port: int, **more: Any) -> Host:
    """A host running the `echo` workload on its own address, serving the `echo` service on `port`."""
    return Host(
        name,
        ip,
        workloads=[Workload("echo", ip, [port], services=["echo"])],
        services=[Service("echo", [port])],
        **more,
    )


def dump(daemon: Meshd) -> dict[str, Any]:
    """The daemon's /config_dump."""
    result: dict[str, Any] = json.loads(http_get(daemon.admin_url + "/config_dump")[1])
    return result


def knows(daemon: Meshd, *, services: Sequence[str] = (), nodes: Sequence[str] = ()) -> bool:
    """The daemon's merged catalog lists these services and nodes (fetched from its peers)."""
    status, body = http_get(daemon.admin_url + "/config_dump")
    if status != 200:
        return False
    catalog = json.loads(body)["catalog"]
    return set(services) <= set(catalog["services"]) and set(nodes) <= set(catalog["nodes"])


class Mesh:
    """Daemons for `hosts`, configs under `tmp`, certificates from one CA at tmp/ca (made if absent)."""

    def __init__(self, tmp: Path, hosts: Sequence[Host], *, trust_domain: str = "home.arpa") -> None:
        self.tmp = tmp
        self.hosts = {h.name: h for h in hosts}
        self.ca_dir = tmp / "ca"
        if not (self.ca_dir / "ca.crt").exists():
            LocalCA.init(self.ca_dir, trust_domain)
        self.daemons: dict[str, Meshd] = {}
        for h in hosts:
            policy_dir = tmp / f"{h.name}-policy" if h.policy is not None else None
            config = node_config(
                tmp / f"{h.name}.toml",
                h.name,
                self.ca_dir,
                peers=[f"{o.ip}:15008" for o in hosts if o is not h] + list(h.more_peers),
                policy_dir=policy_dir,
                body=h.config_body(),
                trust_domain=trust_domain,
            )
            top = (f'role = "{h.role}"\n' if h.role != "node" else "") + h.top
            if top:
                config.write_text(top + config.read_text())
            for name, text in (h.policy or {}).items():
                assert policy_dir is not None
                (policy_dir / name).write_text(text)
            self.daemons[h.name] = Meshd(config, h.ip, env=dict(h.env))

    def __getitem__(self, name: str) -> Meshd:
        return self.daemons[name]

    def policy_dir(self, name: str) -> Path:
        return self.tmp / f"{name}-policy"

    def start(self) -> Mesh:
        """Start every daemon, then wait until each is ready (they start side by side)."""
        for d in self.daemons.values():
            d.start()
        for d in self.daemons.values():
            d.wait_ready()
        return self

    def wait_knows(
        self, name: str, *, services: Sequence[str] = (), nodes: Sequence[str] = (), timeout: float = 15.0
    ) -> None:
        """Wait until `name`'s catalog lists these services and nodes."""
        d = self.daemons[name]
        wait_for(lambda: knows(d, services=services, nodes=nodes), d, timeout=timeout)

    def stop(self) -> None:
        """Kill every daemon still running: teardown needs no drain (a test that checks the drain
        stops its daemon itself)."""
        for d in self.daemons.values():
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()

    @contextmanager
    def running(self) -> Iterator[Mesh]:
        try:
            yield self.start()
        finally:
            self.stop()


@dataclass
class NodePair:
    """Two nodes: a client host (alpha) with an upstream listener, and a server host (beta) whose
    policy dir the test writes into."""

    alpha: Meshd
    beta: Meshd
    upstream: tuple[str, int]
    beta_policy: Path

    def connect(self) -> socket.socket:
        return socket.create_connection(self.upstream, timeout=10)
