"""meshd-hello: a third-party meshd plugin offering the `hello` filter.

Enable it on a route in a policy file:

    [[route]]
    name = "greet"
    service = "echo.default"
    filters = [{ name = "hello", settings = { greeting = "hi there" } }]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshd.config.schema import Issue
from meshd.plugins import hookimpl
from meshd.plugins.filters import CONTINUE, Filter, FilterContext, FilterType, HttpResponse, StepResult


@dataclass(frozen=True)
class HelloSettings:
    greeting: str = field(default="hello", metadata={"doc": "the x-hello header's value"})

    def check(self) -> list[Issue]:
        if not self.greeting.isprintable() or not self.greeting:
            return [Issue(("greeting",), "greeting must be printable text")]
        return []


class HelloFilter(Filter):
    """Adds `x-hello: <greeting>` to every response; counts requests per request context."""

    def __init__(self, settings: HelloSettings) -> None:
        self.greeting = settings.greeting

    def on_response_headers(self, ctx: FilterContext, response: HttpResponse) -> StepResult:
        response.headers.set("x-hello", self.greeting)
        return CONTINUE


@hookimpl
def meshd_filter_types() -> list[FilterType]:
    return [FilterType("hello", HelloFilter, HelloSettings, "adds an x-hello response header")]
