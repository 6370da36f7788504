"""HTTP/2 with prior knowledge inside a client's tunnel: the waypoint's h2 server side.

Two layers, like http1.py and front_http1.py:

* `H2Server`: pure translation (no I/O). Bytes in -> `RequestHead` / `BodyChunk` / `BodyEnd` /
  `StreamReset` / `WindowChanged` / `Terminated` events; responses out as bytes (`data_to_send`).
* `H2Session`: the trio driver of one tunnel. One reader task feeds `H2Server`, **one writer task**
  sends what it produced (nothing else writes to the tunnel), and one task per request stream runs
  the caller's handler with an `H2Exchange` (request head, body iterator, `respond()`).

Flow control: a request body chunk is acknowledged (WINDOW_UPDATE) when the handler consumes it, so
a slow upstream back-pressures the client; what a stream leaves unread when it ends or is reset is
acknowledged then, so the connection window never leaks. The connection window is larger than the
stream window (an idle stream cannot take all of it).

Nothing here knows routes, policy or the catalog.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio
from h2.stream import StreamState

from meshd.hbone.h2_plumbing import QuietFrames, graceful_goaway, start_connection
from meshd.plugins.filters import Headers

log = logging.getLogger("meshd.waypoint")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CHUNK = 256 * 1024
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 4 << 20  # larger than the stream window, never equal
MAX_CONCURRENT_STREAMS = 100
MAX_HEADER_LIST = 64 * 1024


async def sniff(stream: trio.abc.ReceiveStream) -> tuple[bool, bytes]:
    """Read the tunnel's first bytes until they tell HTTP/2 prior knowledge (the client preface)
    from HTTP/1.1. Returns (is_h2, the bytes read); b"" means the client closed at once."""
    buf = b""
    while len(buf) < len(PREFACE) and PREFACE.startswith(buf[: len(PREFACE)]):
        data = await stream.receive_some(CHUNK)
        if not data:
            break
        buf += data
    return buf.startswith(PREFACE), buf


# ---- sans-I/O translation -----------------------------------------------------------------------


@dataclass(frozen=True)
class RequestHead:
    stream_id: int
    method: str
    path: str
    authority: str | None
    scheme: str
    headers: Headers
    end_stream: bool  # no body follows


@dataclass(frozen=True)
class BodyChunk:
    stream_id: int
    data: bytes
    flow_length: int  # what to acknowledge once consumed (includes padding)


@dataclass(frozen=True)
class Trailers:
    stream_id: int
    headers: list[tuple[str, str]]


@dataclass(frozen=True)
class BodyEnd:
    stream_id: int


@dataclass(frozen=True)
class StreamReset:
    stream_id: int


@dataclass(frozen=True)
class WindowChanged:
    """The client opened flow-control windows (or changed settings): blocked senders may go on."""


@dataclass(frozen=True)
class Terminated:
    """The client sent GOAWAY: no new streams; those open may finish."""


Event = RequestHead | BodyChunk | Trailers | BodyEnd | StreamReset | WindowChanged | Terminated


class BadRequest(Exception):
    """A request stream without the pseudo-headers a request needs."""


def _text(v: bytes | str) -> str:
    return v.decode("latin-1") if isinstance(v, bytes) else v


def request_head(stream_id: int, raw: Iterable[tuple[bytes | str, bytes | str]], end: bool) -> RequestHead:
    """An h2 header block as a request: pseudo-headers apart, `cookie` fields joined for HTTP/1.1."""
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    cookies: list[str] = []
    for n, v in raw:
        name, value = _text(n), _text(v)
        if name.startswith(":"):
            pseudo[name] = value
        elif name == "cookie":
            cookies.append(value)
        else:
            regular.append((name, value))
    if cookies:
        regular.append(("cookie", "; ".join(cookies)))
    method, path = pseudo.get(":method"), pseudo.get(":path")
    if method is None or path is None or method == "CONNECT":
        raise BadRequest(f"unsupported request (:method {method!r}, :path {path!r})")
    headers = Headers(regular)
    authority = pseudo.get(":authority") or headers.get("host")
    if not end and "content-length" not in headers:
        # A body of unknown length: the HTTP/1.1 upstream side frames it as chunked.
        headers.set("transfer-encoding", "chunked")
    return RequestHead(stream_id, method, path, authority, pseudo.get(":scheme", "http"), headers, end)


class H2Server:
    """The server side of one HTTP/2 connection, without I/O."""

    def __init__(self) -> None:
        codes = h2.settings.SettingCodes
        self.conn = start_connection(
            client=False,
            settings={
                codes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                codes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                codes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            },
            connection_window=CONNECTION_WINDOW,
            frames=QuietFrames(server=True),
        )
        self._prefix = b""  # a graceful GOAWAY, serialized by hand (h2 would close the connection)
        self.goaway_last: int | None = None  # the last stream id our graceful GOAWAY accepted

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the client; h2.exceptions.ProtocolError if they break the protocol."""
        out: list[Event] = []
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                assert ev.stream_id is not None and ev.headers is not None
                if self.goaway_last is not None and ev.stream_id > self.goaway_last:
                    self.reset(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)  # after our GOAWAY
                    continue
                try:
                    out.append(request_head(ev.stream_id, ev.headers, ev.stream_ended is not None))
                except BadRequest as exc:
                    log.info("h2 request refused: %s", exc)
                    self.reset(ev.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            elif isinstance(ev, h2.events.DataReceived):
                assert ev.stream_id is not None and ev.data is not None
                out.append(BodyChunk(ev.stream_id, ev.data, ev.flow_controlled_length or 0))
            elif isinstance(ev, h2.events.TrailersReceived):
                assert ev.headers is not None
                out.append(Trailers(ev.stream_id or 0, [(_text(k), _text(v)) for k, v in ev.headers]))
            elif isinstance(ev, h2.events.StreamEnded):  # h2 reports END_STREAM on its own, after
                out.append(BodyEnd(ev.stream_id or 0))
            elif isinstance(ev, h2.events.StreamReset):
                out.append(StreamReset(ev.stream_id or 0))
            elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                out.append(WindowChanged())
            elif isinstance(ev, h2.events.ConnectionTerminated):
                out.append(Terminated())
        return out

    def data_to_send(self) -> bytes:
        if self._prefix:
            out, self._prefix = self._prefix + self.conn.data_to_send(), b""
            return out
        return bytes(self.conn.data_to_send())

    def acknowledge(self, stream_id: int, length: int) -> None:
        if length:
            self.conn.acknowledge_received_data(length, stream_id)

    def send_headers(
        self, stream_id: int, status: int, headers: Iterable[tuple[str, str]], end: bool
    ) -> None:
        block = [(":status", str(status)), *((k.lower(), v) for k, v in headers)]
        self.conn.send_headers(stream_id, block, end_stream=end)

    def send_trailers(self, stream_id: int, headers: Iterable[tuple[str, str]]) -> None:
        self.conn.send_headers(stream_id, [(k.lower(), v) for k, v in headers], end_stream=True)

    def send_window(self, stream_id: int) -> int:
        """How many body bytes may go out on the stream now (flow control and frame size)."""
        return min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)

    def send_data(self, stream_id: int, data: bytes, end: bool) -> None:
        self.conn.send_data(stream_id, data, end_stream=end)

    def end_stream(self, stream_id: int) -> None:
        self.conn.end_stream(stream_id)

    def open_remote(self, stream_id: int) -> bool:
        """Is the client still sending on this stream (its request body not finished)?"""
        stream = self.conn.streams.get(stream_id)
        return stream is not None and stream.state_machine.state in (
            StreamState.OPEN,
            StreamState.HALF_CLOSED_LOCAL,
        )

    def reset(self, stream_id: int, code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.INTERNAL_ERROR) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.conn.reset_stream(stream_id, code)

    def goaway(self) -> None:
        self.conn.close_connection()

    def graceful_goaway(self) -> None:
        """GOAWAY(NO_ERROR) naming the last stream accepted: the client opens no new streams, those
        open finish. Written by hand: h2 moves to CLOSED on sending GOAWAY and then refuses every
        frame of the streams still open (meshd/hbone/h2_plumbing.py)."""
        if self.goaway_last is not None:
            return
        last = self.conn.highest_inbound_stream_id
        # h2's queued frames go first: the byte stream must stay in order.
        self._prefix += self.conn.data_to_send() + graceful_goaway(last)
        self.goaway_last = last


