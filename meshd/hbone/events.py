"""Events produced by `HboneConnection.receive_data`: the boundary between the sans-I/O core and I/O.

Must never know: trio, sockets, TLS, h2's own event classes (they stay inside connection.py).
Every event is a frozen, slotted dataclass; headers are tuples of (name, value) `str` pairs decoded
as latin-1 (lossless for any bytes a peer may send).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshd.hbone.target import ConnectTarget

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of all HBONE events."""


@dataclass(frozen=True, slots=True)
class RequestReceived(Event):
    """Server side: a request that is not a well-formed CONNECT (e.g. the catalog GET)."""

    stream_id: int
    method: str
    authority: str
    path: str | None
    headers: Headers
    end_stream: bool


@dataclass(frozen=True, slots=True)
class TunnelRequested(Event):
    """Server side: a CONNECT whose :authority is an IP literal and port (`10.0.0.1:80`, `[::1]:80`:
    a `SocketTarget`) or a service hostname and port (`echo.default.svc.cluster.local:7000`: a
    `HostnameTarget`, as ztunnel's double HBONE sends). Which targets it serves is the role's choice."""

    stream_id: int
    authority: str
    target: ConnectTarget
    headers: Headers
    end_stream: bool


@dataclass(frozen=True, slots=True)
class UdpTunnelRequested(Event):
    """Server side: an extended CONNECT with `:protocol connect-udp` (RFC 9298) whose `:path` names an
    IP target and port (`/.well-known/masque/udp/10.0.0.1/53/`). Its DATA carries capsules."""

    stream_id: int
    authority: str
    path: str
    host: str
    port: int
    headers: Headers
    end_stream: bool


@dataclass(frozen=True, slots=True)
class RequestRejected(Event):
    """Server side: the core answered a malformed request itself (400) and reset the stream."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class ResponseReceived(Event):
    """Client side: the final response headers of one of our streams."""

    stream_id: int
    status: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Payload for a stream. Call `acknowledge(stream_id, len(data))` once it has been consumed:
    that, and only that, reopens the peer's window (back-pressure)."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer sent END_STREAM: its half of the tunnel is closed (TCP FIN)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """The stream was reset. `remote` tells who did it; unacknowledged data was already returned
    to the connection window."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True, slots=True)
class WindowOpened(Event):
    """More may be sent on `stream_id`; 0 means the connection (every stream may have room)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    """The peer will accept no streams above `last_stream_id`; those of ours were reported reset.
    Streams at or below it carry on (graceful drain)."""

    last_stream_id: int
    error_code: int
    additional_data: bytes


@dataclass(frozen=True, slots=True)
class ConnectionTerminated(Event):
    """The peer ended the connection with an error (GOAWAY with a code other than NO_ERROR).
    Every stream is gone; only `data_to_send()` remains to be flushed."""

    error_code: int
    last_stream_id: int
    additional_data: bytes


@dataclass(frozen=True, slots=True)
class PeerSettingsReceived(Event):
    """The peer's first SETTINGS arrived (also reported as `WindowOpened(0)`); whether it allows
    extended CONNECT (RFC 8441), which a connect-udp stream needs."""

    enable_connect_protocol: bool


@dataclass(frozen=True, slots=True)
class PingAcked(Event):
    """The peer answered our PING with this payload."""

    payload: bytes
