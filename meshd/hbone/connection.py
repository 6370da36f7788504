"""The sans-I/O HBONE connection: HTTP/2 CONNECT tunnels as ztunnel speaks them, over bytes in, bytes out.

Must never know: trio, sockets, TLS, clocks, identities. It turns received bytes into `events` and API
calls into bytes for `data_to_send()`; the trio adapters do all waiting.

Theory of operation
-------------------
`HboneConnection` wraps one `h2.connection.H2Connection` and adds what HBONE needs on top of it:

- Settings fixed by the wire format (docs/design.md): stream window 4 MiB, connection window 16 MiB (never
  equal: that can deadlock), frames up to 1 MiB, 100 concurrent streams.
- Back-pressure: h2 never reopens a window by itself. The app calls `acknowledge(stream_id, n)` for the
  bytes it has consumed; only then does a WINDOW_UPDATE go out.
- Teardown acking: when a stream is reset (either side) or released, bytes received but never
  acknowledged are handed back to the connection window, or the window leaks until all streams stall.
- Graceful GOAWAY: h2 moves its connection state machine to CLOSED on sending or receiving GOAWAY and
  then refuses every frame, which would kill in-flight streams during a drain. So GOAWAY frames are
  intercepted on the way in and serialized by hand on the way out; h2 never sees them unless the
  connection is really over.
- The `repr(frame)` trap: h2 calls `repr(frame)` on every received frame whether or not anything logs,
  and hyperframe's DATA repr hex-encodes the whole payload (about half the receiving CPU). Received
  DATA frames get an instance-level `_body_repr` that skips the payload. If hyperframe ever stops using
  that hook the fix lapses silently (a test guards it), but correctness never depends on it.
- Stream records: every stream the app knows about has a record until `release_stream()`. Events for
  streams without a record (refused, auto-rejected) are dropped and their data acknowledged at once.
- Extended CONNECT (RFC 8441) for UDP: the server advertises SETTINGS_ENABLE_CONNECT_PROTOCOL; a CONNECT
  with `:protocol connect-udp` names its target in `:path` (RFC 9298's default template) and arrives as
  `UdpTunnelRequested`; any other `:protocol` is refused (501). The client opens one only once the peer's
  SETTINGS said it may (`peer_enables_connect_protocol`). The stream's DATA is then capsules
  (meshd/hbone/capsule.py); this class carries them as bytes, like a TCP tunnel's.

Errors: misuse raises `LocalProtocolError`; a peer that breaks HTTP/2 makes `receive_data` raise
`RemoteProtocolError`, after which `data_to_send()` holds our GOAWAY and the connection is finished.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from meshd.hbone import events as ev
from meshd.hbone.errors import LocalProtocolError, RemoteProtocolError
from meshd.hbone.h2_plumbing import QuietFrameBuffer, graceful_goaway, start_connection
from meshd.hbone.target import parse_connect_target, parse_socket_target
from meshd.units import Address

MiB = 1024 * 1024
MAX_WINDOW = 2**31 - 1

# HTTP/2 error codes used here (RFC 9113 section 7).
NO_ERROR = int(h2.errors.ErrorCodes.NO_ERROR)
PROTOCOL_ERROR = int(h2.errors.ErrorCodes.PROTOCOL_ERROR)
INTERNAL_ERROR = int(h2.errors.ErrorCodes.INTERNAL_ERROR)
REFUSED_STREAM = int(h2.errors.ErrorCodes.REFUSED_STREAM)
CANCEL = int(h2.errors.ErrorCodes.CANCEL)
CONNECT_ERROR = int(h2.errors.ErrorCodes.CONNECT_ERROR)
FRAME_SIZE_ERROR = int(h2.errors.ErrorCodes.FRAME_SIZE_ERROR)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True, slots=True)
class HboneSettings:
    """HTTP/2 settings of one HBONE connection; the defaults are ztunnel's."""

    stream_window: int = 4 * MiB
    connection_window: int = 16 * MiB
    max_frame_size: int = 1 * MiB
    max_concurrent_streams: int = 100
    max_header_list_size: int = 64 * 1024

    def __post_init__(self) -> None:
        if not 65535 <= self.stream_window <= MAX_WINDOW:
            raise ValueError(f"stream_window {self.stream_window} must be 65535..{MAX_WINDOW}")
        if not 65535 <= self.connection_window <= MAX_WINDOW:
            raise ValueError(f"connection_window {self.connection_window} must be 65535..{MAX_WINDOW}")
        if self.connection_window == self.stream_window:
            # With equal windows, one stream whose reader stalls takes the whole connection window.
            raise ValueError("connection_window must differ from stream_window (equal windows can deadlock)")
        if not 16384 <= self.max_frame_size <= 2**24 - 1:
            raise ValueError(f"max_frame_size {self.max_frame_size} must be 16384..16777215")
        if self.max_concurrent_streams < 1:
            raise ValueError("max_concurrent_streams must be at least 1")


