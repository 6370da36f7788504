"""The waypoint role end to end: two nodes and a waypoint as real subprocesses.

alpha hosts the client (upstream listeners); beta hosts two HTTP backends (reviews v1 and v2, each
on its own loopback address) and a TCP echo; the waypoint `wp` handles both services (`waypoint =
"wp"`). Requests go client -> alpha -> HBONE -> wp (HTTP/1.1 inside the tunnel) -> HBONE -> beta ->
backend. The daemons are started once for the module; every test is bounded by socket timeouts.
"""

from __future__ import annotations

import http.client
import json
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from meshd.discovery.vip import allocate
from meshd.hbone.errors import TunnelRefused
from meshd.hbone.pool import HbonePool
from meshd.hbone.tls import StaticCertificates
from meshd.identity.ca import LocalCA
from meshd.identity.spiffe import SpiffeId
from meshd.tools.echo import echo_server
from meshd.waypoint.hairpin import claim_headers
from tests.support.h2_client import H2Request, h2_exchange
from tests.support.http_backend import Backend, http_backend
from tests.support.mesh import Host, Mesh, Port, Service, Upstream, Workload, dump, reviews
from tests.support.policy import deny, to
from tests.support.procs import Meshd, http_get, unique_loopback, wait_for
from tests.support.sockets import recv_until_closed
from tests.support.telemetry_mesh import ECHO_PORT, HTTP_UPSTREAM, REVIEWS_PORT, TCP_UPSTREAM, client_alpha

BYPASS_UPSTREAM = 17090
RATINGS_UPSTREAM = 17091  # ratings.apps: no waypoint of its own, the namespace default (wp)
DETAILS_UPSTREAM = 17092  # details.apps: waypoint = "none", opted out of the namespace default

# The waypoint applies a policy for workload reviews-v1 to the whole reviews service.
AUTHORIZATIONS = (
    deny(to(paths=["/admin*"]), name="no-admin", workloads=["reviews-v1"])
    # Dry run: evaluated and reported for every request, never enforced.
    + deny(to(paths=["/v1/dry*"]), name="trial-no-dry", workloads=["reviews-v1"], dry_run=True)
    # `hosts` match the Host the app sent (docs/waypoint.md, "The authority"): through an [[upstream]]
    # listener that is the listener's address unless the app dials a name.
    + deny(
        to(paths=["/named*"], not_hosts=["reviews.default.mesh*"]),
        name="by-name-only",
        workloads=["reviews-v1"],
    )
)
ROUTES = (
    AUTHORIZATIONS
    + """
[[route]]
name = "by-header"
service = "reviews.default"
match = [{ headers = { x-version = { exact = "v2" } } }]
backends = [{ subset = { version = "v2" } }]

[[route]]
name = "by-path"
service = "reviews.default"
match = [{ path = { prefix = "/v1/" } }]
backends = [{ subset = { version = "v1" } }]

[[route]]
name = "flaky"
service = "reviews.default"
match = [{ path = { prefix = "/flaky" } }]
backends = [{ subset = { version = "v1" } }]
retries = { attempts = 2, retry_on = ["5xx"], base_interval = "1ms", buffer_limit = 1024 }

[[route]]
name = "slow"
service = "reviews.default"
match = [{ path = { prefix = "/slow" } }]
timeout = "200ms"

[[route]]
name = "limited"
service = "reviews.default"
match = [{ path = { prefix = "/limited" } }]
filters = [{ name = "ratelimit", settings = { max_tokens = 5, fill_interval = "1h" } }]

[[route]]
name = "fault"
service = "reviews.default"
match = [{ path = { prefix = "/fault" } }]
filters = [{ name = "fault", settings = { abort = { http_status = 418, percentage = 100 } } }]

[[route]]
name = "boom"
service = "reviews.default"
match = [{ path = { prefix = "/boom" } }]
filters = [{ name = "boom" }]

[[route]]
name = "split"
service = "reviews.default"
backends = [{ subset = { version = "v1" }, weight = 90 }, { subset = { version = "v2" }, weight = 10 }]
"""
)

