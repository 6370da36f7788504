"""The built-in filters: ratelimit, retries, timeout, fault, headers."""

from __future__ import annotations

import random
from datetime import timedelta

import trio
import trio.testing

from meshd.plugins.fault import FaultFilter
from meshd.plugins.filters import HttpRequest, HttpResponse, UpstreamError
from meshd.plugins.headers import HeadersFilter
from meshd.plugins.ratelimit import RateLimitFilter, TokenBucket
from meshd.plugins.retries import RetryFilter
from meshd.plugins.settings import (
    FaultAbort,
    FaultDelay,
    FaultSettings,
    HeaderOps,
    HeaderSettings,
    RateLimitSettings,
    RetrySettings,
    TimeoutSettings,
)
from meshd.plugins.timeout import TimeoutFilter
from tests.plugins.helpers import FakeUpstream, chain, request, run, slow_200

# ---- ratelimit ----------------------------------------------------------------------------------


async def test_ratelimit_allows_the_configured_rate(autojump_clock: trio.testing.MockClock) -> None:
    # 10 per second, burst 10; clients send 50/s for 10 s -> 10 (burst) + 10 per fill * 10 fills.
    c = chain(RateLimitFilter(RateLimitSettings(max_tokens=10, fill_interval=timedelta(seconds=1))))
    up = FakeUpstream(200)
    statuses: list[int] = []
    start = trio.current_time()
    for i in range(500):
        await trio.sleep_until(start + i / 50)
        resp, _, _ = await run(c, request(), up)
        statuses.append(resp.status)
    assert statuses.count(200) == 10 + 10 * 9  # fills at t=1..9 land inside the 10 s window
    assert set(statuses) == {200, 429}


async def test_ratelimit_429_headers_and_flag(autojump_clock: trio.testing.MockClock) -> None:
    c = chain(RateLimitFilter(RateLimitSettings(max_tokens=2, fill_interval=timedelta(seconds=5))))
    up = FakeUpstream(200)
    ok, _, _ = await run(c, request(), up)
    assert ok.headers.get("x-ratelimit-limit") == "2" and ok.headers.get("x-ratelimit-remaining") == "1"
    await run(c, request(), up)
    await trio.sleep(1.5)
    resp, body, info = await run(c, request(), up)
    assert resp.status == 429 and info.response_flags == ["RL"] and body == b"local rate limited\n"
    assert resp.headers.get("retry-after") == "4"  # next fill at t=5, now t=1.5 -> ceil(3.5)
    assert resp.headers.get("x-ratelimit-remaining") == "0"
    assert resp.headers.get("x-ratelimit-limit") == "2"
    assert len(up.calls) == 2


async def test_ratelimit_per_principal_and_per_header(autojump_clock: trio.testing.MockClock) -> None:
    by_header = chain(RateLimitFilter(RateLimitSettings(max_tokens=1, key="header", header="x-user")))
    up = FakeUpstream(200)
    assert (await run(by_header, request(headers={"x-user": "alice"}), up))[0].status == 200
    assert (await run(by_header, request(headers={"x-user": "alice"}), up))[0].status == 429
    assert (await run(by_header, request(headers={"x-user": "bob"}), up))[0].status == 200
    by_principal = RateLimitFilter(RateLimitSettings(max_tokens=1, key="source_principal"))
    c = chain(by_principal)
    info_a = (await run(c, request(), up))[2]
    assert info_a.response_flags == []
    assert (await run(c, request(), up))[0].status == 429  # same principal (helpers.run sets it)


def test_token_bucket_refills_discretely() -> None:
    b = TokenBucket(capacity=2, per_fill=1, interval=1.0, now=0.0)
    assert b.take(0.0) and b.take(0.1) and not b.take(0.9)
    assert b.take(1.0) and not b.take(1.5)
    assert b.take(10.0) and b.take(10.0) and not b.take(10.0)  # capped at capacity


# ---- retries ------------------------------------------------------------------------------------


def no_sleep_retry(settings: RetrySettings) -> RetryFilter:
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    sleeps: list[float] = []
    f = RetryFilter(settings, rand=lambda: 0.5, sleep=sleep)
    f.sleeps = sleeps  # type: ignore[attr-defined]
    return f


async def test_retries_succeed_after_a_failed_first_attempt() -> None:
    f = no_sleep_retry(RetrySettings(attempts=2))
    up = FakeUpstream(503, 200)
    resp, _body, info = await run(chain(f), request("POST", body=[b"hello"]), up)
    assert resp.status == 200 and len(up.calls) == 2
    assert [b for _, b in up.calls] == [b"hello", b"hello"]  # the body is replayed
    assert info.upstream_attempts == 2 and info.response_flags == []