def parse_authority(text: str) -> tuple[str, int] | None:
    """`ip:port` or `[ipv6]:port` as HBONE's :authority carries it; None if it is anything else."""
    target = parse_socket_target(text)
    return None if target is None else (target.host, target.port)


CONNECT_UDP = "connect-udp"
UDP_PATH_PREFIX = "/.well-known/masque/udp/"


def udp_path(host: str, port: int) -> str:
    """RFC 9298's default URI template, expanded for an IP target (an IPv6 literal's colons are
    percent-encoded, as the template's expansion requires)."""
    return f"{UDP_PATH_PREFIX}{quote(host, safe='')}/{port}/"


def parse_udp_path(path: str | None) -> tuple[str, int] | None:
    """The (ip, port) target of a connect-udp `:path`; None unless it is the default template with an
    IP literal and a port 1..65535 (meshd resolves no names at a node, as for TCP)."""
    if path is None or not path.startswith(UDP_PATH_PREFIX):
        return None
    rest = path[len(UDP_PATH_PREFIX) :].split("?", 1)[0]
    parts = rest.split("/")
    if len(parts) != 3 or parts[2] != "":
        return None
    host, port = unquote(parts[0]), parts[1]
    if not (port.isdigit() and port.isascii() and len(port) <= 5 and 1 <= int(port) <= 65535):
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return str(ip), int(port)


def format_forwarded(host: str, port: int) -> str:
    """The `forwarded` header value ztunnel sends: `for="ip:port"` (IPv6 in brackets, RFC 7239)."""
    return f'for="{Address(host, port)}"'


def parse_forwarded_for(value: str | None) -> str | None:
    """The `for=` of a `forwarded` header (`for="1.2.3.4:5"` -> `1.2.3.4:5`); None if absent."""
    if not value:
        return None
    for part in value.split(";"):
        key, _, val = part.strip().partition("=")
        if key.lower() == "for":
            return val.strip('"')
    return None


@dataclass(slots=True)
class _Stream:
    unacked: int = 0  # bytes delivered in DataReceived and not yet acknowledged
    local_ended: bool = False
    remote_ended: bool = False
    reset: bool = False  # torn down: its unacknowledged bytes were returned already

    @property
    def done(self) -> bool:
        return self.reset or (self.local_ended and self.remote_ended)


def _decode(headers: Iterable[tuple[bytes | str, bytes | str]]) -> ev.Headers:
    out = []
    for name, value in headers:
        n = name.decode("latin-1") if isinstance(name, bytes) else name
        v = value.decode("latin-1") if isinstance(value, bytes) else value
        out.append((n, v))
    return tuple(out)


def _pseudo(headers: ev.Headers) -> tuple[dict[str, str], ev.Headers]:
    pseudo = {n: v for n, v in headers if n.startswith(":")}
    return pseudo, tuple((n, v) for n, v in headers if not n.startswith(":"))