# ---- the trio driver ------------------------------------------------------------------------------


@dataclass
class _StreamIO:
    body: trio.MemorySendChannel[BodyChunk | Trailers | None]
    chunks: trio.MemoryReceiveChannel[BodyChunk | Trailers | None]
    unacked: int = 0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reset: bool = False  # by the client


class H2Exchange:
    """One request stream as the handler sees it."""

    def __init__(self, session: H2Session, head: RequestHead, io: _StreamIO) -> None:
        self.session = session
        self.head = head
        self._io = io
        self.body_done = head.end_stream
        self.responded = False
        self.trailers = Headers()  # the request's trailers, once the body has been read

    @property
    def reset(self) -> bool:
        """The client reset the stream (the handler is being cancelled)."""
        return self._io.reset

    async def body(self) -> AsyncIterator[bytes]:
        """The request body; each chunk is acknowledged to the client as it is taken."""
        while not self.body_done:
            item = await self._io.chunks.receive()
            if item is None:
                self.body_done = True
                return
            if isinstance(item, Trailers):
                for k, v in item.headers:
                    self.trailers.add(k, v)
                continue
            self.session.consumed(self.head.stream_id, self._io, item.flow_length)
            if item.data:
                yield item.data

    async def respond_headers(self, status: int, headers: Iterable[tuple[str, str]], end: bool) -> None:
        self.responded = True
        self.session.server.send_headers(self.head.stream_id, status, headers, end)
        self.session.kick()
        await trio.lowlevel.checkpoint()

    async def send(self, data: bytes, end: bool = False) -> None:
        """Body bytes under the client's flow control (waits for WINDOW_UPDATE when it is closed)."""
        s = self.session
        sid = self.head.stream_id
        view = memoryview(data)
        while view:
            window = s.server.send_window(sid)
            if window <= 0:
                await s.window_changed()
                continue
            piece, view = view[:window], view[window:]
            s.server.send_data(sid, bytes(piece), end and not view)
            s.kick()
        if end and not data:
            s.server.end_stream(sid)
            s.kick()
        await trio.lowlevel.checkpoint()

    async def send_trailers(self, headers: Iterable[tuple[str, str]]) -> None:
        """End the response with trailers (gRPC's status)."""
        self.session.server.send_trailers(self.head.stream_id, headers)
        self.session.kick()
        await trio.lowlevel.checkpoint()

    def abort(self) -> None:
        """Reset the stream (the response failed mid-body)."""
        self.session.server.reset(self.head.stream_id)
        self.session.kick()