BOOM_PLUGIN = """
from meshd.plugins import hookimpl
from meshd.plugins.filters import CONTINUE, Filter, FilterType


class Boom(Filter):
    def on_request_headers(self, ctx, request):
        if "x-boom" in request.headers:
            raise RuntimeError("boom, as asked")
        return CONTINUE


@hookimpl
def meshd_filter_types():
    return [FilterType("boom", lambda settings: Boom(), None, "raises when x-boom is sent")]
"""


def install_boom_plugin(site: Path) -> None:
    """A test-only plugin package, found through its `meshd` entry point (no pip needed)."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "meshd_boom_test.py").write_text(BOOM_PLUGIN)
    dist = site / "meshd_boom_test-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: meshd-boom-test\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[meshd]\nboom = meshd_boom_test\n")


@dataclass
class WaypointMesh:
    alpha: Meshd
    beta: Meshd
    wp: Meshd
    v1: Backend
    v2: Backend
    http: tuple[str, int]
    tcp: tuple[str, int]
    bypass: tuple[str, int]
    ratings: Backend
    details: Backend
    ca_dir: Path
    v1_address: str  # reviews-v1's ip:port

    def client(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(*self.http, timeout=10)


def request(
    conn: http.client.HTTPConnection,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WaypointMesh]:
    tmp = tmp_path_factory.mktemp("waypoint")
    a_ip, b_ip, r1_ip, r2_ip, rt_ip, dt_ip = (unique_loopback() for _ in range(6))
    install_boom_plugin(tmp / "site")
    reviews_port = Port(REVIEWS_PORT, "http")
    apps_http = Port(80, "http", target_port=REVIEWS_PORT)
    nodes = Mesh(
        tmp,
        [
            client_alpha(
                a_ip,
                Upstream("bypass.default", 9081, f"{a_ip}:{BYPASS_UPSTREAM}"),
                Upstream("ratings.apps", 80, f"{a_ip}:{RATINGS_UPSTREAM}"),
                Upstream("details.apps", 80, f"{a_ip}:{DETAILS_UPSTREAM}"),
            ),
            Host(
                "beta",
                b_ip,
                workloads=[
                    reviews("v1", r1_ip, REVIEWS_PORT, services=["reviews", "bypass"], labelled=True),
                    reviews("v2", r2_ip, REVIEWS_PORT, labelled=True),
                    Workload("echo", b_ip, [ECHO_PORT], services=["echo"]),
                    Workload("ratings", rt_ip, [REVIEWS_PORT], services=["ratings"], namespace="apps"),
                    Workload("details", dt_ip, [REVIEWS_PORT], services=["details"], namespace="apps"),
                ],
                services=[
                    Service("reviews", [reviews_port], waypoint="wp"),
                    Service("echo", [ECHO_PORT], waypoint="wp"),
                    Service("bypass", [Port(9081, target_port=REVIEWS_PORT)]),
                    Service("ratings", [apps_http], namespace="apps"),
                    Service("details", [apps_http], namespace="apps", waypoint="none"),
                ],
            ),
            Host(
                "wp",
                role="waypoint",
                policy={"routes.toml": ROUTES},
                # The namespace default lives in the waypoint's own catalog: every node merges it from there.
                body='[[namespace]]\nname = "apps"\nwaypoint = "wp"\n',
                env={"PYTHONPATH": str(tmp / "site")},
            ),
        ],
    )
    with (
        http_backend("reviews-v1", r1_ip, REVIEWS_PORT) as v1,
        http_backend("reviews-v2", r2_ip, REVIEWS_PORT) as v2,
        echo_server(b_ip, ECHO_PORT),
        http_backend("ratings", rt_ip, REVIEWS_PORT) as ratings,
        http_backend("details", dt_ip, REVIEWS_PORT) as details,
        nodes.running(),
    ):
        nodes.wait_knows("alpha", services=["reviews.default", "echo.default", "ratings.apps"], nodes=["wp"])
        nodes.wait_knows("beta", nodes=["wp"])
        nodes.wait_knows("wp", services=["reviews.default"], nodes=["beta"])
        yield WaypointMesh(
            nodes["alpha"],
            nodes["beta"],
            nodes["wp"],
            v1,
            v2,
            (a_ip, HTTP_UPSTREAM),
            (a_ip, TCP_UPSTREAM),
            (a_ip, BYPASS_UPSTREAM),
            ratings,
            details,
            tmp / "ca",
            f"{r1_ip}:{REVIEWS_PORT}",
        )


def test_routing_by_path_and_by_header(mesh: WaypointMesh) -> None:
    conn = mesh.client()
    for _ in range(3):  # keep-alive: one client connection, several requests
        status, headers, body = request(conn, "/v1/items")
        assert (status, headers["x-backend"]) == (200, "reviews-v1"), body
        status, headers, body = request(conn, "/anything", headers={"x-version": "v2"})
        assert (status, headers["x-backend"]) == (200, "reviews-v2"), body
    conn.close()


def test_weighted_split_90_10(mesh: WaypointMesh) -> None:
    conn = mesh.client()
    counts = {"reviews-v1": 0, "reviews-v2": 0}
    n = 1000
    for _ in range(n):
        status, headers, _ = request(conn, "/split")
        assert status == 200
        counts[headers["x-backend"]] += 1
    conn.close()
    # 10% of 1000: sd = sqrt(1000 * 0.1 * 0.9) ~ 9.5; 5 sd either side
    assert 52 <= counts["reviews-v2"] <= 148, counts


def test_traceparent_propagated_and_created(mesh: WaypointMesh) -> None:
    conn = mesh.client()
    _, headers, _ = request(conn, "/v1/trace")
    created = headers["x-seen-traceparent"]
    assert created.startswith("00-") and len(created.split("-")[1]) == 32
    assert headers["x-seen-request-id"]
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    _, headers, _ = request(conn, "/v1/trace", headers={"traceparent": incoming})
    seen = headers["x-seen-traceparent"].split("-")
    assert seen[1] == "0af7651916cd43dd8448eb211c80319c" and seen[2] != "b7ad6b7169203331"
    conn.close()


def test_retry_succeeds_and_large_post_is_not_retried(mesh: WaypointMesh) -> None:
    conn = mesh.client()
    rid = uuid.uuid4().hex
    status, headers, _ = request(conn, "/flaky/1", headers={"x-request-id": rid})
    assert status == 200 and headers["x-backend"] == "reviews-v1"
    assert sum(1 for s in mesh.v1.requests if s.headers.get("x-request-id") == rid) == 2
    rid = uuid.uuid4().hex
    status, _, _ = request(conn, "/flaky/2", "POST", {"x-request-id": rid}, body=b"x" * 4096)
    assert status == 503  # the backend's first answer: the body went beyond buffer_limit
    assert sum(1 for s in mesh.v1.requests if s.headers.get("x-request-id") == rid) == 1
    conn.close()


def test_timeout_gives_504_ut(mesh: WaypointMesh) -> None:
    conn = mesh.client()
    status, _, body = request(conn, "/slow?ms=2000")
    assert status == 504, body
    status, _, _ = request(conn, "/v1/after-timeout")  # the client connection still works
    assert status == 200
    conn.close()
    wait_for(
        lambda: mesh.wp.metric("istio_requests_total", response_code="504", response_flags="UT") >= 1,
        mesh.wp,
    )


def test_rate_limit_429_after_max_tokens(mesh: WaypointMesh) -> None:
    conn = mesh.client()
    statuses = [request(conn, "/limited")[0] for _ in range(8)]
    conn.close()
    assert statuses == [200] * 5 + [429] * 3


def test_fault_abort(mesh: WaypointMesh) -> None:
    before = len(mesh.v1.requests) + len(mesh.v2.requests)
    conn = mesh.client()
    status, _, _ = request(conn, "/fault")
    conn.close()
    assert status == 418
    assert len(mesh.v1.requests) + len(mesh.v2.requests) == before


def test_l7_deny_403_backend_sees_nothing(mesh: WaypointMesh) -> None:
    conn = mesh.client()
    status, _, body = request(conn, "/admin/users", "POST", body=b"secret")
    assert status == 403 and b"denied" in body
    status, _, _ = request(conn, "/v1/still-ok")  # keep-alive survives a denial
    assert status == 200
    conn.close()
    assert not any(p.startswith("/admin") for p in mesh.v1.paths() + mesh.v2.paths())
    assert mesh.wp.metric("istio_requests_total", response_code="403", response_flags="UAEX") >= 1


def test_dry_run_deny_is_counted_and_logged_and_the_request_passes(mesh: WaypointMesh) -> None:
    conn = mesh.client()
    status, _, _ = request(conn, "/v1/dry-run-me")
    conn.close()
    assert status == 200
    assert "/v1/dry-run-me" in mesh.v1.paths()
    assert mesh.wp.metric("meshd_policy_dry_run_total", policy="trial-no-dry", result="deny") >= 1
    wait_for(lambda: "dry_run=trial-no-dry=deny" in mesh.wp.log(), mesh.wp)  # the request's access-log line
    assert "dry-run policy trial-no-dry would deny what was allowed" in mesh.wp.log()


def test_waypoint_status_lines_carry_reason_phrases(mesh: WaypointMesh) -> None:
    conn = mesh.client()
    for path, method, expected in (("/v1/ok", "GET", (200, "OK")), ("/admin/x", "POST", (403, "Forbidden"))):
        conn.request(method, path, body=b"" if method == "POST" else None)
        resp = conn.getresponse()
        resp.read()
        assert (resp.status, resp.reason) == expected
    conn.close()


def test_hosts_match_the_host_the_app_sent_through_an_upstream_listener(mesh: WaypointMesh) -> None:
    conn = mesh.client()
    # The app dialled the upstream listener by address: that is the Host the waypoint sees.
    status, _, body = request(conn, "/named")
    assert status == 403 and b"denied" in body
    # Dialled by name (a hosts-file entry for the listener's address), it sends the name: matched.
    named = {"host": f"reviews.default.mesh:{HTTP_UPSTREAM}"}
    assert request(conn, "/named", headers=named)[0] == 200
    conn.close()
    seen = mesh.v1.paths() + mesh.v2.paths()
    assert seen.count("/named") == 1


def test_raising_plugin_gives_500_and_next_request_succeeds(mesh: WaypointMesh) -> None:
    conn = mesh.client()
    status, _, _ = request(conn, "/boom", headers={"x-boom": "1"})
    assert status == 500
    status, _, _ = request(conn, "/boom")
    assert status == 200
    conn.close()
    assert "plugin 'boom'" in mesh.wp.log()
    plugins = dump(mesh.wp)["plugins"]
    assert isinstance(plugins, list)
    assert any(p["name"] == "boom" and "boom" in p["filters"] for p in plugins)


def test_request_metrics_have_istio_labels(mesh: WaypointMesh) -> None:
    conn = mesh.client()
    assert request(conn, "/v1/metrics")[0] == 200
    conn.close()
    labels = {
        "reporter": "waypoint",
        "source_principal": "spiffe://home.arpa/ns/default/sa/client",
        "source_workload": "client",
        "source_canonical_service": "client",
        "source_canonical_revision": "latest",
        "source_cluster": "home.arpa",
        "destination_workload": "reviews-v1",
        "destination_canonical_revision": "v1",
        "destination_service_name": "reviews",
        "destination_service_namespace": "default",
        "request_protocol": "http",
        "destination_principal": "spiffe://home.arpa/ns/default/sa/reviews",
        "destination_service": "reviews.default",
        "response_code": "200",
        "response_flags": "-",
    }
    assert mesh.wp.metric("istio_requests_total", **labels) >= 1
    assert mesh.wp.metric("istio_request_duration_milliseconds_count", **labels) >= 1
    assert mesh.wp.metric("istio_request_bytes_count", **labels) >= 1
    assert mesh.wp.metric("istio_response_bytes_sum", **labels) > 0
    assert "request complete" in mesh.wp.log()


def test_tcp_service_passes_through_the_waypoint(mesh: WaypointMesh) -> None:
    with socket.create_connection(mesh.tcp, timeout=10) as s:
        s.sendall(b"plain tcp")
        s.shutdown(socket.SHUT_WR)
        assert recv_until_closed(s) == b"plain tcp"
    wait_for(lambda: mesh.wp.metric("istio_tcp_connections_closed_total", reporter="waypoint") >= 1, mesh.wp)


def test_bypassing_the_waypoint_is_hairpinned_through_it(mesh: WaypointMesh) -> None:
    """alpha's `bypass` service points straight at reviews-v1 (bound to wp through `reviews`): beta does
    not connect it but sends the tunnel back through wp, which applies L7 policy as the client and
    forwards to reviews-v1 only (the workload the client dialled, whatever the routes say)."""
    conn = http.client.HTTPConnection(*mesh.bypass, timeout=10)
    for _ in range(3):
        # The by-header route would send this to v2: a hairpinned request stays with the dialled workload.
        status, headers, body = request(conn, "/hairpin", headers={"x-version": "v2"})
        assert (status, headers["x-backend"]) == (200, "reviews-v1"), body
        assert headers["x-seen-traceparent"]  # it went through the waypoint's HTTP path
    status, _, body = request(conn, "/admin/hairpin")
    assert status == 403 and b"RBAC: access denied" in body
    assert "/admin/hairpin" not in mesh.v1.paths() + mesh.v2.paths()
    conn.close()
    wait_for(lambda: "hairpinned a direct tunnel through the waypoint" in mesh.beta.log(), mesh.beta)
    client = {"reporter": "waypoint", "source_principal": "spiffe://home.arpa/ns/default/sa/client"}
    assert mesh.wp.metric("istio_requests_total", response_code="403", **client) >= 1


async def test_a_node_cannot_speak_for_clients_of_another_nodes_workload(mesh: WaypointMesh) -> None:
    """alpha's node identity claims a client of reviews-v1, which beta hosts: wp refuses (401) and logs it.
    Accepting would let any node borrow any client's identity to reach workloads on other nodes."""
    ca = LocalCA.load(mesh.ca_dir)
    alpha_node = SpiffeId.node("home.arpa", "alpha")
    issued = ca.issue(alpha_node)
    provider = StaticCertificates(issued.cert_pem, issued.key_pem, issued.ca_pem).client_provider()
    services = dump(mesh.wp)["catalog"]["services"]
    vip = allocate(services).vip("reviews.default")
    reviews_v1 = mesh.v1_address
    pool = HbonePool(provider, connect_timeout=10, ping_interval=None)
    mark = len(mesh.wp.log())
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            with pytest.raises(TunnelRefused, match="only its node, 'beta'") as refused:
                await pool.open_tunnel(
                    alpha_node,
                    SpiffeId.node("home.arpa", "wp"),
                    (mesh.wp.ip, 15008),
                    f"{vip}:{REVIEWS_PORT}",
                    claim_headers(SpiffeId("home.arpa", "default", "client"), reviews_v1),
                )
            assert refused.value.status == 401
            nursery.cancel_scope.cancel()
    wait_for(lambda: "refused a hairpin tunnel" in mesh.wp.log()[mark:], mesh.wp)


