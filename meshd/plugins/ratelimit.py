"""Built-in `ratelimit`: a local token bucket per route, or per source principal / header value.

Envoy's local rate limit: the bucket holds up to `max_tokens`; every `fill_interval` it gains
`tokens_per_fill`. A request takes one token or is answered 429 (flag `RL`) with `retry-after` and
`x-ratelimit-limit`, `x-ratelimit-remaining`, `x-ratelimit-reset`. The clock is injected (default
`trio.current_time`, so `trio.testing.MockClock(autojump_threshold=0)` drives it in tests).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import trio

from meshd.plugins.filters import (
    CONTINUE,
    Filter,
    FilterContext,
    FilterType,
    HttpRequest,
    HttpResponse,
    LocalResponse,
    StepResult,
)
from meshd.plugins.hookspecs import hookimpl
from meshd.plugins.settings import RateLimitSettings

RATE_LIMITED_FLAG = "RL"


class TokenBucket:
    """Discrete refills: `per_fill` tokens at each whole `interval` since the last fill. Pure."""

    __slots__ = ("capacity", "interval", "last_fill", "per_fill", "tokens")

    def __init__(self, capacity: int, per_fill: int, interval: float, now: float) -> None:
        self.capacity = capacity
        self.per_fill = per_fill
        self.interval = interval
        self.tokens = capacity
        self.last_fill = now

    def _refill(self, now: float) -> None:
        fills = math.floor((now - self.last_fill) / self.interval)
        if fills > 0:
            self.tokens = min(self.capacity, self.tokens + fills * self.per_fill)
            self.last_fill += fills * self.interval

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens > 0:
            self.tokens -= 1
            return True
        return False

    def next_fill_in(self, now: float) -> float:
        """Seconds until the next token arrives."""
        return max(0.0, self.last_fill + self.interval - now)


class RateLimitFilter(Filter):
    def __init__(self, settings: RateLimitSettings, *, clock: Callable[[], float] | None = None) -> None:
        self.settings = settings
        self._clock = clock or trio.current_time
        self._per_fill = settings.tokens_per_fill or settings.max_tokens
        self._interval = settings.fill_interval.total_seconds()
        self._buckets: OrderedDict[str | None, TokenBucket] = OrderedDict()

    def _key(self, ctx: FilterContext, request: HttpRequest) -> str | None:
        if self.settings.key == "source_principal":
            return ctx.info.source_principal or ""
        if self.settings.key == "header":
            return request.headers.get(self.settings.header or "", "") or ""
        return None

    def _bucket(self, key: str | None, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.settings.max_tokens, self._per_fill, self._interval, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.settings.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def on_request_headers(self, ctx: FilterContext, request: HttpRequest) -> StepResult:
        now = self._clock()
        bucket = self._bucket(self._key(ctx, request), now)
        if bucket.take(now):
            ctx.state["remaining"] = bucket.tokens
            return CONTINUE
        wait = bucket.next_fill_in(now)
        return LocalResponse(
            429,
            (
                ("retry-after", str(max(1, math.ceil(wait)))),
                ("x-ratelimit-limit", str(self.settings.max_tokens)),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", str(max(1, math.ceil(wait)))),
            ),
            b"local rate limited\n",
            RATE_LIMITED_FLAG,
        )

    def on_response_headers(self, ctx: FilterContext, response: HttpResponse) -> StepResult:
        if self.settings.response_headers and "remaining" in ctx.state:
            response.headers.set("x-ratelimit-limit", str(self.settings.max_tokens))
            response.headers.set("x-ratelimit-remaining", str(ctx.state["remaining"]))
        return CONTINUE


@hookimpl
def meshd_filter_types() -> list[FilterType]:
    return [
        FilterType(
            "ratelimit",
            RateLimitFilter,
            RateLimitSettings,
            "local token bucket per route / source principal / header value; 429 with retry-after",
        )
    ]
