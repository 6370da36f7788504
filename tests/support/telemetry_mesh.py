"""Three real daemons for telemetry tests: node `alpha` (the client's host), waypoint `wp`, node `beta`.

beta hosts `reviews` (HTTP, bound to waypoint wp) and `echo` (TCP, straight node to node); alpha has an
`[[upstream]]` listener for each. HTTP goes client -> alpha -> HBONE -> wp -> HBONE -> beta -> backend;
TCP goes client -> alpha -> HBONE -> beta -> echo. Each daemon's config can be extended (`extra`), and
the waypoint gets `routes` as its policy. Built on tests/support/mesh.py. The ports and the client
host (`client_alpha`) are also those of tests/waypoint/test_waypoint_e2e.py's larger mesh.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from meshd.tools.echo import echo_server
from tests.support.http_backend import Backend, http_backend
from tests.support.mesh import Host, Mesh, Port, Service, Upstream, Workload, client_host, dump, reviews
from tests.support.procs import Meshd, unique_loopback
from tests.support.sockets import send_and_read

REVIEWS_PORT = 9080
ECHO_PORT = 7000
HTTP_UPSTREAM = 17080
TCP_UPSTREAM = 17070
# The waypoint routes the telemetry tests use: /fail answers 503 (a fault filter), the rest passes.
ROUTES = """
[[route]]
name = "fail"
service = "reviews.default"
match = [{ path = { prefix = "/fail" } }]
filters = [{ name = "fault", settings = { abort = { http_status = 503, percentage = 100 } } }]

[[route]]
name = "default"
service = "reviews.default"
"""


def client_alpha(a_ip: str, *more: Upstream, body: str = "") -> Host:
    """alpha, the client: reviews.default:9080 at a_ip:17080, echo.default:7000 at a_ip:17070, then `more`;
    `body` is added to its config."""
    return client_host(
        "alpha",
        a_ip,
        Upstream("reviews.default", REVIEWS_PORT, f"{a_ip}:{HTTP_UPSTREAM}"),
        Upstream("echo.default", ECHO_PORT, f"{a_ip}:{TCP_UPSTREAM}"),
        *more,
        body=body,
    )


@dataclass
class TelemetryMesh:
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
        return send_and_read(self.tcp, payload)


def catalog(d: Meshd) -> dict[str, object]:
    result: dict[str, object] = dump(d)["catalog"]
    return result


@contextmanager
def three_daemons(
    tmp: Path, *, extra: Mapping[str, str] | None = None, routes: str = "", start: bool = True
) -> Iterator[TelemetryMesh]:
    """The mesh, ready (every daemon knows the others' services), torn down however the block ends."""
    extra = extra or {}
    a_ip, b_ip, r_ip = (unique_loopback() for _ in range(3))
    nodes = Mesh(
        tmp,
        [
            client_alpha(a_ip, body=extra.get("alpha", "")),
            Host(
                "beta",
                b_ip,
                workloads=[
                    reviews("v1", r_ip, REVIEWS_PORT, labelled=True),
                    Workload("echo", b_ip, [ECHO_PORT], services=["echo"]),
                ],
                services=[
                    Service("reviews", [Port(REVIEWS_PORT, "http")], waypoint="wp"),
                    Service("echo", [ECHO_PORT]),
                ],
                policy={},
                body=extra.get("beta", ""),
            ),
            Host(
                "wp",
                role="waypoint",
                policy={"routes.toml": routes} if routes else {},
                body=extra.get("wp", ""),
            ),
        ],
    )
    with ExitStack() as stack:
        backend = stack.enter_context(http_backend("reviews-v1", r_ip, REVIEWS_PORT))
        stack.enter_context(echo_server(b_ip, ECHO_PORT))
        stack.callback(nodes.stop)
        mesh = TelemetryMesh(
            nodes["alpha"],
            nodes["beta"],
            nodes["wp"],
            backend,
            (a_ip, HTTP_UPSTREAM),
            (a_ip, TCP_UPSTREAM),
            tmp,
        )
        if start:
            nodes.start()
            nodes.wait_knows("alpha", services=["reviews.default", "echo.default"], nodes=["wp", "beta"])
            nodes.wait_knows("beta", nodes=["wp", "alpha"])
            nodes.wait_knows("wp", services=["reviews.default"], nodes=["beta", "alpha"])
        yield mesh
