"""HTTP/2 to the destination (prior knowledge, inside one HBONE tunnel per connection): for service
ports declared `http2` or `grpc`. Streams of many requests share a connection (up to the peer's
MAX_CONCURRENT_STREAMS, at most 100); trailers are carried both ways; a reset on either side is passed
to the other (the front-end's cancellation resets the upstream stream; an upstream reset fails the
response body, and the front-end resets the client's stream).

One reader and **one writer task** per connection (nothing else writes to the tunnel), run in the
upstream pool's nursery. A request's body is sent by a task of its own (in that nursery) while the
response is read: gRPC bidirectional streams need both directions at once. Flow control: response
DATA is acknowledged when the front-end consumes it (a slow client back-pressures the backend);
what a stream leaves unread is acknowledged when it ends, so the connection window never leaks.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable
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

from meshd.discovery.catalog import Endpoint
from meshd.hbone.h2_plumbing import QuietFrames, start_connection
from meshd.plugins.filters import Headers, HttpRequest, HttpResponse, UpstreamBodyError, UpstreamError
from meshd.waypoint.http1 import forwardable
from meshd.waypoint.http2 import CONNECTION_WINDOW, MAX_HEADER_LIST, STREAM_WINDOW

log = logging.getLogger("meshd.waypoint")

CHUNK = 256 * 1024
MAX_STREAMS = 100
_CANCEL = h2.errors.ErrorCodes.CANCEL
_CLOSED = (trio.BrokenResourceError, trio.ClosedResourceError)


class UpstreamReset(Exception):
    """The upstream stream was reset (or its connection lost) before the response ended."""


@dataclass(frozen=True, slots=True)
class _Head:
    status: int
    headers: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class _Data:
    data: bytes
    flow: int


@dataclass(frozen=True, slots=True)
class _Trailers:
    headers: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class _Reset:
    reason: str


class _End:
    __slots__ = ()


_END = _End()
_Item = _Head | _Data | _Trailers | _Reset | _End


@dataclass(eq=False)
class _Stream:
    sid: int
    send: trio.MemorySendChannel[_Item]
    recv: trio.MemoryReceiveChannel[_Item]
    unacked: int = 0
    pump: trio.CancelScope = field(default_factory=trio.CancelScope)
    ended: bool = False  # the response ended (END, reset or abandoned)


def _text(v: bytes | str) -> str:
    return v.decode("latin-1") if isinstance(v, bytes) else v


def _split(raw: Any) -> tuple[int, list[tuple[str, str]]]:
    status = 0
    out: list[tuple[str, str]] = []
    for n, v in raw:
        name, value = _text(n), _text(v)
        if name == ":status":
            status = int(value)
        elif not name.startswith(":"):
            out.append((name, value))
    return status, out


class H2Upstream:
    """One HTTP/2 connection to an endpoint; `run()` in a nursery, then `exchange()` per request."""

    def __init__(
        self, endpoint: Endpoint, stream: Any, on_close: Callable[[], None], on_idle: Callable[[], None]
    ) -> None:
        self.endpoint = endpoint
        self.stream = stream
        self._on_close = on_close
        self._on_idle = on_idle
        codes = h2.settings.SettingCodes
        self.conn = start_connection(
            client=True,
            settings={codes.INITIAL_WINDOW_SIZE: STREAM_WINDOW, codes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST},
            connection_window=CONNECTION_WINDOW,
            frames=QuietFrames(server=False),
        )
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.goaway = False
        self.idle_since = 0.0
        self.requests = 0
        self._wake = trio.Event()
        self._window = trio.Event()
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None

    @property
    def available(self) -> bool:
        limit = min(self.conn.remote_settings.max_concurrent_streams, MAX_STREAMS)
        return not self.closed and not self.goaway and len(self.streams) < limit

    def kick(self) -> None:
        self._wake.set()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._scope.cancel()
            close = getattr(self.stream, "close_nowait", None)
            if close is not None:
                close()
            for s in list(self.streams.values()):
                self._fail(s, "upstream connection closed")
            self._on_close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self.idle_since = trio.current_time()  # not "idle since 0": the sweep would take it
                    nursery.start_soon(self._writer)
                    task_status.started()
                    await self._reader()
                    nursery.cancel_scope.cancel()
        finally:
            self.close()

    # ---- reading ---------------------------------------------------------------------------------

    async def _reader(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(CHUNK)
            except _CLOSED:
                return
            if not data:
                return
            try:
                events = self.conn.receive_data(bytes(data))
            except h2.exceptions.ProtocolError as exc:
                log.info(
                    "h2 upstream broke the protocol: %s", exc, extra={"endpoint": self.endpoint.authority}
                )
                return
            for ev in events:
                self._dispatch(ev)
            self.kick()

    def _dispatch(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window.set()
            self._window = trio.Event()
            return
        if isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = True
            last = ev.last_stream_id or 0
            for gone in list(self.streams.values()):
                if gone.sid > last:
                    self._fail(gone, "upstream GOAWAY before the stream started")
            return
        sid = getattr(ev, "stream_id", None)
        s = self.streams.get(sid) if sid is not None else None
        if s is None:
            if isinstance(ev, h2.events.DataReceived) and sid:
                self._ack(sid, ev.flow_controlled_length or 0)  # a stream we are done with
            return
        if isinstance(ev, h2.events.ResponseReceived):
            status, headers = _split(ev.headers)
            s.send.send_nowait(_Head(status, headers))
        elif isinstance(ev, h2.events.DataReceived):
            flow = ev.flow_controlled_length or 0
            s.unacked += flow
            s.send.send_nowait(_Data(ev.data or b"", flow))
        elif isinstance(ev, h2.events.TrailersReceived):
            s.send.send_nowait(_Trailers(_split(ev.headers)[1]))
        elif isinstance(ev, h2.events.StreamEnded):
            s.send.send_nowait(_END)
        elif isinstance(ev, h2.events.StreamReset):
            s.send.send_nowait(_Reset(f"upstream reset the stream ({ev.error_code!r})"))

    def _ack(self, sid: int, length: int) -> None:
        if length:
            with contextlib.suppress(h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
                self.conn.acknowledge_received_data(length, sid)

    def _fail(self, s: _Stream, reason: str) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            s.send.send_nowait(_Reset(reason))

    # ---- writing ---------------------------------------------------------------------------------

    async def _writer(self) -> None:
        """The only task that writes to the tunnel."""
        try:
            while True:
                data = self.conn.data_to_send()
                if data:
                    await self.stream.send_all(data)
                    continue
                await self._wake.wait()
                self._wake = trio.Event()
        except _CLOSED as exc:
            log.debug("h2 upstream lost while writing: %s", exc)
            self._scope.cancel()

    async def _send_body(self, s: _Stream, request: HttpRequest) -> None:
        sid = s.sid
        conn = self.conn
        try:
            with s.pump:
                async for data in request.body.chunks():
                    view = memoryview(data)
                    while view:
                        window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                        if window <= 0:
                            await self._window.wait()
                            continue
                        piece, view = view[:window], view[window:]
                        conn.send_data(sid, bytes(piece))
                        self.kick()
                if request.trailers:
                    conn.send_headers(sid, [(k, v) for k, v in request.trailers.items()], end_stream=True)
                else:
                    conn.end_stream(sid)
                self.kick()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass  # the response ended first (or the stream was reset): nothing more to send
        except Exception as exc:  # the client's body failed (it went away): reset our stream
            log.debug("request body to h2 upstream failed: %r", exc)
            self._reset(s)

    # ---- streams ---------------------------------------------------------------------------------

    def _reset(self, s: _Stream) -> None:
        """Abandon the stream: RST_STREAM(CANCEL) unless it ended, give back its window, forget it."""
        s.pump.cancel()
        if self.streams.pop(s.sid, None) is None:
            return
        if not s.ended:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.conn.reset_stream(s.sid, _CANCEL)
        self._ack(s.sid, s.unacked)
        s.unacked = 0
        self._stream_gone()

    def _done(self, s: _Stream) -> None:
        """The response ended cleanly; a request body still going is stopped (RFC 9113 8.1)."""
        s.ended = True
        s.pump.cancel()
        stream = self.conn.streams.get(s.sid)
        if stream is not None and stream.state_machine.state is StreamState.HALF_CLOSED_REMOTE:
            # Our side still open: the server answered without reading the rest of the body.
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.conn.reset_stream(s.sid, h2.errors.ErrorCodes.NO_ERROR)
        self.streams.pop(s.sid, None)
        self._ack(s.sid, s.unacked)
        s.unacked = 0
        self._stream_gone()

    def _stream_gone(self) -> None:
        self.kick()
        if not self.streams:
            self.idle_since = trio.current_time()
            if self.goaway:
                self.close()
            else:
                self._on_idle()  # the pool's expiry timer may start

    async def exchange(self, request: HttpRequest) -> HttpResponse:
        """Send the request; return once the response headers arrived (body and trailers stream)."""
        if self.closed or self._nursery is None:
            raise UpstreamError("reset", "upstream HTTP/2 connection closed")
        names = {k for k, _ in request.headers.items()}
        te = request.headers.get("te") or ""
        headers = [
            (":method", request.method),
            (":scheme", request.scheme),
            (":authority", request.authority),
            (":path", request.path),
        ]
        headers += [(k, v) for k, v in forwardable(request.headers) if k != "host"]
        if "trailers" in te.lower():
            headers.append(("te", "trailers"))  # the one `te` HTTP/2 allows; gRPC servers want it
        has_body = "transfer-encoding" in names or request.headers.get("content-length") not in (None, "0")
        sid = self.conn.get_next_available_stream_id()
        send, recv = trio.open_memory_channel[_Item](math.inf)  # bounded by flow control
        s = _Stream(sid, send, recv)
        self.streams[sid] = s
        self.requests += 1
        try:
            self.conn.send_headers(sid, headers, end_stream=not has_body)
        except h2.exceptions.ProtocolError as exc:
            self.streams.pop(sid, None)
            raise UpstreamError("reset", f"upstream HTTP/2 refused the request: {exc}") from exc
        self.kick()
        if has_body:
            self._nursery.start_soon(self._send_body, s, request)
        try:
            while True:
                item = await recv.receive()
                if isinstance(item, _Head):
                    if item.status < 200:
                        continue
                    break
                if isinstance(item, _Reset):
                    raise UpstreamError("reset", item.reason)
                raise UpstreamError("reset", "upstream HTTP/2 stream ended before the response")
        except BaseException:
            self._reset(s)
            raise
        trailers = Headers()
        return HttpResponse(item.status, Headers.adopt(item.headers), _Body(self, s, trailers), trailers)

    def statistics(self) -> dict[str, int]:
        return {"streams": len(self.streams), "requests": self.requests}


class _Body:
    """The response body of one upstream stream; trailers land in the response's `trailers`."""

    def __init__(self, up: H2Upstream, s: _Stream, trailers: Headers) -> None:
        self.up = up
        self.s = s
        self.trailers = trailers
        self.done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        up, s = self.up, self.s
        try:
            while not self.done:
                item = await s.recv.receive()
                if isinstance(item, _Data):
                    if item.flow:
                        s.unacked -= item.flow
                        up._ack(s.sid, item.flow)
                        up.kick()
                    if item.data:
                        yield item.data
                elif isinstance(item, _Trailers):
                    for k, v in item.headers:
                        self.trailers.add(k, v)
                elif isinstance(item, _End):
                    self.done = True
                    up._done(s)
                elif isinstance(item, _Reset):
                    self.done = True
                    s.ended = True
                    up._reset(s)
                    raise UpstreamBodyError(item.reason)
        finally:
            if not self.done:  # abandoned (the client went away, or a filter stopped it): reset it
                self.done = True
                up._reset(s)

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.up._reset(self.s)
        await trio.lowlevel.checkpoint()
