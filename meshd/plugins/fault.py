"""Built-in `fault`: delay (flag `DI`) and abort (flag `FI`) a share of requests, as Istio's fault injection.

The random source is injected (`random.Random(seed)` in tests); a percentage p triggers when
`rand() * 100 < p`.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import trio

from meshd.plugins.filters import (
    CONTINUE,
    Filter,
    FilterContext,
    FilterType,
    HttpRequest,
    LocalResponse,
    StepResult,
)
from meshd.plugins.hookspecs import hookimpl
from meshd.plugins.settings import FaultSettings

DELAY_FLAG = "DI"
ABORT_FLAG = "FI"


class FaultFilter(Filter):
    def __init__(
        self,
        settings: FaultSettings,
        *,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = trio.sleep,
    ) -> None:
        self.settings = settings
        self._rand = rand
        self._sleep = sleep

    async def on_request_headers(self, ctx: FilterContext, request: HttpRequest) -> StepResult:
        delay, abort = self.settings.delay, self.settings.abort
        if delay is not None and self._rand() * 100 < delay.percentage:
            ctx.info.flag(DELAY_FLAG)
            await self._sleep(delay.fixed_delay.total_seconds())
        if abort is not None and self._rand() * 100 < abort.percentage:
            return LocalResponse(abort.http_status, body=b"fault filter abort\n", flag=ABORT_FLAG)
        return CONTINUE


@hookimpl
def meshd_filter_types() -> list[FilterType]:
    return [
        FilterType("fault", FaultFilter, FaultSettings, "inject delays and aborts into a share of requests")
    ]