class HboneConnection:
    """One HBONE (HTTP/2) connection, client or server side, without I/O."""

    def __init__(self, role: Role, settings: HboneSettings | None = None) -> None:
        self.role = role
        self.settings = settings or HboneSettings()
        s = self.settings
        codes = h2.settings.SettingCodes
        self._frames = QuietFrameBuffer(server=role is Role.SERVER)
        local = {
            codes.INITIAL_WINDOW_SIZE: s.stream_window,
            codes.MAX_FRAME_SIZE: s.max_frame_size,
            codes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
            codes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
        }
        if role is Role.SERVER:
            local[codes.ENABLE_CONNECT_PROTOCOL] = 1  # RFC 8441: clients may send connect-udp
        self._h2 = start_connection(
            client=role is Role.CLIENT,
            settings=local,
            connection_window=s.connection_window,
            frames=self._frames,
        )
        self._streams: dict[int, _Stream] = {}
        # Inbound bytes held back until they complete a frame (see receive_data).
        self._inbox = bytearray()
        self._inbox_need = 0  # bytes the inbox must hold before a frame can be complete
        self._parsed_from_inbox = 0  # bytes at the inbox's start that h2 is parsing (see _drop_parsed)
        self._preface_left = 24 if role is Role.SERVER else 0
        self._prefix: list[bytes] = []  # output taken from h2 early, and GOAWAYs we serialized ourselves
        self._wants_write = True
        self._ping_counter = 0
        self._goaway_sent: int | None = None  # last_stream_id we announced
        self._goaway_received: int | None = None
        self._closed = False
        self._peer_settings_seen = False

    # ---- state -------------------------------------------------------------------------------------

    @property
    def wants_write(self) -> bool:
        """True when `data_to_send()` may return bytes (set by every call that can produce output)."""
        return self._wants_write

    @property
    def closed(self) -> bool:
        """The connection is over (error, terminal GOAWAY, or `close()`); only flushing remains."""
        return self._closed

    @property
    def goaway_sent(self) -> bool:
        return self._goaway_sent is not None

    @property
    def goaway_received(self) -> bool:
        return self._goaway_received is not None

    @property
    def stream_count(self) -> int:
        """Streams the app has not released yet."""
        return len(self._streams)

    @property
    def active_stream_count(self) -> int:
        """Streams not yet finished at the protocol level (both ends closed, or reset)."""
        return sum(1 for s in self._streams.values() if not s.done)

    @property
    def available_streams(self) -> int:
        """Client side: how many more streams may be opened right now (0 once GOAWAY was seen)."""
        if self._closed or self.goaway_sent or self.goaway_received or self.role is not Role.CLIENT:
            return 0
        limit = min(self._h2.remote_settings.max_concurrent_streams, self.settings.max_concurrent_streams)
        return max(0, limit - self._h2.open_outbound_streams)

    @property
    def peer_enables_connect_protocol(self) -> bool | None:
        """Whether the peer's SETTINGS allow extended CONNECT (RFC 8441); None until they arrived."""
        if not self._peer_settings_seen:
            return None
        return bool(self._h2.remote_settings.enable_connect_protocol)

    def has_stream(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def send_window(self, stream_id: int) -> int:
        """Bytes that may be sent on the stream now (min of stream and connection windows).

        Raises LocalProtocolError if the stream can no longer send (ended, reset, connection closed).
        """
        rec = self._sendable(stream_id)
        del rec
        try:
            return max(0, self._h2.local_flow_control_window(stream_id))
        except h2.exceptions.StreamClosedError as e:
            raise LocalProtocolError(f"stream {stream_id} is closed") from e

    def can_send(self, stream_id: int) -> bool:
        """Whether data may still be sent on the stream (not ended, not reset, connection alive)."""
        rec = self._streams.get(stream_id)
        if self._closed or rec is None or rec.reset or rec.local_ended:
            return False
        stream = self._h2.streams.get(stream_id)
        return stream is not None and not stream.closed

    # ---- opening streams ---------------------------------------------------------------------------

    def open_tunnel(
        self,
        authority: str,
        *,
        forwarded_for: tuple[str, int] | None = None,
        traceparent: str | None = None,
        baggage: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> int:
        """Client: send a CONNECT for `authority` (`ip:port`, or `hostname:port` for a service as
        ztunnel's double HBONE names it: meshd/hbone/target.py); returns the new stream id."""
        if parse_connect_target(authority) is None:
            raise LocalProtocolError(f"CONNECT authority {authority!r} is not ip:port or hostname:port")
        hdrs = [(":method", "CONNECT"), (":authority", authority)]
        if forwarded_for is not None:
            hdrs.append(("forwarded", format_forwarded(*forwarded_for)))
        if traceparent is not None:
            hdrs.append(("traceparent", traceparent))
        if baggage is not None:
            hdrs.append(("baggage", baggage))
        hdrs.extend(headers)
        return self._open(hdrs, end_stream=False)

    def open_udp_tunnel(
        self,
        host: str,
        port: int,
        *,
        authority: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> int:
        """Client: an extended CONNECT (`:protocol connect-udp`, RFC 9298) for the UDP target
        `host:port` (an IP literal); returns the new stream id. `:authority` defaults to the target's
        ip:port, as a TCP tunnel's; the target itself travels in `:path`. The peer's SETTINGS must have
        enabled extended CONNECT (`peer_enables_connect_protocol`)."""
        if not self.peer_enables_connect_protocol:
            raise LocalProtocolError(
                "the peer has not enabled extended CONNECT (SETTINGS_ENABLE_CONNECT_PROTOCOL)"
                if self._peer_settings_seen
                else "the peer's SETTINGS have not arrived yet: extended CONNECT is not allowed before"
            )
        path = udp_path(host, port)
        if parse_udp_path(path) is None:
            raise LocalProtocolError(f"UDP target {host!r}:{port} is not an IP literal and port")
        target = str(Address(host, port))
        hdrs = [
            (":method", "CONNECT"),
            (":protocol", CONNECT_UDP),
            (":scheme", "https"),
            (":authority", authority or target),
            (":path", path),
            ("capsule-protocol", "?1"),
        ]
        hdrs.extend(headers)
        return self._open(hdrs, end_stream=False)

    def send_request(
        self,
        method: str,
        authority: str,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        end_stream: bool = True,
    ) -> int:
        """Client: send an ordinary request (the catalog GET); returns the new stream id."""
        if method.upper() == "CONNECT":
            raise LocalProtocolError("use open_tunnel() for CONNECT")
        hdrs = [(":method", method), (":scheme", "https"), (":authority", authority), (":path", path)]
        hdrs.extend(headers)
        return self._open(hdrs, end_stream=end_stream)

    def _open(self, hdrs: list[tuple[str, str]], *, end_stream: bool) -> int:
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only the client side opens streams")
        if self.available_streams <= 0:
            raise LocalProtocolError("no stream available on this connection (limit reached or GOAWAY)")
        stream_id = self._h2.get_next_available_stream_id()
        try:
            self._h2.send_headers(stream_id, hdrs, end_stream=end_stream)
        except h2.exceptions.ProtocolError as e:
            raise LocalProtocolError(f"cannot open stream: {e}") from e
        self._streams[stream_id] = _Stream(local_ended=end_stream)
        self._wants_write = True
        return stream_id

    # ---- answering (server) ------------------------------------------------------------------------

    def send_response(
        self,
        stream_id: int,
        status: int,
        headers: Sequence[tuple[str, str]] = (),
        *,
        end_stream: bool = False,
    ) -> None:
        """Server: send response headers. 200 without END_STREAM opens a tunnel."""
        if self.role is not Role.SERVER:
            raise LocalProtocolError("only the server side sends responses")
        if not 100 <= status <= 599:
            raise LocalProtocolError(f"status {status} is not an HTTP status")
        rec = self._sendable(stream_id)
        hdrs = [(":status", str(status)), *headers]
        try:
            self._h2.send_headers(stream_id, hdrs, end_stream=end_stream)
        except h2.exceptions.ProtocolError as e:
            raise LocalProtocolError(f"cannot respond on stream {stream_id}: {e}") from e
        rec.local_ended = end_stream
        self._wants_write = True

    def accept(self, stream_id: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Server: 200 to a CONNECT; the tunnel is open both ways. (A connect-udp stream answers with
        `capsule-protocol: ?1`.)"""
        self.send_response(stream_id, 200, headers)

    def refuse(self, stream_id: int, status: int, reason: str = "") -> None:
        """Server: answer with `status` and a short text `reason`, end the stream, and (if the client
        is still sending) reset it with NO_ERROR so it stops (RFC 9113 section 8.1)."""
        rec = self._sendable(stream_id)
        body = reason.encode("utf-8", "replace")[: min(self.send_window(stream_id), 4096)]
        hdrs = [("content-type", "text/plain; charset=utf-8")] if body else []
        self.send_response(stream_id, status, hdrs, end_stream=not body)
        if body:
            self.send_data(stream_id, body, end_stream=True)
        if not rec.remote_ended:
            self._reset(stream_id, rec, NO_ERROR)

    # ---- data ----------------------------------------------------------------------------------------

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, *, end_stream: bool = False
    ) -> None:
        """Send payload; it must fit `send_window(stream_id)`. Split into frames here."""
        rec = self._sendable(stream_id)
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if size > self.send_window(stream_id):
            raise LocalProtocolError(f"{size} bytes exceed the send window of stream {stream_id}")
        frame = self._h2.max_outbound_frame_size
        try:
            if size == 0:
                if end_stream:
                    self._h2.end_stream(stream_id)
            elif type(data) is bytes and size <= frame:
                # Exact bytes pass through hyperframe's serializer without a copy (b"" + x is x).
                if end_stream or not self._h2.send_plain_data(stream_id, data):
                    self._h2.send_data(stream_id, data, end_stream=end_stream)
            else:
                view = memoryview(data).cast("B")
                for pos in range(0, size, frame):
                    last = pos + frame >= size
                    piece = bytes(view[pos : pos + frame])
                    if (end_stream and last) or not self._h2.send_plain_data(stream_id, piece):
                        self._h2.send_data(stream_id, piece, end_stream=end_stream and last)
        except h2.exceptions.ProtocolError as e:
            raise LocalProtocolError(f"cannot send on stream {stream_id}: {e}") from e
        if end_stream:
            rec.local_ended = True
        self._wants_write = True

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side of the tunnel (END_STREAM, like a TCP FIN)."""
        rec = self._sendable(stream_id)
        try:
            self._h2.end_stream(stream_id)
        except h2.exceptions.ProtocolError as e:
            raise LocalProtocolError(f"cannot end stream {stream_id}: {e}") from e
        rec.local_ended = True
        self._wants_write = True

    def acknowledge(self, stream_id: int, size: int) -> None:
        """The app consumed `size` bytes of this stream: let the peer send that much more."""
        if size < 0:
            raise LocalProtocolError("cannot acknowledge a negative size")
        rec = self._streams.get(stream_id)
        if rec is None or rec.reset or self._closed or size == 0:
            return  # torn down: its bytes went back to the connection window already
        size = min(size, rec.unacked)
        rec.unacked -= size
        self._h2.acknowledge_received_data(size, stream_id)
        self._collect_output()

    def reset_stream(self, stream_id: int, error_code: int = CANCEL) -> None:
        """Abort the stream (RST_STREAM); no-op if it is already finished."""
        rec = self._streams.get(stream_id)
        if rec is None or self._closed or rec.done:
            return
        self._reset(stream_id, rec, error_code)

    def release_stream(self, stream_id: int) -> None:
        """The app is done with the stream: reset it if still open, return unacknowledged bytes,
        and forget it. Every stream must be released eventually."""
        rec = self._streams.get(stream_id)
        if rec is None:
            return
        if not self._closed and not rec.done:
            self._reset(stream_id, rec, CANCEL)
        else:
            self._teardown_ack(stream_id, rec)
        del self._streams[stream_id]

    def _reset(self, stream_id: int, rec: _Stream, error_code: int) -> None:
        stream = self._h2.streams.get(stream_id)
        if stream is not None and not stream.closed:
            self._h2.reset_stream(stream_id, error_code)
        self._teardown_ack(stream_id, rec)
        self._wants_write = True

    def _teardown_ack(self, stream_id: int, rec: _Stream) -> None:
        if rec.unacked and not self._closed:
            self._h2.acknowledge_received_data(rec.unacked, stream_id)
            self._wants_write = True
        rec.unacked = 0
        rec.reset = rec.reset or not (rec.local_ended and rec.remote_ended)

    def _sendable(self, stream_id: int) -> _Stream:
        if self._closed:
            raise LocalProtocolError("the connection is closed")
        rec = self._streams.get(stream_id)
        if rec is None:
            raise LocalProtocolError(f"stream {stream_id} is unknown or released")
        if rec.reset:
            raise LocalProtocolError(f"stream {stream_id} was reset")
        if rec.local_ended:
            raise LocalProtocolError(f"stream {stream_id} already sent END_STREAM")
        return rec

    # ---- connection-level ----------------------------------------------------------------------------

    def ping(self) -> bytes:
        """Send a PING; returns its payload, which comes back in `PingAcked`."""
        if self._closed:
            raise LocalProtocolError("the connection is closed")
        self._ping_counter += 1
        payload = self._ping_counter.to_bytes(8, "big")
        self._h2.ping(payload)
        self._wants_write = True
        return payload

    def goaway(self, error_code: int = NO_ERROR, additional_data: bytes = b"") -> None:
        """Graceful GOAWAY: the peer may open no new streams; streams already accepted carry on."""
        if self._closed:
            return
        last = self._h2.highest_inbound_stream_id
        if self._goaway_sent is not None:
            last = min(last, self._goaway_sent)
        # Keep h2's queued frames ahead of ours: the byte stream must stay in order.
        self._prefix += self._h2.pieces_to_send()
        self._prefix.append(graceful_goaway(last, error_code, additional_data))
        self._goaway_sent = last
        self._wants_write = True

    def close(self, error_code: int = NO_ERROR, additional_data: bytes = b"") -> None:
        """End the connection now (GOAWAY through h2); every stream is finished."""
        if self._closed:
            return
        last = self._h2.highest_inbound_stream_id
        if self._goaway_sent is not None:
            last = min(last, self._goaway_sent)
        self._h2.close_connection(error_code, additional_data or None, last_stream_id=last)
        self._goaway_sent = last
        self._closed = True
        self._wants_write = True

    def data_to_send(self) -> bytes:
        """Bytes to write to the transport, in order; empty if there are none."""
        return b"".join(self.pieces_to_send())

    def pieces_to_send(self) -> list[bytes]:
        """`data_to_send()` as the pieces it is made of (large DATA payloads as the objects the app
        passed in, not copied); write them in order."""
        self._wants_write = False
        pieces = self._prefix + self._h2.pieces_to_send() if self._prefix else self._h2.pieces_to_send()
        self._prefix = []
        return pieces

    # ---- receiving ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ev.Event]:
        """Feed bytes from the transport; returns the events they complete. `data` is not kept: the
        caller may reuse its buffer once this returns."""
        if self._closed:
            return []
        with_preface = self._preface_left > 0
        complete = self._complete_frames(data)
        if not complete:
            return []
        out: list[ev.Event] = []
        try:
            if with_preface:
                self._receive_by_h2(complete, out)  # once per connection: h2 checks the preface
            else:
                self._receive_frames(memoryview(complete), out)
        except h2.exceptions.ProtocolError as e:
            self._closed = True
            self._collect_output()
            raise RemoteProtocolError(f"peer broke HTTP/2: {e}", int(e.error_code)) from e
        finally:
            self._frames.release()
            self._drop_parsed(complete)
        self._collect_output()
        return out

    def _receive_frames(self, frames: memoryview, out: list[ev.Event]) -> None:
        """Whole frames -> events. A tunnel's plain DATA frame (no flags, on a stream the app holds)
        becomes its event here, with h2's flow-control accounting (H2Connection.receive_plain_data);
        the frames between such ones go to h2 in runs, in order."""
        size = len(frames)
        pos = start = 0
        while pos < size and not self._closed:
            length = (frames[pos] << 16) | (frames[pos + 1] << 8) | frames[pos + 2]
            end = pos + 9 + length
            if length and frames[pos + 3] == 0 and frames[pos + 4] == 0:  # DATA, no flags
                sid = int.from_bytes(frames[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                rec = self._streams.get(sid)
                if rec is not None and not rec.reset:
                    if start < pos:
                        self._receive_by_h2(frames[start:pos], out)
                        start = pos
                    if not rec.reset and not self._closed and self._h2.receive_plain_data(sid, length):
                        rec.unacked += length
                        out.append(ev.DataReceived(sid, bytes(frames[pos + 9 : end])))
                        start = end
            pos = end
        if start < size and not self._closed:
            self._receive_by_h2(frames[start:], out)

    def _receive_by_h2(self, frames: bytes | memoryview, out: list[ev.Event]) -> None:
        for event in self._h2.receive_data(frames):
            self._translate(event, out)
        if self._frames.goaways:
            goaways, self._frames.goaways = self._frames.goaways, []
            for frame in goaways:
                self._on_goaway(frame, out)

    def _complete_frames(self, data: bytes | bytearray | memoryview) -> bytes | memoryview:
        """The longest prefix of (held bytes + `data`) that ends on a frame boundary (b"" if none);
        the rest is held for the next call.

        Whole frames in `data` are handed on as a view of it, not copied; only a frame split across
        reads is assembled in the inbox (and handed on as a view of the inbox, dropped by
        `_drop_parsed` once h2 has parsed it). h2 would re-parse the pending frame header (allocating
        a frame object) on every call until the frame is complete; with 1 MiB frames arriving as
        16 KiB TLS records that was a third of the receive cost. h2 also only checks a frame's length
        once all of it has arrived, so an oversized frame is refused here, from its header.
        """
        view = memoryview(data)
        head = b""
        if self._preface_left:
            # The client preface goes to h2 on its own, so it rejects non-HTTP/2 bytes early.
            take = min(self._preface_left, len(view))
            head, view = bytes(view[:take]), view[take:]
            self._preface_left -= take
            if self._preface_left or not view:
                return head
            frames = self._complete_frames(view)
            return head + frames  # once per connection: the copy does not matter
        inbox = self._inbox
        if inbox:
            inbox += view
            if len(inbox) < self._inbox_need:
                return b""  # the pending frame is still incomplete: nothing to parse
            source = memoryview(inbox)
        else:
            source = view
        size = len(source)
        pos = 0
        limit = self._h2.max_inbound_frame_size
        length = 0
        while pos + 9 <= size:
            length = int.from_bytes(source[pos : pos + 3], "big")
            if length > limit:
                self._h2.close_connection(h2.errors.ErrorCodes.FRAME_SIZE_ERROR)
                self._closed = True
                self._collect_output()
                raise RemoteProtocolError(
                    f"peer sent a {length}-byte frame, above our limit of {limit}", FRAME_SIZE_ERROR
                )
            if pos + 9 + length > size:
                break
            pos += 9 + length
        self._inbox_need = (pos + 9 + length if pos + 9 <= size else pos + 9) - pos
        if source is view:
            inbox += view[pos:]  # an incomplete frame waits in the inbox
            return view[:pos] if pos else b""
        self._parsed_from_inbox = pos
        return source[:pos] if pos else b""

    def _drop_parsed(self, complete: bytes | memoryview) -> None:
        """After h2 parsed a view of the inbox: remove those bytes from it."""
        pos, self._parsed_from_inbox = self._parsed_from_inbox, 0
        if not pos:
            return
        if isinstance(complete, memoryview):
            complete.release()
        try:
            del self._inbox[:pos]
        except BufferError:  # a view of it is still alive somewhere: start a new inbox instead
            self._inbox = bytearray(self._inbox[pos:])

    def _collect_output(self) -> None:
        # Small control frames h2 produced (ACKs, WINDOW_UPDATE, RST) move to our queue, so
        # `wants_write` is exact and the writer is not woken for nothing.
        out = self._h2.pieces_to_send()
        if out:
            self._prefix += out
            self._wants_write = True

    def _translate(self, event: h2.events.Event, out: list[ev.Event]) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._on_data(event, out)
        elif isinstance(event, h2.events.RequestReceived):
            self._on_request(event, out)
        elif isinstance(event, h2.events.ResponseReceived):
            assert event.stream_id is not None and event.headers is not None
            rec = self._streams.get(event.stream_id)
            if rec is not None:
                headers = _decode(event.headers)
                pseudo, rest = _pseudo(headers)
                status = pseudo.get(":status", "")
                if not (len(status) == 3 and status.isdigit()):  # h2 does not check it
                    self._reset(event.stream_id, rec, PROTOCOL_ERROR)
                    out.append(ev.StreamReset(event.stream_id, PROTOCOL_ERROR, remote=False))
                    return
                out.append(ev.ResponseReceived(event.stream_id, int(status), rest))
        elif isinstance(event, h2.events.StreamEnded):
            assert event.stream_id is not None
            rec = self._streams.get(event.stream_id)
            if rec is not None and not rec.reset:
                rec.remote_ended = True
                out.append(ev.StreamEnded(event.stream_id))
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            rec = self._streams.get(event.stream_id)
            if rec is not None and not rec.reset:
                self._teardown_ack(event.stream_id, rec)
                rec.reset = True
                out.append(ev.StreamReset(event.stream_id, int(event.error_code or 0), remote=True))
        elif isinstance(event, h2.events.WindowUpdated):
            out.append(ev.WindowOpened(event.stream_id or 0))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            first = not self._peer_settings_seen
            self._peer_settings_seen = True
            out.append(ev.WindowOpened(0))
            if first:
                out.append(ev.PeerSettingsReceived(bool(self._h2.remote_settings.enable_connect_protocol)))
        elif isinstance(event, h2.events.PingAckReceived):
            assert event.ping_data is not None
            out.append(ev.PingAcked(bytes(event.ping_data)))
        # Others (PingReceived: h2 answers it; SettingsAcknowledged, PriorityUpdated, 1xx, trailers,
        # unknown frames) change nothing a tunnel cares about.

    def _on_data(self, event: h2.events.DataReceived, out: list[ev.Event]) -> None:
        assert event.stream_id is not None and event.data is not None
        sid = event.stream_id
        flow = event.flow_controlled_length or 0
        rec = self._streams.get(sid)
        if rec is None or rec.reset:
            # Nobody will consume it: hand the window straight back.
            if flow:
                self._h2.acknowledge_received_data(flow, sid)
            return
        data = bytes(event.data)
        if flow > len(data):
            # Padding is ours to acknowledge, not the app's.
            self._h2.acknowledge_received_data(flow - len(data), sid)
        if data:
            rec.unacked += len(data)
            out.append(ev.DataReceived(sid, data))

    def _on_request(self, event: h2.events.RequestReceived, out: list[ev.Event]) -> None:
        assert event.stream_id is not None and event.headers is not None
        sid = event.stream_id
        end = event.stream_ended is not None
        if self._goaway_sent is not None and sid > self._goaway_sent:
            self._h2.reset_stream(sid, REFUSED_STREAM)  # arrived after our GOAWAY: not processed
            return
        headers = _decode(event.headers)
        pseudo, rest = _pseudo(headers)
        method = pseudo.get(":method", "")
        authority = pseudo.get(":authority", "")
        self._streams[sid] = _Stream()
        protocol = pseudo.get(":protocol")
        if method == "CONNECT" and protocol is not None:
            self._on_extended_connect(sid, protocol, authority, pseudo.get(":path"), rest, end, out)
        elif method == "CONNECT":
            target = parse_connect_target(authority)
            if target is None:
                reason = f"CONNECT authority {authority!r} is not ip:port or hostname:port"
                stream = self._h2.streams.get(sid)
                if stream is not None and not stream.closed:  # a RST later in the same read closed it
                    self.refuse(sid, 400, reason)
                self.release_stream(sid)
                out.append(ev.RequestRejected(sid, 400, reason))
                return
            out.append(ev.TunnelRequested(sid, authority, target, rest, end))
        else:
            out.append(ev.RequestReceived(sid, method, authority, pseudo.get(":path"), rest, end))

    def _on_extended_connect(
        self,
        sid: int,
        protocol: str,
        authority: str,
        path: str | None,
        headers: ev.Headers,
        end: bool,
        out: list[ev.Event],
    ) -> None:
        if protocol != CONNECT_UDP:
            self._reject(
                sid, 501, f"extended CONNECT protocol {protocol!r} is not supported (only connect-udp)", out
            )
            return
        target = parse_udp_path(path)
        if target is None:
            reason = (
                f"connect-udp :path {path!r} is not {UDP_PATH_PREFIX}<ip>/<port>/ (an IP literal and a port)"
            )
            self._reject(sid, 400, reason, out)
            return
        out.append(ev.UdpTunnelRequested(sid, authority, path or "", target[0], target[1], headers, end))

    def _reject(self, sid: int, status: int, reason: str, out: list[ev.Event]) -> None:
        stream = self._h2.streams.get(sid)
        if stream is not None and not stream.closed:  # a RST later in the same read closed it
            self.refuse(sid, status, reason)
        self.release_stream(sid)
        out.append(ev.RequestRejected(sid, status, reason))

    def _on_goaway(self, frame: GoAwayFrame, out: list[ev.Event]) -> None:
        last = int(frame.last_stream_id)
        if self._goaway_received is not None:
            last = min(last, self._goaway_received)  # a peer may only lower it
        self._goaway_received = last
        code = int(frame.error_code)
        data = bytes(frame.additional_data or b"")
        for sid, rec in list(self._streams.items()):
            if rec.done:
                continue
            ours = (sid % 2 == 1) == (self.role is Role.CLIENT)
            if code != NO_ERROR or (ours and sid > last):
                reason = code if code != NO_ERROR else REFUSED_STREAM
                self._teardown_ack(sid, rec)
                rec.reset = True
                out.append(ev.StreamReset(sid, reason, remote=True))
        if code != NO_ERROR:
            self._closed = True
            out.append(ev.ConnectionTerminated(code, last, data))
        else:
            out.append(ev.GoAwayReceived(last, code, data))