Handler = Callable[[H2Exchange], Awaitable[None]]


class H2Session:
    """Serve one HTTP/2 connection over `stream` (the bytes in `initial` were read already)."""

    def __init__(self, stream: trio.abc.Stream, handler: Handler) -> None:
        self.stream = stream
        self.handler = handler
        self.server = H2Server()
        self.streams: dict[int, _StreamIO] = {}
        self._wake = trio.Event()
        self._window = trio.Event()
        self._closing = False
        self._draining = False
        self._reader_scope: trio.CancelScope | None = None
        self.requests = 0

    def kick(self) -> None:
        self._wake.set()

    async def window_changed(self) -> None:
        await self._window.wait()

    def consumed(self, stream_id: int, io: _StreamIO, length: int) -> None:
        if length:
            io.unacked -= length
            self.server.acknowledge(stream_id, length)
            self.kick()

    def drain(self) -> None:
        """Graceful GOAWAY: streams in flight finish, then the session ends (the tunnel closes)."""
        if self._draining:
            return
        self._draining = True
        self.server.graceful_goaway()
        self.kick()
        self._end_if_drained()

    def _end_if_drained(self) -> None:
        if self._draining and not self.streams and self._reader_scope is not None:
            self._reader_scope.cancel()  # the writer flushes what is queued (the GOAWAY), then returns

    async def run(self, initial: bytes) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer)
            try:
                with trio.CancelScope() as self._reader_scope:
                    self._end_if_drained()
                    await self._reader(nursery, initial)
            finally:
                for io in self.streams.values():
                    io.scope.cancel()
                self._closing = True
                self.kick()

    async def _reader(self, nursery: trio.Nursery, data: bytes) -> None:
        while True:
            try:
                events = self.server.receive(data)
            except h2.exceptions.ProtocolError as exc:
                log.info("h2 client broke the protocol: %s", exc)
                self._drain_all()
                return
            for ev in events:
                self._dispatch(nursery, ev)
            self.kick()
            try:
                data = bytes(await self.stream.receive_some(CHUNK))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return

    def _drain_all(self) -> None:
        for io in self.streams.values():
            io.scope.cancel()

    def _dispatch(self, nursery: trio.Nursery, ev: Event) -> None:
        if isinstance(ev, RequestHead):
            send, recv = trio.open_memory_channel[BodyChunk | Trailers | None](
                math.inf
            )  # flow control bounds it
            io = self.streams[ev.stream_id] = _StreamIO(send, recv)
            self.requests += 1
            nursery.start_soon(self._serve_stream, ev, io)
        elif isinstance(ev, BodyChunk):
            io_ = self.streams.get(ev.stream_id)
            if io_ is None:
                self.server.acknowledge(ev.stream_id, ev.flow_length)  # a stream we are done with
                return
            io_.unacked += ev.flow_length
            io_.body.send_nowait(ev)
        elif isinstance(ev, Trailers):
            io_ = self.streams.get(ev.stream_id)
            if io_ is not None:
                io_.body.send_nowait(ev)
        elif isinstance(ev, BodyEnd):
            io_ = self.streams.get(ev.stream_id)
            if io_ is not None:
                io_.body.send_nowait(None)
        elif isinstance(ev, StreamReset):
            io_ = self.streams.get(ev.stream_id)
            if io_ is not None:
                io_.reset = True
                io_.scope.cancel()
        elif isinstance(ev, WindowChanged):
            self._window.set()
            self._window = trio.Event()

    async def _serve_stream(self, head: RequestHead, io: _StreamIO) -> None:
        exchange = H2Exchange(self, head, io)
        try:
            with io.scope:
                await self.handler(exchange)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            log.debug("h2 stream %d ended: %s", head.stream_id, exc)
        except Exception:  # contained: the other streams of the connection go on
            log.exception("h2 stream %d failed", head.stream_id)
        finally:
            del self.streams[head.stream_id]
            if not exchange.responded:
                self.server.reset(head.stream_id)
            if io.unacked:
                self.server.acknowledge(head.stream_id, io.unacked)  # unread body: give the window back
            if self.server.open_remote(head.stream_id):
                # Answered before the request body ended (RFC 9113 8.1): stop the client sending it.
                self.server.reset(head.stream_id, h2.errors.ErrorCodes.NO_ERROR)
            self.kick()
            self._end_if_drained()

    async def _writer(self) -> None:
        """The only task that writes to the tunnel."""
        try:
            while True:
                data = self.server.data_to_send()
                if data:
                    await self.stream.send_all(data)
                    continue
                if self._closing:
                    return
                await self._wake.wait()
                self._wake = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("h2 client connection lost while writing: %s", exc)
            self._drain_all()

    def statistics(self) -> dict[str, Any]:
        return {"open_streams": len(self.streams), "requests": self.requests}
