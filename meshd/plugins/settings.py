"""Settings of the built-in filters: frozen dataclasses read by meshd's schema module (pure, no trio).

Each is what a route writes in `filters = [{ name = "...", settings = { ... } }]`; `check()` reports
what the types alone cannot, so every mistake is shown as FILE:LINE when the policy loads.
`RetrySettings` is also the route-level `retries = { ... }` table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from meshd.config.schema import Issue

RetryOn = Literal[
    "5xx",
    "gateway-error",
    "connect-failure",
    "reset",
    "retriable-status-codes",
    # gRPC statuses (of a trailers-only response: a call that failed before any message), as Envoy names them
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
]
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9a-zA-Z-]+$")


def doc(text: str, **kw: object) -> dict[str, object]:
    return {"doc": text, **kw}


def _positive(value: timedelta | None, key: str) -> list[Issue]:
    if value is not None and value.total_seconds() <= 0:
        return [Issue((key,), f"{key} must be longer than 0", 'write e.g. "500ms"')]
    return []


def _percentage(value: float, key: str) -> list[Issue]:
    if not 0.0 <= value <= 100.0:
        return [Issue((key,), f"{key} = {value} is outside 0-100")]
    return []


def header_name_issues(names: list[str], key: str) -> list[Issue]:
    return [
        Issue((key,), f"{key}: {n!r} is not an HTTP header name")
        for n in names
        if not _HEADER_NAME.match(n) or n.startswith(":")
    ]


@dataclass(frozen=True)
class RetrySettings:
    attempts: int = field(default=2, metadata=doc("retries after the first try (Istio's attempts)"))
    per_try_timeout: timedelta | None = field(default=None, metadata=doc("deadline of each try"))
    retry_on: tuple[RetryOn, ...] = field(
        default=("5xx", "connect-failure", "reset"),
        metadata=doc(
            "5xx, gateway-error (502/503/504), connect-failure, reset, retriable-status-codes; gRPC: "
            "cancelled, deadline-exceeded, internal, resource-exhausted, unavailable"
        ),
    )
    retriable_status_codes: tuple[int, ...] = field(
        default=(), metadata=doc("status codes retried with retriable-status-codes")
    )
    base_interval: timedelta = field(
        default=timedelta(milliseconds=25), metadata=doc("backoff base; doubles each retry, with jitter")
    )
    max_interval: timedelta | None = field(default=None, metadata=doc("backoff cap; default 10x base"))
    buffer_limit: int = field(
        default=64 * 1024, metadata=doc("request bodies larger than this (bytes) are never retried")
    )

    def check(self) -> list[Issue]:
        issues: list[Issue] = []
        if not 0 <= self.attempts <= 10:
            issues.append(Issue(("attempts",), f"attempts = {self.attempts} is outside 0-10"))
        issues += _positive(self.per_try_timeout, "per_try_timeout")
        issues += _positive(self.base_interval, "base_interval")
        issues += _positive(self.max_interval, "max_interval")
        if self.max_interval is not None and self.max_interval < self.base_interval:
            issues.append(Issue(("max_interval",), "max_interval is shorter than base_interval"))
        for i, code in enumerate(self.retriable_status_codes):
            if not 100 <= code <= 599:
                issues.append(Issue(("retriable_status_codes", i), f"{code} is not an HTTP status code"))
        if self.retriable_status_codes and "retriable-status-codes" not in self.retry_on:
            issues.append(
                Issue(
                    ("retriable_status_codes",),
                    "retriable_status_codes is set but retry_on lacks 'retriable-status-codes'",
                    'add "retriable-status-codes" to retry_on',
                )
            )
        if self.buffer_limit < 0:
            issues.append(Issue(("buffer_limit",), "buffer_limit must be 0 or more bytes"))
        return issues


@dataclass(frozen=True)
class TimeoutSettings:
    timeout: timedelta = field(metadata=doc("time for the upstream's response headers (all tries)"))

    def check(self) -> list[Issue]:
        return _positive(self.timeout, "timeout")


@dataclass(frozen=True)
class RateLimitSettings:
    max_tokens: int = field(metadata=doc("bucket size: the burst allowed"))
    tokens_per_fill: int = field(
        default=0, metadata=doc("tokens added each fill_interval; default max_tokens")
    )
    fill_interval: timedelta = field(default=timedelta(seconds=1), metadata=doc("how often the bucket fills"))
    key: Literal["route", "source_principal", "header"] = field(
        default="route", metadata=doc("one bucket per route, per source principal, or per header value")
    )
    header: str | None = field(default=None, metadata=doc("the header whose value picks the bucket"))
    max_keys: int = field(default=10_000, metadata=doc("buckets kept (least recently used dropped)"))
    response_headers: bool = field(
        default=True, metadata=doc("add x-ratelimit-limit/-remaining to allowed responses")
    )

    def check(self) -> list[Issue]:
        issues: list[Issue] = []
        if self.max_tokens < 1:
            issues.append(Issue(("max_tokens",), "max_tokens must be at least 1"))
        if self.tokens_per_fill < 0:
            issues.append(Issue(("tokens_per_fill",), "tokens_per_fill must be 0 (= max_tokens) or more"))
        issues += _positive(self.fill_interval, "fill_interval")
        if self.key == "header" and not self.header:
            issues.append(Issue(("key",), 'key = "header" needs header = "<name>"', 'add header = "x-user"'))
        if self.header is not None:
            issues += header_name_issues([self.header], "header")
            if self.key != "header":
                issues.append(Issue(("header",), 'header is only used with key = "header"'))
        if self.max_keys < 1:
            issues.append(Issue(("max_keys",), "max_keys must be at least 1"))
        return issues


@dataclass(frozen=True)
class FaultDelay:
    fixed_delay: timedelta = field(metadata=doc("how long to hold the request"))
    percentage: float = field(default=100.0, metadata=doc("share of requests delayed, 0-100"))

    def check(self) -> list[Issue]:
        return _percentage(self.percentage, "percentage") + _positive(self.fixed_delay, "fixed_delay")


@dataclass(frozen=True)
class FaultAbort:
    http_status: int = field(metadata=doc("status of the injected response"))
    percentage: float = field(default=100.0, metadata=doc("share of requests aborted, 0-100"))

    def check(self) -> list[Issue]:
        issues = _percentage(self.percentage, "percentage")
        if not 200 <= self.http_status <= 599:
            issues.append(Issue(("http_status",), f"http_status {self.http_status} is outside 200-599"))
        return issues


@dataclass(frozen=True)
class FaultSettings:
    delay: FaultDelay | None = field(default=None, metadata=doc("delay injection"))
    abort: FaultAbort | None = field(default=None, metadata=doc("abort injection"))

    def check(self) -> list[Issue]:
        if self.delay is None and self.abort is None:
            return [Issue((), "fault sets neither delay nor abort", "add abort = { http_status = 503 }")]
        return []


@dataclass(frozen=True)
class HeaderOps:
    add: dict[str, str] = field(default_factory=dict, metadata=doc("headers appended"))
    set: dict[str, str] = field(default_factory=dict, metadata=doc("headers replaced (or added)"))
    remove: tuple[str, ...] = field(default=(), metadata=doc("headers removed"))

    def check(self) -> list[Issue]:
        return (
            header_name_issues(list(self.add), "add")
            + header_name_issues(list(self.set), "set")
            + header_name_issues(list(self.remove), "remove")
        )


@dataclass(frozen=True)
class HeaderSettings:
    request: HeaderOps = field(default_factory=HeaderOps, metadata=doc("changes to the request"))
    response: HeaderOps = field(default_factory=HeaderOps, metadata=doc("changes to the response"))
