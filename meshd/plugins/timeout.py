"""Built-in `timeout`: the upstream must answer (response headers) in time, or the client gets 504 + `UT`.

A gRPC request's own deadline (`grpc-timeout`) shortens the route's timeout, as Envoy's
`max_stream_duration.grpc_timeout_header_max` does; it never lengthens it.
"""

from __future__ import annotations

import trio

from meshd import grpc
from meshd.plugins.filters import (
    Filter,
    FilterContext,
    FilterType,
    HttpRequest,
    HttpResponse,
    LocalResponse,
    SendUpstream,
)
from meshd.plugins.hookspecs import hookimpl
from meshd.plugins.settings import TimeoutSettings

TIMEOUT_FLAG = "UT"


def timeout_response() -> LocalResponse:
    return LocalResponse(504, body=b"upstream request timeout\n", flag=TIMEOUT_FLAG)


class TimeoutFilter(Filter):
    def __init__(self, settings: TimeoutSettings) -> None:
        self.seconds = settings.timeout.total_seconds()

    def wrap_upstream(self, ctx: FilterContext, send: SendUpstream) -> SendUpstream:
        async def with_timeout(request: HttpRequest) -> HttpResponse:
            seconds = self.seconds
            deadline = grpc.timeout_seconds(request.headers.get("grpc-timeout"))
            if deadline is not None and deadline < seconds:
                seconds = deadline
            with trio.move_on_after(seconds):
                return await send(request)
            ctx.info.flag(TIMEOUT_FLAG)
            return timeout_response().to_response()

        return with_timeout


@hookimpl
def meshd_filter_types() -> list[FilterType]:
    return [
        FilterType(
            "timeout",
            TimeoutFilter,
            TimeoutSettings,
            "504 (flag UT) when the upstream's response headers take longer than `timeout`",
        )
    ]
