"""The waypoint's request pipeline (authorize -> route -> filter chain -> send) in memory, with a fake
sender in place of the backends: no sockets, no daemons."""

from __future__ import annotations

from pathlib import Path

from meshd.discovery.catalog import Catalog
from meshd.identity.spiffe import SpiffeId
from meshd.observe.accesslog import RequestRecord, RequestTelemetry
from meshd.observe.metrics import Metrics
from meshd.plugins.filters import RequestInfo, SendUpstream
from meshd.policy import load_policy_dir
from meshd.policy.evaluate import PolicySet
from meshd.waypoint.admission import Tunnel
from meshd.waypoint.pipeline import Pipeline
from meshd.waypoint.router import RouteChoice
from tests.plugins.helpers import FakeUpstream, chunks, request
from tests.support.catalogs import TD, node, service, workload

SVC = service("reviews", 9080, protocol="http", waypoint="wp")
WORKLOAD = workload("beta", "reviews-v1", "127.0.0.10", 9080, sa="reviews", services=("reviews.default",))
CATALOG = Catalog(
    TD,
    node("wp", "127.0.0.1:15008", services=(), role="waypoint"),
    services={SVC.key: SVC},
    workloads=(WORKLOAD,),
)
POLICY = """\
[[authorization]]
name = "no-admin"
namespace = "default"
action = "DENY"
rules = [{ to = [{ paths = ["/admin*"] }] }]

[[route]]
name = "api"
service = "reviews.default"
match = [{ path = { prefix = "/api" } }]
filters = [{ name = "headers", settings = { response = { set = { x-route = "api" } } } }]

[[route]]
name = "rest"
service = "reviews.default"
match = [{ path = { prefix = "/v1" } }]
"""


class FakeSender:
    """Stands in for backends.Backends: records which route and backend each request took."""

    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self.choices: list[RouteChoice] = []

    def sender(self, t: Tunnel, choice: RouteChoice, rec: RequestRecord, info: RequestInfo) -> SendUpstream:
        self.choices.append(choice)
        return self.upstream


def _pipeline(tmp_path: Path, upstream: FakeUpstream) -> tuple[Pipeline, FakeSender, Tunnel]:
    (tmp_path / "p.toml").write_text(POLICY)
    policy, _ = load_policy_dir(tmp_path, role="waypoint")
    sender = FakeSender(upstream)
    pipeline = Pipeline(
        lambda: policy, lambda: CATALOG, sender, RequestTelemetry(Metrics(), access_log=False), None
    )
    client = SpiffeId(TD, "default", "client")
    return pipeline, sender, Tunnel(client, "127.0.0.1", "127.0.0.1:5000", SVC, SVC.ports[0], "240.0.0.1")


async def _run(
    pipeline: Pipeline, t: Tunnel, path: str, body: tuple[bytes, ...] = ()
) -> tuple[int, bytes, RequestRecord, list[str]]:
    req = request("POST" if body else "GET", path)
    rec = pipeline.begin(t, req, "HTTP/1.1")
    done = await pipeline.run(t, req, rec, chunks(body))
    data = await done.response.read()
    await pipeline.finish(rec, done, access_log=False)
    return done.response.status, data, rec, done.info.response_flags


async def test_routes_and_filters_with_a_fake_sender(tmp_path: Path) -> None:
    upstream = FakeUpstream(200)
    pipeline, sender, t = _pipeline(tmp_path, upstream)
    status, _, rec, flags = await _run(pipeline, t, "/api/x", (b"hello", b" world"))
    assert (status, rec.route, flags) == (200, "api", [])
    assert [c.route.name for c in sender.choices] == ["api"]
    assert upstream.calls[0][1] == b"hello world"  # the body streamed through to the sender
    assert rec.trace_id is not None and upstream.calls[0][0].headers.get("traceparent")


async def test_deny_and_no_route_never_reach_the_sender(tmp_path: Path) -> None:
    pipeline, sender, t = _pipeline(tmp_path, FakeUpstream(200))
    assert (await _run(pipeline, t, "/admin/x"))[::3] == (403, ["UAEX"])
    assert (await _run(pipeline, t, "/nowhere"))[::3] == (404, ["NR"])
    assert sender.choices == []


async def test_router_compiled_once_per_policy(tmp_path: Path) -> None:
    pipeline, _, t = _pipeline(tmp_path, FakeUpstream(200))
    first = pipeline.router
    await _run(pipeline, t, "/v1/a")
    assert pipeline.router is first  # same PolicySet: same Router
    empty = PolicySet()
    pipeline._policy = lambda: empty  # a reload swaps the PolicySet (an empty one here)
    assert pipeline.router is not first and len(pipeline.router) == 0
