"""Trace context on the wire: W3C `traceparent`/`tracestate` (continued) and B3 (accepted).

Must never know: sockets, HTTP framing, exporters. Pure functions over header values.

- `extract(get)`: the caller's context from request (or CONNECT) headers. `traceparent` wins; without
  a valid one, B3's single `b3` header, then the multi-header `x-b3-*` form. A 64-bit B3 trace id is
  left-padded to 128 bits, as the W3C/B3 interop note says. `tracestate` rides along with a valid
  `traceparent` only (W3C trace context 3.3.1.1: drop it when the parent is not valid).
- A context's `sampled` is the parent's decision when it made one; None when it deferred (B3 without a
  sampling state), so the local sampler decides.
- Ids need to be unique, not secret (W3C trace context 3.2.2.3): a PRNG seeded from the OS, rather
  than `secrets`, which costs a getrandom() syscall for every id.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_HEX = re.compile(r"[0-9a-f]+")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

_ids = random.Random(os.urandom(32))
_getrandbits = _ids.getrandbits


def _reseed_after_fork() -> None:
    _ids.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed_after_fork)


def random_hex(bits: int) -> str:
    """A non-zero random id as lower-case hex (all zeros is an invalid trace or span id)."""
    value = 0
    while not value:
        value = _getrandbits(bits)
    return f"{value:0{bits // 4}x}"


def random_fraction() -> float:
    """A sampling draw in [0, 1), from the same PRNG (a sampling decision needs no secrecy either)."""
    return _ids.random()


def new_trace_id() -> str:
    return random_hex(128)


def new_span_id() -> str:
    return random_hex(64)


def unix_nanos() -> int:
    return time.time_ns()


@dataclass(frozen=True, slots=True)
class SpanContext:
    """A span's identity as it travels: 32 hex trace id, 16 hex span id, the sampling decision."""

    trace_id: str
    span_id: str
    sampled: bool | None = True  # None: the parent deferred the decision (B3 only)
    tracestate: str = ""

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: str | None) -> SpanContext | None:
    """A valid `traceparent`, or None. Version ff is invalid; version 00 has no trailing fields; a
    later version may have more (parsed as 00, per the spec's forward compatibility rule)."""
    if not value:
        return None
    m = _TRACEPARENT.fullmatch(value.strip().lower())
    if m is None:
        return None
    version, trace, span, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or trace == _ZERO_TRACE or span == _ZERO_SPAN:
        return None
    return SpanContext(trace, span, bool(int(flags, 16) & 1))


def _b3_trace_id(value: str) -> str | None:
    value = value.strip().lower()
    if len(value) not in (16, 32) or not _HEX.fullmatch(value):
        return None
    value = value.rjust(32, "0")
    return None if value == _ZERO_TRACE else value


def _b3_span_id(value: str) -> str | None:
    value = value.strip().lower()
    if len(value) != 16 or not _HEX.fullmatch(value) or value == _ZERO_SPAN:
        return None
    return value


_B3_SAMPLED = {"1": True, "true": True, "d": True, "0": False, "false": False}


def parse_b3_single(value: str | None) -> SpanContext | None:
    """`b3: {trace}-{span}[-{sampled}[-{parent}]]`. A sampling-only value (`0`, `1`, `d`) carries no
    parent to continue: None."""
    if not value:
        return None
    parts = value.strip().lower().split("-")
    if len(parts) < 2:
        return None
    trace, span = _b3_trace_id(parts[0]), _b3_span_id(parts[1])
    if trace is None or span is None:
        return None
    sampled = _B3_SAMPLED.get(parts[2]) if len(parts) > 2 else None
    if len(parts) > 2 and sampled is None:
        return None
    return SpanContext(trace, span, sampled)


def parse_b3_multi(get: Callable[[str], str | None]) -> SpanContext | None:
    """`x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`, `x-b3-flags` (1 = debug, which implies sampled)."""
    trace_value, span_value = get("x-b3-traceid"), get("x-b3-spanid")
    if not trace_value or not span_value:
        return None
    trace, span = _b3_trace_id(trace_value), _b3_span_id(span_value)
    if trace is None or span is None:
        return None
    sampled: bool | None = None
    if (get("x-b3-flags") or "").strip() == "1":
        sampled = True
    else:
        raw = get("x-b3-sampled")
        if raw is not None:
            sampled = _B3_SAMPLED.get(raw.strip().lower())
    return SpanContext(trace, span, sampled)


def extract(get: Callable[[str], str | None]) -> SpanContext | None:
    """The caller's context from headers (`get` returns a field's value or None), or None."""
    ctx = parse_traceparent(get("traceparent"))
    if ctx is not None:
        state = get("tracestate")
        return SpanContext(ctx.trace_id, ctx.span_id, ctx.sampled, state.strip()) if state else ctx
    return parse_b3_single(get("b3")) or parse_b3_multi(get)


def b3_single(ctx: SpanContext) -> str:
    return f"{ctx.trace_id}-{ctx.span_id}-{'1' if ctx.sampled else '0'}"


def trace_header(start: SpanStart | None) -> list[tuple[str, str]]:
    """The `traceparent` (and `tracestate`) that make the next hop's span a child of `start`."""
    if start is None:
        return []
    ctx = start.context
    out = [("traceparent", ctx.traceparent)]
    if ctx.tracestate:
        out.append(("tracestate", ctx.tracestate))
    return out


@dataclass(slots=True)
class SpanStart:
    """A span begun on the data path: its context, its parent's span id ("" for a root), its start."""

    context: SpanContext
    parent_span_id: str
    start_ns: int
