"""HTTP/1.1 without I/O, with httptools (llhttp): the waypoint's two sides (server in the client's tunnel,
client in the tunnel to the destination node), and the header rules of a proxy.

Must never know: sockets, trio, routes, policy, the catalog. Bytes in -> events; heads out as bytes.

Why llhttp and not h11: a proxied request is parsed twice and written twice; h11 spent ~82 us on that,
httptools ~6 us (docs/design.md; measured on this kind of machine). h11 stays in the small admin server.

Theory of operation
  * `RequestParser.feed(data)` / `ResponseParser.feed(data)` return the events the bytes completed:
    a `Head`, body `bytes` (de-chunked), `END`. Pipelined messages come out in order.
  * Each header name is lower-cased and decoded once, here; the proxy carries that list on (Headers)
    and writes it once (`request_head` / `response_head`): no h11 event objects in between.
  * A message refused by the parser raises `BadMessage(status)`; the caller answers it (400 / 431).
  * A response to HEAD has no body whatever its headers say: the caller says so with `expect_head()`;
    a response without length or chunked framing ends when the connection does (`eof()`).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, cast

import httptools

from meshd.observe.tracecontext import SpanStart, b3_single
from meshd.plugins.filters import Headers

CHUNK = 256 * 1024
MAX_HEADERS = 64 * 1024

# RFC 9110 7.6.1 hop-by-hop fields: never forwarded (each side frames its own message).
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
_NO_BODY_STATUS = frozenset({204, 304})
_REASONS: Final = {s.value: s.phrase for s in HTTPStatus}


class BadMessage(Exception):
    """The peer's bytes are not HTTP/1.1 we accept; `status` is what to answer (400, 431)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Head:
    """A request or response head. `method`/`target` for requests, `status` for responses."""

    method: str
    target: str
    status: int
    version: str  # "1.1" or "1.0"
    headers: list[tuple[str, str]]  # names lower case, in order
    keep_alive: bool
    length: int | None  # content-length, or None
    chunked: bool


class _End:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


END: Final = _End()
Event = Head | bytes | _End


