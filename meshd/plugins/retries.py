"""Built-in `retries`: try the upstream again on 5xx, connect failures, resets or chosen status codes.

Backoff is exponential with full jitter (Envoy's): before retry n, sleep a random time in
[0, min(base * 2**n, max)). A request whose body was streamed beyond `buffer_limit` is never retried
(the body is gone); neither is one whose tries are used up (flag `URX` if the last one failed).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import trio

from meshd import grpc
from meshd.plugins.filters import (
    Filter,
    FilterContext,
    FilterType,
    HttpRequest,
    HttpResponse,
    SendUpstream,
    UpstreamError,
)
from meshd.plugins.hookspecs import hookimpl
from meshd.plugins.settings import RetrySettings
from meshd.plugins.timeout import TIMEOUT_FLAG, timeout_response

RETRIES_EXHAUSTED_FLAG = "URX"
_GATEWAY_ERRORS = frozenset({502, 503, 504})


class RetryFilter(Filter):
    def __init__(
        self,
        settings: RetrySettings,
        *,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = trio.sleep,
    ) -> None:
        self.settings = settings
        self.retry_on = frozenset(settings.retry_on)
        self.codes = frozenset(settings.retriable_status_codes)
        self.grpc_codes = frozenset(code for name, code in grpc.RETRY_ON.items() if name in self.retry_on)
        self.base = settings.base_interval.total_seconds()
        self.cap = (settings.max_interval.total_seconds()) if settings.max_interval else self.base * 10
        self.per_try = settings.per_try_timeout.total_seconds() if settings.per_try_timeout else None
        self._rand = rand
        self._sleep = sleep

    def retriable_status(self, status: int, grpc_status: int | None = None) -> bool:
        on = self.retry_on
        return (
            ("5xx" in on and 500 <= status <= 599)
            or ("gateway-error" in on and status in _GATEWAY_ERRORS)
            or ("retriable-status-codes" in on and status in self.codes)
            or (grpc_status is not None and grpc_status in self.grpc_codes)
        )

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0-based)."""
        return self._rand() * min(self.base * (2.0**retry), self.cap)

    def wrap_upstream(self, ctx: FilterContext, send: SendUpstream) -> SendUpstream:
        async def with_retries(request: HttpRequest) -> HttpResponse:
            tries = 1 + self.settings.attempts
            for attempt in range(tries):
                last = attempt == tries - 1
                if attempt:
                    await self._sleep(self.backoff(attempt - 1))
                    ctx.state["retries"] = attempt
                response: HttpResponse | None = None
                try:
                    if self.per_try is None:
                        response = await send(request)
                    else:
                        with trio.move_on_after(self.per_try):
                            response = await send(request)
                except UpstreamError as exc:
                    retriable = exc.kind in self.retry_on
                    if retriable and not last and self._can_replay(request, ctx):
                        continue
                    if retriable and last:
                        ctx.info.flag(RETRIES_EXHAUSTED_FLAG)
                    raise
                if response is None:  # this try timed out: retried as a gateway error (Envoy does)
                    retriable = bool({"5xx", "gateway-error"} & self.retry_on)
                    if last or not retriable or not self._can_replay(request, ctx):
                        ctx.info.flag(TIMEOUT_FLAG)
                        return timeout_response().to_response()
                    continue
                # A gRPC call that failed before any message answers trailers-only: its status is a header.
                grpc_status = grpc.status_of(response.headers.get("grpc-status")) if self.grpc_codes else None
                if not self.retriable_status(response.status, grpc_status) or not self._can_replay(
                    request, ctx
                ):
                    return response
                if last:
                    ctx.info.flag(RETRIES_EXHAUSTED_FLAG)
                    return response
                await response.aclose()
            raise AssertionError("unreachable: the last try returns or raises")  # pragma: no cover

        return with_retries

    def _can_replay(self, request: HttpRequest, ctx: FilterContext) -> bool:
        body = request.body
        ok = body.replayable and body.size <= self.settings.buffer_limit
        if not ok:
            ctx.state["not_retried"] = "request body beyond the buffer limit"
        return ok


@hookimpl
def meshd_filter_types() -> list[FilterType]:
    return [
        FilterType(
            "retries",
            RetryFilter,
            RetrySettings,
            "retry on 5xx / connect-failure / reset / chosen codes, exponential backoff with jitter",
        )
    ]