def test_h2_prior_knowledge_concurrent_streams(mesh: WaypointMesh) -> None:
    """One h2c connection (prior knowledge) through alpha's upstream listener: streams run
    concurrently (a fast one sent after a slow one ends first), are routed, and a denied one gets 403
    while its body is refused (the backend never sees it); a body larger than the stream window is
    acknowledged as it is consumed."""
    big = b"b" * (3 << 20)
    rid = uuid.uuid4().hex
    responses, order = h2_exchange(
        mesh.http,
        [
            # by-path, no route timeout: a loaded machine can't turn the slow stream into a 504
            H2Request("/v1/h2-slow?ms=300"),  # 1
            H2Request("/v1/h2-items"),  # 3
            H2Request("/anything-h2", headers=[("x-version", "v2")]),  # 5
            H2Request("/admin/h2", "POST", body=b"secret" * 20000),  # 7
            H2Request("/v1/h2-upload", "POST", headers=[("x-request-id", rid)], body=big),  # 9
        ],
    )
    assert responses[1].status == 200
    assert (responses[3].status, responses[3].headers["x-backend"]) == (200, "reviews-v1")
    assert responses[3].body == b"reviews-v1 GET /v1/h2-items\n"
    assert (responses[5].status, responses[5].headers["x-backend"]) == (200, "reviews-v2")
    assert responses[7].status == 403 and b"denied" in responses[7].body
    assert responses[9].status == 200
    assert order.index(3) < order.index(1), order  # no head-of-line blocking behind the slow stream
    seen = [s for s in mesh.v1.requests if s.headers.get("x-request-id") == rid]
    assert [s.body_size for s in seen] == [len(big)]
    assert not any(p.startswith("/admin") for p in mesh.v1.paths() + mesh.v2.paths())
    wait_for(lambda: "HTTP/2" in mesh.wp.log(), mesh.wp)  # the access log names the protocol