class _Parser:
    """What the request and response parsers share: llhttp's callbacks collected into events."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._headers: list[tuple[str, str]] = []
        self._url = b""
        self._in_head = False
        self._head_bytes = 0
        self._parser = self._new()

    def _new(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        raise NotImplementedError

    # llhttp callbacks
    def on_message_begin(self) -> None:
        self._headers = []
        self._url = b""
        self._in_head = True
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # llhttp reports a chunked body's trailer fields here too: not headers
            self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        length: int | None = None
        chunked = False
        for k, v in self._headers:
            if k == "content-length":
                length = int(v)  # llhttp checked it is a number (and that there is one)
            elif k == "transfer-encoding":
                chunked = chunked or v.lower().endswith("chunked")
        self.events.append(self._head(length, chunked))

    def _head(self, length: int | None, chunked: bool) -> Head:
        raise NotImplementedError

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        self.events.append(END)

    def feed(self, data: bytes) -> list[Event]:
        """The events these bytes complete (the list is the caller's)."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade/CONNECT: never granted here (we answer no 101). The message ends at its head.
            if not self.events or self.events[-1] is not END:
                self.events.append(END)
            self._parser = self._new()
        except httptools.HttpParserError as exc:
            raise BadMessage(400, str(exc) or "malformed HTTP/1.1") from None
        except ValueError as exc:  # content-length beyond int, headers not latin-1 ...
            raise BadMessage(400, str(exc)) from None
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADERS:
                raise BadMessage(431, f"request head larger than {MAX_HEADERS} bytes")
        events, self.events = self.events, []
        return events


class RequestParser(_Parser):
    """Server side: requests from the client."""

    def _new(self) -> httptools.HttpRequestParser:
        return httptools.HttpRequestParser(self)

    def feed(self, data: bytes) -> list[Event]:
        events = super().feed(data)
        for e in events:
            if isinstance(e, Head):
                if e.version not in ("1.1", "1.0"):  # llhttp is lenient with HTTP/0.9 lines
                    raise BadMessage(505, f"HTTP version {e.version} not supported")
                if e.method == "CONNECT":
                    raise BadMessage(405, "CONNECT inside a waypoint tunnel is not supported")
        return events

    def _head(self, length: int | None, chunked: bool) -> Head:
        p = cast(httptools.HttpRequestParser, self._parser)
        return Head(
            p.get_method().decode("ascii"),
            self._url.decode("latin-1"),
            0,
            p.get_http_version(),
            self._headers,
            p.should_keep_alive(),
            length,
            chunked,
        )


class ResponseParser(_Parser):
    """Client side: responses from the destination."""

    def __init__(self) -> None:
        super().__init__()
        self._head_only = False
        self._until_close = False  # the current body ends when the connection does

    def _new(self) -> httptools.HttpResponseParser:
        return httptools.HttpResponseParser(self)

    def expect_head(self) -> None:
        """The next response answers a HEAD request: it ends with its head."""
        self._head_only = True

    def _head(self, length: int | None, chunked: bool) -> Head:
        p = cast(httptools.HttpResponseParser, self._parser)
        status = p.get_status_code()
        head = Head(
            "", "", status, p.get_http_version(), self._headers, p.should_keep_alive(), length, chunked
        )
        if status >= 200:
            self._until_close = (
                not self._head_only and length is None and not chunked and status not in _NO_BODY_STATUS
            )
        return head

    def feed(self, data: bytes) -> list[Event]:
        events = super().feed(data)
        if self._head_only and any(isinstance(e, Head) and e.status >= 200 for e in events):
            # llhttp cannot be told about HEAD: end the message at its head, and start a fresh parser
            # (nothing follows a response before our next request: no pipelining upstream).
            self._head_only = False
            cut = next(i for i, e in enumerate(events) if isinstance(e, Head) and e.status >= 200)
            events = [*events[: cut + 1], END]
            self._parser = self._new()
        return events

    def eof(self) -> bool:
        """The connection ended: True if that ends the current response (a close-delimited body)."""
        if self._until_close:
            self._until_close = False
            return True
        return False


# ---- writing ------------------------------------------------------------------------------------


def _head_bytes(start: str, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [start]
    lines += [f"{k}: {v}" for k, v in headers]
    text = "\r\n".join(lines) + "\r\n\r\n"
    n = len(lines) + 1
    if text.count("\n") != n or text.count("\r") != n:  # a CR or LF inside a name or value
        raise ValueError("header field with a line break")
    return text.encode("latin-1")


def request_head(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    return _head_bytes(f"{method} {target} HTTP/1.1", headers)


def response_head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    return _head_bytes(f"HTTP/1.1 {status} {_REASONS.get(status, '')}", headers)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never empty: that would end the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"
CONTINUE_100: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


def has_body(status: int, method: str) -> bool:
    return method != "HEAD" and status >= 200 and status not in _NO_BODY_STATUS


# ---- proxy header rules -------------------------------------------------------------------------

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


# RFC 9562 version 4: bits 76-79 hold the version (4), bits 62-63 the variant (0b10). Set by hand, as
# uuid.UUID(int=..., version=4) does, without building a UUID object per request.
_UUID4_CLEAR = ~((0xF << 76) | (0x3 << 62))
_UUID4_SET = (0x4 << 76) | (0x2 << 62)


def _request_id() -> str:
    return f"{(_getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET:032x}"


def _reseed_after_fork() -> None:
    _ids.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed_after_fork)


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


def set_trace_headers(headers: Headers, span: SpanStart) -> None:
    """The upstream sees `span` as its parent: W3C headers always, B3 ones where the caller sent B3."""
    ctx = span.context
    headers.set("traceparent", ctx.traceparent)
    if ctx.tracestate:
        headers.set("tracestate", ctx.tracestate)
    elif "tracestate" in headers:
        headers.remove("tracestate")  # it belonged to a traceparent that was not valid
    if "b3" in headers:
        headers.set("b3", b3_single(ctx))
    if "x-b3-traceid" in headers:
        headers.set("x-b3-traceid", ctx.trace_id)
        headers.set("x-b3-spanid", ctx.span_id)
        headers.set("x-b3-sampled", "1" if ctx.sampled else "0")
        if span.parent_span_id:
            headers.set("x-b3-parentspanid", span.parent_span_id)
