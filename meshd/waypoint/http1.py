"""HTTP/1.1 over a byte stream with h11: the waypoint's two sides (server in the client's tunnel,
client in the tunnel to the destination node), and the header rules of a proxy.

Nothing here knows routes, policy or the catalog.
"""

from __future__ import annotations

import os
import random
import re
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import h11
import trio

from meshd.plugins.filters import Headers

CHUNK = 256 * 1024
MAX_HEADERS = 64 * 1024

# RFC 9110 7.6.1 hop-by-hop fields: never forwarded (h11 frames each side itself).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# Trace, span and request ids need to be unique, not secret (W3C trace context 3.2.2.3): a PRNG seeded
# from the OS, rather than `secrets`/`uuid4`, which cost a getrandom() syscall for every id.
_ids = random.Random(os.urandom(32))
_getrandbits = _ids.getrandbits


def _random_hex(bits: int) -> str:
    value = 0
    while not value:  # all zeros is an invalid trace or span id
        value = _getrandbits(bits)
    return f"{value:0{bits // 4}x}"


def _request_id() -> str:
    return uuid.UUID(int=_getrandbits(128), version=4).hex


def _reseed_after_fork() -> None:
    _ids.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed_after_fork)


class H11Stream:
    """An h11 connection over a trio stream: `next_event()` reads as needed, `send()` writes."""

    def __init__(self, stream: trio.abc.Stream, role: Any) -> None:
        self.stream = stream
        self.conn = h11.Connection(role, max_incomplete_event_size=MAX_HEADERS)

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(CHUNK)))
                continue
            return event

    async def send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    @property
    def reusable(self) -> bool:
        """Both sides finished a message cycle on a keep-alive connection."""
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE


def headers_from_h11(raw: Iterable[tuple[bytes, bytes]]) -> Headers:
    return Headers((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw)


def forwardable(headers: Headers) -> list[tuple[str, str]]:
    """Header fields to forward: hop-by-hop ones (and those `connection` names) removed."""
    items = headers.items()
    out = [(k, v) for k, v in items if k not in HOP_BY_HOP]
    if len(out) == len(items):
        return out  # no `connection` field (it is hop-by-hop): nothing else to remove
    named = {t.strip().lower() for v in headers.get_all("connection") for t in v.split(",")}
    return [(k, v) for k, v in out if k not in named] if named else out


def trace_headers(headers: Headers, new_id: Callable[[], str] = _request_id) -> str:
    """W3C trace context: keep the caller's trace id (new one if missing or invalid), give this hop a
    new parent span id; add `x-request-id` if missing. Returns the trace id."""
    m = _TRACEPARENT.fullmatch(headers.get("traceparent") or "")
    if m is not None and m[1] != "0" * 32 and m[2] != "0" * 16:
        trace, flags = m[1], m[3]
    else:
        trace, flags = _random_hex(128), "01"
    headers.set("traceparent", f"00-{trace}-{_random_hex(64)}-{flags}")
    if "x-request-id" not in headers:
        headers.set("x-request-id", new_id())
    return trace
