"""The waypoint's h2 server side (meshd.waypoint.http2), with an h2 client over trio memory streams."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import trio
import trio.testing
from hpack import Encoder
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, RstStreamFrame, SettingsFrame

from meshd.waypoint.http2 import (
    CONNECTION_WINDOW,
    MAX_CONCURRENT_STREAMS,
    PREFACE,
    STREAM_WINDOW,
    BodyChunk,
    BodyEnd,
    H2Exchange,
    H2Server,
    H2Session,
    RequestHead,
    request_head,
    sniff,
)
from tests.support.frames import frames_in


def test_request_head_translation() -> None:
    head = request_head(
        1,
        [
            (b":method", b"POST"),
            (b":path", b"/a?b=1"),
            (b":scheme", b"http"),
            (b":authority", b"svc:80"),
            (b"cookie", b"a=1"),
            (b"cookie", b"b=2"),
            (b"x-y", b"z"),
        ],
        end=False,
    )
    assert (head.method, head.path, head.authority) == ("POST", "/a?b=1", "svc:80")
    assert head.headers.get("cookie") == "a=1; b=2"
    assert head.headers.get("transfer-encoding") == "chunked"  # unknown length: chunked upstream
    assert "transfer-encoding" not in request_head(3, [(":method", "GET"), (":path", "/")], end=True).headers


def test_sniff_tells_h2_from_h1() -> None:
    async def main() -> None:
        for first, expected in ((PREFACE + b"rest", True), (b"GET / HTTP/1.1\r\n", False), (b"PRIX", False)):
            a, b = trio.testing.memory_stream_pair()
            await a.send_all(first)
            is_h2, data = await sniff(b)
            assert (is_h2, data) == (expected, first)

    trio.run(main)


def _client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    return c


def test_server_events_and_flow_control_ack() -> None:
    client, server = _client(), H2Server()
    client.receive_data(server.data_to_send())
    client.send_headers(1, [(":method", "POST"), (":path", "/"), (":scheme", "http"), (":authority", "x")])
    client.send_data(1, b"x" * 1000, end_stream=True)
    events = server.receive(client.data_to_send())
    head = next(e for e in events if isinstance(e, RequestHead))
    assert not head.end_stream
    chunk = next(e for e in events if isinstance(e, BodyChunk))
    assert chunk.data == b"x" * 1000 and BodyEnd(1) in events
    assert server.conn.remote_flow_control_window(1) == STREAM_WINDOW - 1000
    server.acknowledge(1, chunk.flow_length)
    assert server.conn.inbound_flow_control_window <= CONNECTION_WINDOW


async def _run_client(
    stream: trio.abc.Stream,
    sends: list[tuple[list[tuple[str, str]], bytes]],
    reset_after: int | None = None,
    c: h2.connection.H2Connection | None = None,
) -> tuple[dict[int, int], dict[int, bytes], dict[int, int], h2.connection.H2Connection]:
    """Send requests (headers, body); returns (status, body, reset code) per stream, and the connection."""
    c = c or _client()
    status: dict[int, int] = {}
    bodies: dict[int, bytes] = {}
    resets: dict[int, int] = {}
    pending: dict[int, bytes] = {}
    for hdrs, body in sends:
        sid = c.get_next_available_stream_id()
        c.send_headers(
            sid,
            [(":method", "POST"), (":path", "/"), (":scheme", "http"), (":authority", "x"), *hdrs],
            end_stream=not body,
        )
        pending[sid] = body
        bodies[sid] = b""
    ended: set[int] = set()
    while len(ended) < len(sends):
        for sid, rest in list(pending.items()):
            while (
                rest
                and sid not in ended
                and (w := min(c.local_flow_control_window(sid), c.max_outbound_frame_size))
            ):
                if reset_after is not None and len(sends[0][1]) - len(rest) >= reset_after:
                    c.reset_stream(sid)
                    ended.add(sid)
                    resets[sid] = -1
                    rest = b""
                    break
                c.send_data(sid, rest[:w], end_stream=len(rest) <= w)
                rest = rest[w:]
            pending[sid] = rest
            if not rest:
                del pending[sid]
        await stream.send_all(c.data_to_send())
        if len(ended) == len(sends):
            break
        data = await stream.receive_some(1 << 16)
        assert data, "server closed"
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status[ev.stream_id] = int({str(k): str(v) for k, v in ev.headers or ()}[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                bodies[ev.stream_id] += ev.data
                c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                assert ev.stream_id is not None
                ended.add(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                assert ev.stream_id is not None
                resets[ev.stream_id] = int(ev.error_code or 0)
                ended.add(ev.stream_id)
    await stream.send_all(c.data_to_send())
    return status, bodies, resets, c


async def _handler(ex: H2Exchange) -> None:
    """Echo the body's length, or answer 403 at once (body unread) when asked."""
    if "x-deny" in ex.head.headers:
        await trio.sleep(0.05)  # let the body arrive (buffered, not acknowledged) before answering
        await ex.respond_headers(403, [("content-length", "6")], end=False)
        await ex.send(b"denied", end=True)
        return
    size = 0
    async for chunk in ex.body():
        size += len(chunk)
    await ex.respond_headers(200, [], end=False)
    await ex.send(str(size).encode(), end=True)


