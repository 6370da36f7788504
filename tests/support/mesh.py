"""Three real daemons for telemetry tests: node `alpha` (the client's host), waypoint `wp`, node `beta`.

beta hosts `reviews` (HTTP, bound to waypoint wp) and `echo` (TCP, straight node to node); alpha has an
`[[upstream]]` listener for each. HTTP goes client -> alpha -> HBONE -> wp -> HBONE -> beta -> backend;
TCP goes client -> alpha -> HBONE -> beta -> echo. Each daemon's config can be extended (`extra`), and
the waypoint gets `routes` as its policy.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from meshd.identity.ca import LocalCA
from meshd.tools.echo import echo_server
from tests.support.configs import node_config
from tests.support.http_backend import Backend, http_backend
from tests.support.procs import Meshd, http_get, unique_loopback, wait_for

REVIEWS_PORT = 9080
ECHO_PORT = 7000
HTTP_UPSTREAM = 17080
TCP_UPSTREAM = 17070


@dataclass
class Mesh:
    alpha: Meshd
    beta: Meshd
    wp: Meshd
    backend: Backend
    http: tuple[str, int]  # alpha's upstream listener for reviews.default:9080
    tcp: tuple[str, int]  # alpha's upstream listener for echo.default:7000
    tmp: Path

    @property
    def daemons(self) -> list[Meshd]:
        return [self.alpha, self.wp, self.beta]

    def client(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(*self.http, timeout=10)

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str]]:
        """One request on its own client connection (closed after it)."""
        conn = self.client()
        try:
            conn.request("GET", path, headers=dict(headers or {}))
            resp = conn.getresponse()
            resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()

    def echo(self, payload: bytes) -> bytes:
        """One TCP connection through the mesh: send, half-close, read the echo to the end."""
        with socket.create_connection(self.tcp, timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            out = bytearray()
            while chunk := s.recv(65536):
                out += chunk
            return bytes(out)


def catalog(d: Meshd) -> dict[str, object]:
    dump = json.loads(http_get(d.admin_url + "/config_dump")[1])
    result: dict[str, object] = dump["catalog"]
    return result


def _knows(d: Meshd, services: tuple[str, ...], nodes: tuple[str, ...]) -> bool:
    c = catalog(d)
    return set(services) <= set(c["services"]) and set(nodes) <= set(c["nodes"])  # type: ignore[call-overload]


@contextmanager
def three_daemons(
    tmp: Path, *, extra: Mapping[str, str] | None = None, routes: str = "", start: bool = True
) -> Iterator[Mesh]:
    """The mesh, ready (every daemon knows the others' services), torn down however the block ends."""
    extra = extra or {}
    LocalCA.init(tmp / "ca", "home.arpa")
    a_ip, b_ip, w_ip, r_ip = (unique_loopback() for _ in range(4))
    alpha_cfg = node_config(
        tmp / "alpha.toml",
        "alpha",
        tmp / "ca",
        peers=[f"{b_ip}:15008", f"{w_ip}:15008"],
        body=f'[[workload]]\nname = "client"\naddress = "{a_ip}"\nports = [8000]\n'
        f'[[upstream]]\nservice = "reviews.default"\nport = {REVIEWS_PORT}\nlisten = "{a_ip}:{HTTP_UPSTREAM}"\n'
        f'[[upstream]]\nservice = "echo.default"\nport = {ECHO_PORT}\nlisten = "{a_ip}:{TCP_UPSTREAM}"\n'
        + extra.get("alpha", ""),
    )
    beta_cfg = node_config(
        tmp / "beta.toml",
        "beta",
        tmp / "ca",
        peers=[f"{a_ip}:15008", f"{w_ip}:15008"],
        policy_dir=tmp / "beta-policy",
        body=f'[[workload]]\nname = "reviews-v1"\nservice_account = "reviews"\naddress = "{r_ip}"\n'
        f'ports = [{REVIEWS_PORT}]\nservices = ["reviews"]\nlabels = {{ version = "v1" }}\n'
        f'[[workload]]\nname = "echo"\naddress = "{b_ip}"\nports = [{ECHO_PORT}]\nservices = ["echo"]\n'
        f'[[service]]\nname = "reviews"\nwaypoint = "wp"\nports = [{{ port = {REVIEWS_PORT}, protocol = "http" }}]\n'
        f'[[service]]\nname = "echo"\nports = [{{ port = {ECHO_PORT} }}]\n' + extra.get("beta", ""),
    )
    wp_cfg = node_config(
        tmp / "wp.toml",
        "wp",
        tmp / "ca",
        peers=[f"{a_ip}:15008", f"{b_ip}:15008"],
        policy_dir=tmp / "wp-policy",
        body=extra.get("wp", ""),
    )
    wp_cfg.write_text('role = "waypoint"\n' + wp_cfg.read_text())
    if routes:
        (tmp / "wp-policy" / "routes.toml").write_text(routes)
    with ExitStack() as stack:
        backend = stack.enter_context(http_backend("reviews-v1", r_ip, REVIEWS_PORT))
        stack.enter_context(echo_server(b_ip, ECHO_PORT))
        mesh = Mesh(
            Meshd(alpha_cfg, a_ip),
            Meshd(beta_cfg, b_ip),
            Meshd(wp_cfg, w_ip),
            backend,
            (a_ip, HTTP_UPSTREAM),
            (a_ip, TCP_UPSTREAM),
            tmp,
        )
        try:
            if start:
                for d in mesh.daemons:
                    d.start()
                for d in mesh.daemons:
                    d.wait_ready()
                wait_for(
                    lambda: _knows(mesh.alpha, ("reviews.default", "echo.default"), ("wp", "beta")),
                    mesh.alpha,
                )
                wait_for(lambda: _knows(mesh.beta, (), ("wp", "alpha")), mesh.beta)
                wait_for(lambda: _knows(mesh.wp, ("reviews.default",), ("beta", "alpha")), mesh.wp)
            yield mesh
        finally:
            for d in mesh.daemons:
                if d.proc is not None and d.proc.poll() is None:
                    d.proc.kill()
                    d.proc.wait()