async def test_retries_connect_failure_then_exhausted() -> None:
    f = no_sleep_retry(RetrySettings(attempts=2, base_interval=timedelta(milliseconds=100)))
    up = FakeUpstream(UpstreamError("connect-failure"))
    resp, _, info = await run(chain(f), request(), up)
    assert resp.status == 503 and len(up.calls) == 3
    assert info.response_flags == ["URX", "UF"]
    assert f.sleeps == [0.05, 0.1]  # type: ignore[attr-defined]  # rand 0.5 * 100ms * 2**n


async def test_no_retry_of_a_body_beyond_the_buffer_limit() -> None:
    f = no_sleep_retry(RetrySettings(attempts=3, buffer_limit=4))
    up = FakeUpstream(503, 200)
    resp, _, _ = await run(
        chain(f, buffer_limit=4), request("POST", body=[b"abc", b"def"], buffer_limit=4), up
    )
    assert resp.status == 503 and len(up.calls) == 1


async def test_retry_on_status_codes_only_when_asked() -> None:
    f = no_sleep_retry(
        RetrySettings(attempts=1, retry_on=("retriable-status-codes",), retriable_status_codes=(409,))
    )
    up = FakeUpstream(409, 200)
    assert (await run(chain(f), request(), up))[0].status == 200
    up = FakeUpstream(500, 200)
    assert (await run(chain(f), request(), up))[0].status == 500 and len(up.calls) == 1


def test_backoff_is_exponential_jittered_and_capped() -> None:
    f = RetryFilter(RetrySettings(base_interval=timedelta(milliseconds=25)), rand=lambda: 0.999)
    waits = [f.backoff(n) for n in range(6)]
    assert waits[0] < waits[1] < waits[2] < waits[3] and waits[4] == waits[5] <= 0.25
    assert RetryFilter(RetrySettings(), rand=lambda: 0.0).backoff(3) == 0.0


async def test_per_try_timeout_retries_then_504(autojump_clock: trio.testing.MockClock) -> None:
    async def slow(req: HttpRequest) -> HttpResponse:
        await trio.sleep(10)
        raise AssertionError("not reached")

    f = RetryFilter(RetrySettings(attempts=1, per_try_timeout=timedelta(seconds=1)), rand=lambda: 0.0)
    up = FakeUpstream(slow)
    resp, _, info = await run(chain(f), request(), up)
    assert resp.status == 504 and len(up.calls) == 2 and "UT" in info.response_flags


# ---- timeout ------------------------------------------------------------------------------------


async def test_timeout_gives_504_with_flag(autojump_clock: trio.testing.MockClock) -> None:
    c = chain(TimeoutFilter(TimeoutSettings(timedelta(seconds=2))))
    t0 = trio.current_time()
    resp, body, info = await run(c, request(), FakeUpstream(slow_200))
    assert (resp.status, info.response_flags, body) == (504, ["UT"], b"upstream request timeout\n")
    assert trio.current_time() - t0 == 2
    resp, _, info = await run(c, request(), FakeUpstream(200))
    assert resp.status == 200 and info.response_flags == []


# ---- fault --------------------------------------------------------------------------------------


async def test_fault_abort_percentage_with_seeded_random() -> None:
    f = FaultFilter(
        FaultSettings(abort=FaultAbort(http_status=503, percentage=30)), rand=random.Random(7).random
    )
    c = chain(f)
    up = FakeUpstream(200)
    statuses = [(await run(c, request(), up))[0].status for _ in range(2000)]
    assert 0.27 < statuses.count(503) / 2000 < 0.33
    assert statuses.count(200) == len(up.calls)


async def test_fault_delay(autojump_clock: trio.testing.MockClock) -> None:
    f = FaultFilter(FaultSettings(delay=FaultDelay(fixed_delay=timedelta(seconds=3))))
    t0 = trio.current_time()
    resp, _, info = await run(chain(f), request(), FakeUpstream(200))
    assert resp.status == 200 and trio.current_time() - t0 == 3 and info.response_flags == ["DI"]


async def test_fault_abort_flag() -> None:
    f = FaultFilter(FaultSettings(abort=FaultAbort(http_status=418)))
    resp, _, info = await run(chain(f), request(), FakeUpstream(200))
    assert resp.status == 418 and info.response_flags == ["FI"]


# ---- headers ------------------------------------------------------------------------------------


async def test_headers_add_set_remove() -> None:
    settings = HeaderSettings(
        request=HeaderOps(add={"x-a": "1"}, set={"x-b": "new"}, remove=("x-secret",)),
        response=HeaderOps(set={"server": "meshd"}, add={"x-c": "3"}),
    )
    up = FakeUpstream(200)
    resp, _, _ = await run(
        chain(HeadersFilter(settings)), request(headers={"x-b": "old", "x-secret": "s", "x-a": "0"}), up
    )
    sent = up.calls[0][0].headers
    assert sent.get_all("x-a") == ["0", "1"] and sent.get("x-b") == "new" and "x-secret" not in sent
    assert resp.headers.get("server") == "meshd" and resp.headers.get("x-c") == "3"
