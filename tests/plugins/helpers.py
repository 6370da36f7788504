"""Small fakes for filter tests: requests, an upstream that answers from a script, a slow answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import trio

from meshd.plugins.filters import (
    BoundFilter,
    Filter,
    FilterChain,
    Headers,
    HttpRequest,
    HttpResponse,
    RequestBody,
    RequestInfo,
    body_of,
)


async def chunks(parts: Sequence[bytes]) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def request(
    method: str = "GET",
    path: str = "/",
    headers: dict[str, str] | None = None,
    body: Sequence[bytes] = (),
    buffer_limit: int = 64 * 1024,
    authority: str = "echo.default:80",
) -> HttpRequest:
    return HttpRequest(
        method, path, authority, Headers((headers or {}).items()), RequestBody(chunks(body), buffer_limit)
    )


async def slow_200(req: HttpRequest) -> HttpResponse:
    """A FakeUpstream step: 200 after 5 s (trio's clock; the timeout tests autojump it)."""
    await trio.sleep(5)
    return HttpResponse(200)


class FakeUpstream:
    """Answers each call with the next item of `script`: a status, an exception, or a callable."""

    def __init__(self, *script: int | Exception | Callable[[HttpRequest], Any]) -> None:
        self.script = list(script)
        self.calls: list[tuple[HttpRequest, bytes]] = []

    async def __call__(self, req: HttpRequest) -> HttpResponse:
        body = await req.body.read()
        self.calls.append((req, body))
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        if callable(step):
            result = step(req)
            if hasattr(result, "__await__"):
                result = await result
            return result  # type: ignore[no-any-return]
        return HttpResponse(step, Headers([("server", "fake")]), body_of(b"upstream says %d" % step))


def chain(*filters: Filter, route: str = "r1", buffer_limit: int = 64 * 1024) -> FilterChain:
    return FilterChain(
        route,
        [BoundFilter(f"f{i}", f"plugin{i}", f) for i, f in enumerate(filters)],
        buffer_limit=buffer_limit,
    )


async def run(c: FilterChain, req: HttpRequest, upstream: Any) -> tuple[HttpResponse, bytes, RequestInfo]:
    info = RequestInfo(c.route, source_principal="home.arpa/ns/default/sa/client")
    resp = await c.handle(req, upstream, info)
    return resp, await resp.read(), info
