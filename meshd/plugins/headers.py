"""Built-in `headers`: add, set and remove request and response headers."""

from __future__ import annotations

from meshd.plugins.filters import (
    CONTINUE,
    Filter,
    FilterContext,
    FilterType,
    Headers,
    HttpRequest,
    HttpResponse,
    StepResult,
)
from meshd.plugins.hookspecs import hookimpl
from meshd.plugins.settings import HeaderOps, HeaderSettings


def apply_ops(ops: HeaderOps, headers: Headers) -> None:
    """Remove, then set, then add (so `set` and `add` of a removed name still apply)."""
    for name in ops.remove:
        headers.remove(name)
    for name, value in ops.set.items():
        headers.set(name, value)
    for name, value in ops.add.items():
        headers.add(name, value)


class HeadersFilter(Filter):
    def __init__(self, settings: HeaderSettings) -> None:
        self.settings = settings

    def on_request_headers(self, ctx: FilterContext, request: HttpRequest) -> StepResult:
        apply_ops(self.settings.request, request.headers)
        return CONTINUE

    def on_response_headers(self, ctx: FilterContext, response: HttpResponse) -> StepResult:
        apply_ops(self.settings.response, response.headers)
        return CONTINUE


@hookimpl
def meshd_filter_types() -> list[FilterType]:
    return [
        FilterType(
            "headers", HeadersFilter, HeaderSettings, "add / set / remove request and response headers"
        )
    ]