def test_namespace_default_waypoint(mesh: WaypointMesh) -> None:
    """ratings.apps names no waypoint: the namespace default (`[[namespace]]` in wp's catalog) sends it
    through wp; details.apps says `waypoint = "none"` and goes straight to its node."""
    for port, backend, via_waypoint in (
        (RATINGS_UPSTREAM, mesh.ratings, True),
        (DETAILS_UPSTREAM, mesh.details, False),
    ):
        conn = http.client.HTTPConnection(mesh.http[0], port, timeout=10)
        status, headers, _ = request(conn, "/ns-default")
        conn.close()
        assert (status, headers["x-backend"]) == (200, backend.name)
        seen = [s for s in backend.requests if s.path == "/ns-default"]
        # The waypoint adds trace context; the L4 path passes the request untouched.
        assert bool(seen[-1].headers.get("traceparent")) is via_waypoint, seen[-1].headers
    assert mesh.wp.metric("istio_requests_total", destination_service="ratings.apps") >= 1
    assert mesh.wp.metric("istio_requests_total", destination_service="details.apps") == 0


def _explain(d: Meshd, **params: str) -> list[dict[str, object]]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    status, body = http_get(f"{d.admin_url}/policy/explain?{query}")
    assert status == 200, body
    results: list[dict[str, object]] = json.loads(body)["results"]
    return results


