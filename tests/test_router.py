"""Waypoint routing (pure): matching, weighted backends, subsets, load errors, LB helpers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.balance import CircuitBreaker, LeastRequest, OutlierDetector, RoundRobin
from meshd.errors import ConfigError
from meshd.plugins.filters import Headers, HttpRequest, RequestInfo
from meshd.policy import load_policy_dir
from meshd.waypoint.backends import overflow_response
from meshd.waypoint.router import Router, compile_router
from tests.plugins.helpers import FakeUpstream

ROUTES = """\
[[route]]
name = "api-v2-for-testers"
service = "reviews.default"
match = [{ path = { prefix = "/api" }, headers = { x-tester = { exact = "yes" } } }]
backends = [{ subset = { version = "v2" } }]

[[route]]
name = "static"
service = "reviews.default"
match = [
  { path = { regex = "/static/[a-z]+\\\\.(css|js)" }, methods = ["GET", "HEAD"] },
  { query = { debug = { exact = "1" } } },
]
backends = [{ service = "cdn.default" }]

[[route]]
name = "split"
service = "reviews.default"
hosts = ["reviews.default", "*.example.com"]
timeout = "2s"
retries = { attempts = 2 }
backends = [
  { subset = { version = "v1" }, weight = 90 },
  { subset = { version = "v2" }, weight = 10 },
]
filters = [{ name = "headers", settings = { response = { set = { x-route = "split" } } } }]
"""


@pytest.fixture
def router(tmp_path: Path) -> Router:
    (tmp_path / "10-routes.toml").write_text(ROUTES)
    policies, _ = load_policy_dir(tmp_path, role="waypoint")
    assert [r.value.name for r in policies.routes] == ["api-v2-for-testers", "static", "split"]
    return compile_router(policies)


def req(
    path: str = "/", method: str = "GET", authority: str = "reviews.default", **headers: str
) -> HttpRequest:
    return HttpRequest(method, path, authority, Headers(headers.items()))


def name_of(router: Router, request: HttpRequest, service: str | None = "reviews.default") -> str | None:
    choice = router.match(request, service)
    return None if choice is None else choice.route.name


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (req("/api/books", x_tester="yes"), "api-v2-for-testers"),
        (req("/api/books", x_tester="no"), "split"),
        (req("/static/site.css"), "static"),
        (req("/static/site.css", "POST"), "split"),
        (req("/static/Site.css"), "split"),  # regex is a full, case-sensitive match
        (req("/other?debug=1"), "static"),
        (req("/other?debug=2"), "split"),
        (req("/", authority="shop.example.com:8080"), "split"),
        (req("/", authority="elsewhere"), None),
    ],
)
def test_matching(router: Router, request_: HttpRequest, expected: str | None) -> None:
    request_.headers = Headers((k.replace("_", "-"), v) for k, v in request_.headers.items())
    assert name_of(router, request_) == expected


def test_service_scopes_routes(router: Router) -> None:
    assert name_of(router, req("/static/a.js"), service="other.default") is None


def test_weighted_split_90_10_and_subsets(router: Router) -> None:
    r = router.with_random(random.Random(1).random)
    picks = [r.match(req("/x"), "reviews.default") for _ in range(2000)]
    versions = [c.backend.subset["version"] for c in picks if c is not None]
    share = versions.count("v2") / len(versions)
    assert len(versions) == 2000 and 0.08 < share < 0.12
    backend = picks[0].backend if picks[0] else None
    assert backend is not None and backend.service == "reviews.default"
    assert backend.selects({"version": backend.subset["version"], "app": "reviews"})
    assert not backend.selects({"app": "reviews"})


async def test_route_chain_has_timeout_retries_and_filters(router: Router) -> None:
    route = router.route("split")
    assert route is not None
    assert [f.name for f in route.chain.filters] == ["timeout", "retries", "headers"]
    resp = await route.chain.handle(req("/"), FakeUpstream(503, 200), RequestInfo("split"))
    assert resp.status == 200 and resp.headers.get("x-route") == "split"


@given(
    method=st.text(max_size=8),
    path=st.text(max_size=40),
    authority=st.text(max_size=30),
    headers=st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=10), max_size=4),
    service=st.one_of(st.none(), st.text(max_size=20)),
)
@settings(max_examples=300, deadline=None)
def test_random_requests_never_crash_the_router(
    tmp_path_factory: pytest.TempPathFactory,
    method: str,
    path: str,
    authority: str,
    headers: dict[str, str],
    service: str | None,
) -> None:
    global _ROUTER
    if _ROUTER is None:
        d = tmp_path_factory.mktemp("routes")
        (d / "r.toml").write_text(ROUTES)
        _ROUTER = compile_router(load_policy_dir(d, role="waypoint")[0])
    choice = _ROUTER.match(HttpRequest(method, path, authority, Headers(headers.items())), service)
    assert choice is None or choice.backend.weight > 0


_ROUTER: Router | None = None


# ---- load errors with FILE:LINE -----------------------------------------------------------------

R = '[[route]]\nname = "r"\nservice = "echo.default"\n'  # lines 1-3

LOAD_ERRORS = [
    ("bad regex", R + 'match = [{ path = { regex = "/a(" } }]\n', 4, "does not compile"),
    (
        "two kinds in one match",
        R + 'match = [{ path = { exact = "/a", prefix = "/b" } }]\n',
        4,
        "exact and prefix",
    ),
    ("path without slash", R + 'match = [{ path = { prefix = "api" } }]\n', 4, "must start with '/'"),
    ("lower-case method", R + 'match = [{ methods = ["get"] }]\n', 4, "upper-case"),
    ("unknown filter", R + 'filters = [{ name = "ratelimits" }]\n', 4, "unknown filter 'ratelimits'"),
    (
        "missing filter setting",
        R + 'filters = [\n  { name = "ratelimit", settings = {} },\n]\n',
        5,
        "missing key 'max_tokens'",
    ),
    (
        "bad filter setting type",
        R + 'filters = [{ name = "timeout", settings = { timeout = "soon" } }]\n',
        4,
        "not a duration",
    ),
    (
        "unknown filter setting",
        R + 'filters = [{ name = "retries", settings = { atempts = 3 } }]\n',
        4,
        "did you mean 'attempts'",
    ),
    (
        "filter check()",
        R + 'filters = [{ name = "ratelimit", settings = { max_tokens = 5, key = "header" } }]\n',
        4,
        "needs header",
    ),
    (
        "fault percentage",
        R
        + 'filters = [{ name = "fault", settings = { abort = { http_status = 503, percentage = 150.0 } } }]\n',
        4,
        "outside 0-100",
    ),
    ("all weights zero", R + "backends = [{ weight = 0 }]\n", 4, "weight 0"),
    ("route retries", R + "retries = { attempts = 99 }\n", 4, "outside 0-10"),
    ("bad load balancer", R + 'load_balancer = "random"\n', 4, "is not one of"),
    ("no service", '[[route]]\nname = "r"\n', 1, "names no service"),
    ("settings not a table", R + 'filters = [{ name = "headers", settings = 3 }]\n', 4, "must be a table"),
]


@pytest.mark.parametrize(
    ("text", "line", "words"), [c[1:] for c in LOAD_ERRORS], ids=[c[0] for c in LOAD_ERRORS]
)
def test_route_load_errors(tmp_path: Path, text: str, line: int, words: str) -> None:
    (tmp_path / "20-routes.toml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_policy_dir(tmp_path, role="waypoint")
    problems = info.value.problems
    assert any(p.line == line and words in p.format() for p in problems), [p.format() for p in problems]
    assert all(p.file == str(tmp_path / "20-routes.toml") for p in problems)


def test_duplicate_route_names(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(R)
    (tmp_path / "b.toml").write_text("\n" + R)
    with pytest.raises(ConfigError) as info:
        load_policy_dir(tmp_path, role="waypoint")
    [p] = info.value.problems
    assert (p.file, p.line) == (str(tmp_path / "b.toml"), 2) and "duplicate route name 'r'" in p.message


def test_config_dump_shows_routes_with_origin(tmp_path: Path) -> None:
    (tmp_path / "r.toml").write_text(ROUTES)
    dump = load_policy_dir(tmp_path, role="waypoint")[0].config_dump()
    assert dump["route"][2]["name"] == "split" and dump["route"][2]["source"] == f"{tmp_path / 'r.toml'}:16"
    assert dump["route"][2]["filters"][0]["settings"]["response"]["set"] == {"x-route": "split"}


# ---- load balancing, outlier ejection, circuit breaking ----------------------------------------


def test_round_robin() -> None:
    rr: RoundRobin[str] = RoundRobin()
    assert [rr.pick(["a", "b", "c"]) for _ in range(4)] == ["a", "b", "c", "a"]
    assert rr.pick([]) is None


def test_least_request_prefers_idle_endpoints() -> None:
    lr: LeastRequest[str] = LeastRequest(random.Random(3))
    for _ in range(5):
        lr.started("busy")
    picks = [lr.pick(["busy", "idle"]) for _ in range(50)]
    assert set(picks) == {"idle"}
    for _ in range(5):
        lr.finished("busy")
    assert lr.active == {}


def test_outlier_ejection_grows_and_recovers() -> None:
    now = [0.0]
    od: OutlierDetector[str] = OutlierDetector(
        lambda: now[0], consecutive_errors=3, base_ejection=10, max_ejection=25
    )
    assert not od.record("a", ok=False) and not od.record("a", ok=False)
    assert od.record("a", ok=False) and od.is_ejected("a")
    assert od.available(["a", "b"]) == ["b"]
    assert od.available(["a"]) == ["a"]  # panic: never zero endpoints
    now[0] = 10.0
    assert not od.is_ejected("a")
    for _ in range(3):
        od.record("a", ok=False)
    assert od.ejected_until("a") == 30.0  # second ejection: 2 * base
    now[0] = 30.0
    for _ in range(3):
        od.record("a", ok=False)
    assert od.ejected_until("a") == 55.0  # third: 3 * base = 30, capped at 25
    od.record("b", ok=False)
    od.record("b", ok=True)
    od.record("b", ok=False)
    od.record("b", ok=False)
    assert not od.is_ejected("b")  # a success resets the run


def test_circuit_breaker() -> None:
    cb = CircuitBreaker(max_pending_requests=2, max_connections=1)
    assert cb.try_start_request() and cb.try_start_request() and not cb.try_start_request()
    cb.finish_request()
    assert cb.try_start_request()
    assert cb.try_open_connection() and not cb.try_open_connection()
    cb.connection_closed()
    assert cb.try_open_connection()
    assert cb.statistics() == {"pending": 2, "connections": 1, "overflows": 2}
    r = overflow_response()
    assert (r.status, r.flag) == (503, "UO")