def test_session_streams_bodies_and_gives_the_window_back() -> None:
    big = b"z" * (3 * STREAM_WINDOW)  # beyond the stream window: only works if consumed data is acked

    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        session = H2Session(b, _handler)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run, b"")
                c = None
                # One connection, rounds whose unread 403 bodies add up beyond the connection window:
                # only works if what a finished stream left unread is acknowledged.
                for _ in range(CONNECTION_WINDOW // STREAM_WINDOW + 2):
                    status, bodies, resets, c = await _run_client(
                        a, [([], big), ([("x-deny", "1")], b"q" * STREAM_WINDOW), ([], b"")], c=c
                    )
                    assert sorted(status.values()) == [200, 200, 403]
                    assert sorted(bodies.values()) == sorted([str(len(big)).encode(), b"denied", b"0"])
                    assert set(resets.values()) <= {h2.errors.ErrorCodes.NO_ERROR}
                assert session.requests == 3 * (CONNECTION_WINDOW // STREAM_WINDOW + 2)
                await a.aclose()

    trio.run(main)


def test_client_reset_mid_body_cancels_the_handler() -> None:
    cancelled = trio.Event()

    async def handler(ex: H2Exchange) -> None:
        try:
            async for _ in ex.body():
                pass
        finally:
            cancelled.set()

    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        session = H2Session(b, handler)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run, b"")
            await _run_client(a, [([], b"r" * 100_000)], reset_after=50_000)
            with trio.fail_after(5):
                await cancelled.wait()
            assert session.streams == {}
            await a.aclose()

    trio.run(main)


def test_drain_sends_goaway_refuses_new_streams_and_finishes_open_ones() -> None:
    """A drain: GOAWAY(NO_ERROR, last stream = the one in flight), a stream opened after it is refused,
    the one in flight gets its whole response, then the session ends by itself."""
    started, release, ended = trio.Event(), trio.Event(), trio.Event()

    async def handler(ex: H2Exchange) -> None:
        started.set()
        await release.wait()
        await ex.respond_headers(200, [("content-length", "4")], end=False)
        await ex.send(b"done", end=True)

    get = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")]

    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        session = H2Session(b, handler)

        async def serve() -> None:
            await session.run(b"")
            ended.set()

        received = b""
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                c = _client()
                c.send_headers(1, get, end_stream=True)
                await a.send_all(c.data_to_send())
                await started.wait()
                session.drain()
                c.send_headers(3, get, end_stream=True)  # the client has not read the GOAWAY yet
                await a.send_all(c.data_to_send())
                while not any(type(f) is RstStreamFrame and f.stream_id == 3 for f in frames_in(received)):
                    received += await a.receive_some(1 << 16)
                assert not ended.is_set()  # stream 1 is still in flight
                release.set()
                await ended.wait()  # no client action needed: the session ends after its last stream
                await b.aclose()
                while data := await a.receive_some(1 << 16):
                    received += data
        frames = frames_in(received)
        goaway = [f for f in frames if type(f) is GoAwayFrame]
        assert [(f.last_stream_id, f.error_code) for f in goaway] == [(1, 0)]
        rst = [f for f in frames if type(f) is RstStreamFrame]
        assert [(f.stream_id, f.error_code) for f in rst] == [(3, h2.errors.ErrorCodes.REFUSED_STREAM)]
        assert any(type(f) is HeadersFrame and f.stream_id == 1 for f in frames)
        data = [f for f in frames if type(f) is DataFrame and f.stream_id == 1]
        assert b"".join(f.data for f in data) == b"done" and "END_STREAM" in data[-1].flags
        assert session.requests == 1

    trio.run(main)


def test_requests_beyond_the_stream_limit_refuse_only_the_extra_streams() -> None:
    # The same h2 plumbing as HBONE (meshd/hbone/h2_plumbing.py): h2 alone would fail the whole
    # connection (TooManyStreamsError) and every request on it.
    enc = Encoder()
    wire = PREFACE + SettingsFrame(0).serialize()
    count = MAX_CONCURRENT_STREAMS + 20
    for i in range(count):
        head = [(":method", "GET"), (":path", f"/{i}"), (":scheme", "http"), (":authority", "x")]
        f = HeadersFrame(1 + 2 * i, data=enc.encode(head))
        f.flags.add("END_HEADERS")
        wire += f.serialize()
    server = H2Server()
    events = server.receive(wire)
    opened = [e.stream_id for e in events if isinstance(e, RequestHead)]
    assert opened == [1 + 2 * i for i in range(MAX_CONCURRENT_STREAMS)]
    refused = [
        f.stream_id
        for f in frames_in(server.data_to_send())
        if isinstance(f, RstStreamFrame) and f.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
    ]
    assert refused == [1 + 2 * i for i in range(MAX_CONCURRENT_STREAMS, count)]