def test_policy_explain_at_the_waypoint_and_at_the_node(mesh: WaypointMesh) -> None:
    """The running waypoint explains a request as it decides it (every workload of the service, the
    route and its filters); the destination node says which waypoint decides. The CLI's exit status
    agrees with what the waypoint really answers."""
    client = "home.arpa/ns/default/sa/client"
    denied = _explain(mesh.wp, **{"from": client, "to": "reviews.default:9080", "path": "/admin/x"})
    assert [r["workload"] for r in denied] == ["reviews-v1.default", "reviews-v2.default"]
    assert denied[0]["allowed"] is False and denied[0]["policy"] == "no-admin"
    conn = mesh.client()
    assert request(conn, "/admin/x")[0] == 403  # what the waypoint really does
    conn.close()
    routed = _explain(mesh.wp, **{"from": client, "to": "reviews.default:9080", "path": "/v1/items"})
    assert all(r["allowed"] for r in routed)
    route = routed[0]["route"]
    assert (
        isinstance(route, dict)
        and route["name"] == "by-path"
        and route["backends"] == ["reviews.default{version=v1} 100%"]
    )
    assert "route by-path [" in str(routed[0]["text"])
    flaky = _explain(mesh.wp, **{"from": client, "to": "reviews.default:9080", "path": "/flaky"})
    assert flaky[0]["route"]["filters"] == ["retries"]  # type: ignore[index]
    at_node = _explain(mesh.beta, **{"from": client, "to": "reviews.default:9080"})
    assert at_node and all(str(r["waypoint"]).startswith("'wp' (bound by service; HBONE ") for r in at_node)
    assert routed[0]["binding"] == "service"
    assert "goes through waypoint 'wp'" in str(at_node[0]["text"])
    status, body = http_get(f"{mesh.wp.admin_url}/policy/explain?from={client}&to=echo.nowhere:1")
    assert status == 400 and b"not in this waypoint's catalog" in body
