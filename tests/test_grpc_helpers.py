"""gRPC as the waypoint sees it (meshd.grpc, pure), and the built-in filters' gRPC rules: the timeout
filter honours `grpc-timeout`, the retries filter retries on gRPC statuses (trailers-only answers)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import trio
import trio.testing

from meshd import grpc
from meshd.plugins.filters import Headers, HttpRequest, HttpResponse
from meshd.plugins.retries import RetryFilter
from meshd.plugins.settings import RetrySettings, TimeoutSettings
from meshd.plugins.timeout import TimeoutFilter
from tests.plugins.helpers import FakeUpstream, chain, request, run, slow_200


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1S", 1.0), ("250m", 0.25), ("3H", 10800.0), ("7M", 420.0), ("99999999u", 99.999999), ("10n", 1e-8)],
)
def test_grpc_timeout_parsed(value: str, seconds: float) -> None:
    assert grpc.timeout_seconds(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [None, "", "S", "1", "1s", "123456789S", "-1S", "1.5S"])
def test_grpc_timeout_malformed_is_ignored(value: str | None) -> None:
    assert grpc.timeout_seconds(value) is None


@pytest.mark.parametrize(
    ("http", "code"), [(403, 7), (404, 12), (503, 14), (504, 4), (429, 14), (401, 16), (418, 2)]
)
def test_local_replies_as_grpc_statuses(http: int, code: int) -> None:
    headers = dict(grpc.local_reply_headers(http, "RBAC: access denied\n"))
    assert headers["grpc-status"] == str(code)
    assert headers["grpc-message"] == "RBAC: access denied"
    assert headers["content-type"] == "application/grpc"


async def test_timeout_filter_honours_a_shorter_grpc_timeout(autojump_clock: trio.testing.MockClock) -> None:
    c = chain(TimeoutFilter(TimeoutSettings(timedelta(seconds=2))))
    t0 = trio.current_time()
    resp, _, info = await run(c, request(headers={"grpc-timeout": "300m"}), FakeUpstream(slow_200))
    assert (resp.status, info.response_flags, trio.current_time() - t0) == (504, ["UT"], pytest.approx(0.3))
    t0 = trio.current_time()
    await run(c, request(headers={"grpc-timeout": "1H"}), FakeUpstream(slow_200))  # never lengthens it
    assert trio.current_time() - t0 == pytest.approx(2)


async def test_retries_on_grpc_unavailable_only_when_asked() -> None:
    def unavailable(req: HttpRequest) -> HttpResponse:
        return HttpResponse(200, Headers([("content-type", "application/grpc"), ("grpc-status", "14")]))

    f = RetryFilter(RetrySettings(attempts=1, retry_on=("unavailable",)), rand=lambda: 0.0)
    up = FakeUpstream(unavailable, 200)
    resp, _, _ = await run(chain(f), request(), up)
    assert resp.status == 200 and len(up.calls) == 2 and resp.headers.get("grpc-status") is None
    f = RetryFilter(RetrySettings(attempts=1, retry_on=("5xx",)), rand=lambda: 0.0)
    up = FakeUpstream(unavailable, 200)
    resp, _, _ = await run(chain(f), request(), up)
    assert resp.headers.get("grpc-status") == "14" and len(up.calls) == 1
