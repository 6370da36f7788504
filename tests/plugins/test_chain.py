"""The filter chain: order, local responses, async steps, body streaming, failure containment."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from meshd.plugins.filters import (
    CONTINUE,
    PLUGIN_ERROR,
    BodyResult,
    Filter,
    FilterContext,
    HttpRequest,
    HttpResponse,
    LocalResponse,
    RequestInfo,
    ResponseAborted,
    SendUpstream,
    StepResult,
    UpstreamError,
)
from tests.plugins.helpers import FakeUpstream, chain, request, run


class Recorder(Filter):
    def __init__(self, name: str, trace: list[str]) -> None:
        self.name, self.trace = name, trace

    def on_request_headers(self, ctx: FilterContext, request: HttpRequest) -> StepResult:
        self.trace.append(f"{self.name}:req")
        request.headers.add("x-seen", self.name)
        ctx.state["seen"] = True
        return CONTINUE

    def on_response_headers(self, ctx: FilterContext, response: HttpResponse) -> StepResult:
        assert ctx.state["seen"]  # per-request state survives from request to response side
        self.trace.append(f"{self.name}:resp")
        return CONTINUE

    def on_log(self, ctx: FilterContext, record: dict[str, Any]) -> None:
        self.trace.append(f"{self.name}:log")


async def test_filters_run_in_order_and_response_side_in_reverse() -> None:
    trace: list[str] = []
    c = chain(Recorder("a", trace), Recorder("b", trace))
    up = FakeUpstream(200)
    resp, body, info = await run(c, request(), up)
    assert resp.status == 200 and body == b"upstream says 200"
    assert trace == ["a:req", "b:req", "b:resp", "a:resp"]
    assert up.calls[0][0].headers.get_all("x-seen") == ["a", "b"]
    await c.log(c.contexts(info), {})
    assert trace[-2:] == ["a:log", "b:log"]


class Deny(Filter):
    def on_request_headers(self, ctx: FilterContext, request: HttpRequest) -> StepResult:
        return LocalResponse(403, (("x-why", "no"),), b"denied\n", flag="UAEX")


async def test_local_response_never_reaches_upstream_and_runs_earlier_response_filters() -> None:
    trace: list[str] = []
    c = chain(Recorder("a", trace), Deny(), Recorder("c", trace))
    up = FakeUpstream(200)
    resp, body, info = await run(c, request(), up)
    assert (resp.status, body, resp.headers.get("x-why")) == (403, b"denied\n", "no")
    assert up.calls == [] and info.response_flags == ["UAEX"]
    assert trace == ["a:req", "a:resp"]


class AsyncSlow(Filter):
    async def on_request_headers(self, ctx: FilterContext, request: HttpRequest) -> StepResult:
        await trio.sleep(1)
        request.headers.set("x-async", "yes")
        return CONTINUE

    def on_response_headers(self, ctx: FilterContext, response: HttpResponse) -> Any:
        async def later() -> StepResult:
            await trio.sleep(0)
            response.headers.set("x-async-resp", "yes")
            return CONTINUE

        return later()  # an awaitable returned by a sync method is awaited too


async def test_async_steps_are_awaited(autojump_clock: trio.testing.MockClock) -> None:
    up = FakeUpstream(204)
    resp, _, _ = await run(chain(AsyncSlow()), request(), up)
    assert up.calls[0][0].headers.get("x-async") == "yes"
    assert resp.headers.get("x-async-resp") == "yes"


class Upper(Filter):
    def on_request_body(self, ctx: FilterContext, chunk: bytes, end: bool) -> BodyResult:
        ctx.state.setdefault("chunks", []).append((chunk, end))
        return chunk.upper()

    def on_response_body(self, ctx: FilterContext, chunk: bytes, end: bool) -> BodyResult:
        return chunk.replace(b"upstream", b"UPSTREAM")


async def test_bodies_stream_through_filters() -> None:
    f = Upper()
    up = FakeUpstream(200)
    c = chain(f)
    _resp, body, _ = await run(c, request("POST", body=[b"ab", b"cd"]), up)
    assert up.calls[0][1] == b"ABCD"
    assert body == b"UPSTREAM says 200"


class BodyLimit(Filter):
    def on_request_body(self, ctx: FilterContext, chunk: bytes, end: bool) -> BodyResult:
        ctx.state["n"] = ctx.state.get("n", 0) + len(chunk)
        return LocalResponse(413, body=b"too big\n") if ctx.state["n"] > 3 else CONTINUE


async def test_local_response_from_request_body() -> None:
    resp, body, _ = await run(chain(BodyLimit()), request("POST", body=[b"ab", b"cd"]), FakeUpstream(200))
    assert (resp.status, body) == (413, b"too big\n")


class Boom(Filter):
    def __init__(self, where: str) -> None:
        self.where = where

    def on_request_headers(self, ctx: FilterContext, request: HttpRequest) -> StepResult:
        if self.where == "request" and request.headers.get("x-boom"):
            raise RuntimeError("kaboom")
        return CONTINUE

    def on_response_headers(self, ctx: FilterContext, response: HttpResponse) -> StepResult:
        if self.where == "response":
            raise KeyError("kaboom")
        return CONTINUE

    def wrap_upstream(self, ctx: FilterContext, send: SendUpstream) -> SendUpstream:
        if self.where != "upstream":
            return send

        async def broken(req: HttpRequest) -> HttpResponse:
            raise ValueError("kaboom")

        return broken

    def on_response_body(self, ctx: FilterContext, chunk: bytes, end: bool) -> BodyResult:
        if self.where == "response-body":
            raise RuntimeError("kaboom")
        return CONTINUE


@pytest.mark.parametrize("where", ["request", "response", "upstream"])
async def test_raising_filter_is_contained_and_logged_once(
    where: str, caplog: pytest.LogCaptureFixture
) -> None:
    c = chain(Boom(where), route="api")
    caplog.set_level(logging.ERROR, "meshd.plugins")
    for _ in range(3):
        resp, _body, info = await run(c, request(headers={"x-boom": "1"}), FakeUpstream(200))
        assert resp.status == 500 and info.response_flags == [PLUGIN_ERROR]
    errors = [r for r in caplog.records if "kaboom" in r.getMessage()]
    assert len(errors) == 1
    assert "plugin0" in errors[0].getMessage() and "'api'" in errors[0].getMessage()
    assert c.errors == {"f0": 3}
    if where == "request":  # the chain keeps working for a request that does not trigger the bug
        resp, _body, info = await run(c, request(), FakeUpstream(200))
        assert resp.status == 200 and info.response_flags == []


async def test_raising_response_body_filter_aborts_the_stream() -> None:
    c = chain(Boom("response-body"))
    info = RequestInfo("r")
    resp = await c.handle(request(), FakeUpstream(200), info)
    assert resp.status == 200  # headers went out before the body filter failed
    with pytest.raises(ResponseAborted):
        await resp.read()
    assert info.response_flags == [PLUGIN_ERROR]


async def test_upstream_errors_become_503_with_flag() -> None:
    resp, _, info = await run(chain(), request(), FakeUpstream(UpstreamError("connect-failure")))
    assert resp.status == 503 and info.response_flags == ["UF"]
    resp, _, info = await run(chain(), request(), FakeUpstream(UpstreamError("reset")))
    assert resp.status == 503 and info.response_flags == ["UR"]


async def test_a_bug_in_send_upstream_is_not_blamed_on_a_filter() -> None:
    with pytest.raises(ZeroDivisionError):
        await run(chain(Recorder("a", [])), request(), FakeUpstream(ZeroDivisionError()))
