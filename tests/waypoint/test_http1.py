"""The waypoint's sans-I/O HTTP/1.1 (meshd.waypoint.http1, httptools/llhttp): events from bytes cut
anywhere, framing of what it writes, and refusals."""

from __future__ import annotations

import uuid

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.plugins.filters import Headers
from meshd.waypoint.http1 import (
    END,
    LAST_CHUNK,
    BadMessage,
    Event,
    Head,
    RequestParser,
    ResponseParser,
    chunk,
    request_head,
    response_head,
    trace_headers,
)

PIPELINED = (
    b"POST /a?x=1 HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    b"GET /b HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\n\r\n"
    b"HEAD /c HTTP/1.0\r\nHost: web\r\n\r\n"
)


def _flatten(events: list[Event]) -> list[object]:
    """Body bytes joined (a parser may split them anywhere); heads as (method, target, headers)."""
    out: list[object] = []
    for e in events:
        if isinstance(e, bytes):
            if out and isinstance(out[-1], bytes):
                out[-1] += e
            else:
                out.append(e)
        elif isinstance(e, Head):
            out.append((e.method, e.target, e.version, e.keep_alive, tuple(e.headers)))
        else:
            out.append(e)
    return out


def _feed_cut(parser: RequestParser | ResponseParser, data: bytes, cuts: list[int]) -> list[Event]:
    events: list[Event] = []
    last = 0
    for c in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        events += parser.feed(data[last:c])
        last = c
    return events


@given(st.lists(st.integers(0, len(PIPELINED)), max_size=8))
def test_pipelined_requests_cut_anywhere(cuts: list[int]) -> None:
    assert _flatten(_feed_cut(RequestParser(), PIPELINED, cuts)) == [
        ("POST", "/a?x=1", "1.1", True, (("host", "web"), ("transfer-encoding", "chunked"), ("x-a", "1"))),
        b"hello world",
        END,
        ("GET", "/b", "1.1", True, (("host", "web"), ("content-length", "0"))),
        END,
        ("HEAD", "/c", "1.0", False, (("host", "web"),)),
        END,
    ]


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400),
        (b"GET /\r\n\r\n", 505),  # llhttp reads an HTTP/0.9 line: refused
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"CONNECT h:1 HTTP/1.1\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000, 431),
    ],
)
def test_refusals(data: bytes, status: int) -> None:
    with pytest.raises(BadMessage) as exc:
        RequestParser().feed(data)
    assert exc.value.status == status


def test_responses_head_informational_and_close_delimited() -> None:
    p = ResponseParser()
    p.expect_head()
    events = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert [type(e) for e in events] == [Head, type(END)]  # HEAD: no body, whatever the length says
    events = p.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    assert [e.status if isinstance(e, Head) else e for e in events] == [100, END, 201, b"ok", END]
    p = ResponseParser()
    assert [e.status if isinstance(e, Head) else e for e in p.feed(b"HTTP/1.1 200 OK\r\n\r\nuntil")] == [
        200,
        b"until",
    ]
    assert p.eof()  # the connection's end ends this body


def test_written_messages_parse_back_with_h11() -> None:
    """What we write, an independent implementation reads."""
    data = request_head("POST", "/x", [("host", "web"), ("transfer-encoding", "chunked")])
    data += chunk(b"abc") + LAST_CHUNK
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    req = server.next_event()
    assert isinstance(req, h11.Request) and req.target == b"/x"
    assert bytes(server.next_event().data) == b"abc"  # type: ignore[union-attr]
    assert isinstance(server.next_event(), h11.EndOfMessage)
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "web")]))
    client.send(h11.EndOfMessage())
    client.receive_data(response_head(404, [("content-length", "0")]))
    resp = client.next_event()
    assert isinstance(resp, h11.Response) and resp.status_code == 404 and resp.reason == b"Not Found"


@pytest.mark.parametrize("bad", [("x", "a\r\nInjected: 1"), ("x\r\ny", "1"), ("x", "a\rb")])
def test_no_header_injection(bad: tuple[str, str]) -> None:
    with pytest.raises(ValueError):
        response_head(200, [bad])


def test_chunked_trailer_fields_are_not_headers() -> None:
    events = RequestParser().feed(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    head = events[0]
    assert isinstance(head, Head) and head.headers == [("host", "a"), ("transfer-encoding", "chunked")]
    assert events[1:] == [b"abc", END]


def test_trace_headers_add_a_version_4_request_id_and_keep_a_callers() -> None:
    seen = set()
    for _ in range(200):
        headers = Headers()
        trace_headers(headers)
        request_id = headers.get("x-request-id")
        assert request_id is not None
        parsed = uuid.UUID(request_id)
        assert (parsed.version, parsed.variant, parsed.hex) == (4, uuid.RFC_4122, request_id)
        seen.add(request_id)
    assert len(seen) == 200
    mine = Headers([("x-request-id", "abc")])
    trace_headers(mine)
    assert mine.get_all("x-request-id") == ["abc"]
