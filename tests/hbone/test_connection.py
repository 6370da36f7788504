"""The sans-I/O HBONE core: a client and a server core joined in memory (h11's ConnectionPair style)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import h2.connection
import h2.settings
import hyperframe.frame
import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.hbone import events as ev
from meshd.hbone.connection import (
    CANCEL,
    FRAME_SIZE_ERROR,
    INTERNAL_ERROR,
    NO_ERROR,
    REFUSED_STREAM,
    HboneConnection,
    HboneSettings,
    Role,
    parse_authority,
)
from meshd.hbone.errors import LocalProtocolError, RemoteProtocolError
from meshd.hbone.h2_plumbing import MAX_CLOSED_STREAMS
from meshd.hbone.target import SocketTarget

MiB = 1024 * 1024
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Pair:
    """Client and server cores with a perfect wire between them."""

    def __init__(
        self, client_settings: HboneSettings | None = None, server_settings: HboneSettings | None = None
    ):
        self.client = HboneConnection(Role.CLIENT, client_settings)
        self.server = HboneConnection(Role.SERVER, server_settings)
        self.pump()

    def pump(self) -> tuple[list[ev.Event], list[ev.Event]]:
        """Deliver everything both ways until quiet; returns (client events, server events)."""
        at_client: list[ev.Event] = []
        at_server: list[ev.Event] = []
        while True:
            to_server = self.client.data_to_send()
            to_client = self.server.data_to_send()
            if not to_server and not to_client:
                return at_client, at_server
            if to_server:
                at_server += self.server.receive_data(to_server)
            if to_client:
                at_client += self.client.receive_data(to_client)

    def tunnel(self, authority: str = "10.0.0.1:80") -> int:
        sid = self.client.open_tunnel(authority)
        _, at_server = self.pump()
        assert isinstance(at_server[-1], ev.TunnelRequested)
        self.server.accept(sid)
        at_client, _ = self.pump()
        assert at_client == [ev.ResponseReceived(sid, 200, ())]
        return sid


def data_of(events: list[ev.Event], stream_id: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, ev.DataReceived) and e.stream_id == stream_id)


# ---- settings and set-up ----------------------------------------------------------------------------


def test_settings_reject_equal_windows() -> None:
    with pytest.raises(ValueError, match="deadlock"):
        HboneSettings(stream_window=4 * MiB, connection_window=4 * MiB)
    with pytest.raises(ValueError):
        HboneSettings(max_frame_size=1000)


def test_ztunnel_settings_are_advertised() -> None:
    pair = Pair()
    remote = pair.client._h2.remote_settings  # what the server told the client
    assert remote.initial_window_size == 4 * MiB
    assert remote.max_frame_size == 1 * MiB
    assert remote.max_concurrent_streams == 100
    # The connection window was widened to 16 MiB with a WINDOW_UPDATE.
    assert pair.client._h2.outbound_flow_control_window == 16 * MiB
    assert pair.server._h2.outbound_flow_control_window == 16 * MiB


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:80", ("10.0.0.1", 80)),
        ("[fd00::1]:8080", ("fd00::1", 8080)),
        ("10.0.0.1", None),
        ("example.com:80", None),
        ("10.0.0.1:0", None),
        ("10.0.0.1:99999", None),
        (" 10.0.0.1:80", None),
        ("fd00::1:80", None),
        ("", None),
    ],
)
def test_parse_authority(text: str, expected: tuple[str, int] | None) -> None:
    assert parse_authority(text) == expected


# ---- requests and answers ---------------------------------------------------------------------------


def test_connect_carries_hbone_headers() -> None:
    pair = Pair()
    sid = pair.client.open_tunnel(
        "10.0.0.1:80",
        forwarded_for=("192.168.1.5", 40000),
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        baggage="k8s.namespace.name=default",
        headers=[("x-extra", "1")],
    )
    _, at_server = pair.pump()
    assert at_server == [
        ev.TunnelRequested(
            sid,
            "10.0.0.1:80",
            SocketTarget("10.0.0.1", 80),
            (
                ("forwarded", 'for="192.168.1.5:40000"'),
                ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                ("baggage", "k8s.namespace.name=default"),
                ("x-extra", "1"),
            ),
            False,
        )
    ]


def test_forwarded_ipv6_in_brackets() -> None:
    pair = Pair()
    pair.client.open_tunnel("[fd00::2]:80", forwarded_for=("fd00::1", 5))
    _, at_server = pair.pump()
    assert isinstance(at_server[0], ev.TunnelRequested)
    assert at_server[0].headers == (("forwarded", 'for="[fd00::1]:5"'),)
    assert at_server[0].target == SocketTarget("fd00::2", 80)


@pytest.mark.parametrize(
    ("status", "reason"),
    [(400, "not CONNECT"), (401, "denied by policy"), (503, "no such upstream"), (503, "")],
)
def test_refusals_reach_the_client(status: int, reason: str) -> None:
    pair = Pair()
    sid = pair.client.open_tunnel("10.0.0.1:80")
    pair.pump()
    pair.server.refuse(sid, status, reason)
    at_client, _ = pair.pump()
    assert at_client[0] == ev.ResponseReceived(
        sid, status, (("content-type", "text/plain; charset=utf-8"),) if reason else ()
    )
    assert data_of(at_client, sid) == reason.encode()
    assert ev.StreamEnded(sid) in at_client
    # The client was still "sending", so the server also said stop (RST NO_ERROR, RFC 9113 8.1).
    assert ev.StreamReset(sid, NO_ERROR, remote=True) in at_client
    pair.client.release_stream(sid)
    pair.server.release_stream(sid)
    assert pair.client.stream_count == pair.server.stream_count == 0


def test_accept_opens_both_directions_and_half_close() -> None:
    pair = Pair()
    sid = pair.tunnel()
    pair.client.send_data(sid, b"ping")
    pair.client.end_stream(sid)
    _, at_server = pair.pump()
    assert at_server == [ev.DataReceived(sid, b"ping"), ev.StreamEnded(sid)]
    # Half-closed: the server can still answer.
    pair.server.send_data(sid, b"pong", end_stream=True)
    at_client, _ = pair.pump()
    assert at_client == [ev.DataReceived(sid, b"pong"), ev.StreamEnded(sid)]
    assert pair.client.active_stream_count == 0


def test_bad_authority_is_answered_400_by_the_core() -> None:
    server = HboneConnection(Role.SERVER)
    raw = h2.connection.H2Connection()  # our client refuses to send it, so use a raw h2 client
    raw.initiate_connection()
    raw.send_headers(1, [(":method", "CONNECT"), (":authority", "exa_mple.com:80")])
    at_server = server.receive_data(raw.data_to_send())
    assert at_server[-1] == ev.RequestRejected(
        1, 400, "CONNECT authority 'exa_mple.com:80' is not ip:port or hostname:port"
    )
    assert not any(isinstance(e, ev.TunnelRequested) for e in at_server)
    got = raw.receive_data(server.data_to_send())
    responses = [e for e in got if isinstance(e, h2.events.ResponseReceived)]
    assert responses and dict(responses[0].headers)[b":status"] == b"400"
    assert server.stream_count == 0


def test_get_with_body_response() -> None:
    pair = Pair()
    sid = pair.client.send_request("GET", "127.0.0.1:15008", "/meshd/v1/catalog")
    _, at_server = pair.pump()
    assert at_server == [
        ev.RequestReceived(sid, "GET", "127.0.0.1:15008", "/meshd/v1/catalog", (), True),
        ev.StreamEnded(sid),
    ]
    pair.server.send_response(sid, 200, [("content-type", "application/json")])
    pair.server.send_data(sid, b'{"services": []}', end_stream=True)
    at_client, _ = pair.pump()
    assert at_client == [
        ev.ResponseReceived(sid, 200, (("content-type", "application/json"),)),
        ev.DataReceived(sid, b'{"services": []}'),
        ev.StreamEnded(sid),
    ]


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (lambda p, sid: p.client.open_tunnel("not-an-address"), "not ip:port"),
        (lambda p, sid: p.client.send_request("CONNECT", "1.2.3.4:5", "/"), "open_tunnel"),
        (lambda p, sid: p.server.send_request("GET", "1.2.3.4:5", "/"), "only the client"),
        (lambda p, sid: p.client.send_response(sid, 200), "only the server"),
        (lambda p, sid: p.server.send_response(sid, 42), "not an HTTP status"),
        (lambda p, sid: p.client.send_data(sid, b"x" * (4 * MiB + 1)), "exceed the send window"),
        (lambda p, sid: p.client.send_data(99, b"x"), "unknown"),
        (lambda p, sid: p.client.acknowledge(sid, -1), "negative"),
    ],
)
def test_local_misuse_raises_local_protocol_error(
    action: Callable[[Pair, int], object], message: str
) -> None:
    pair = Pair()
    sid = pair.tunnel()
    with pytest.raises(LocalProtocolError, match=message):
        action(pair, sid)


def test_send_after_end_and_after_reset_are_local_errors() -> None:
    pair = Pair()
    a, b = pair.tunnel(), pair.tunnel()
    pair.client.end_stream(a)
    with pytest.raises(LocalProtocolError, match="END_STREAM"):
        pair.client.send_data(a, b"x")
    pair.client.reset_stream(b)
    with pytest.raises(LocalProtocolError, match="reset"):
        pair.client.send_data(b, b"x")
    assert not pair.client.can_send(a) and not pair.client.can_send(b)


# ---- flow control and back-pressure ------------------------------------------------------------------


def test_unacknowledged_data_stops_the_sender_at_the_stream_window() -> None:
    pair = Pair()
    sid = pair.tunnel()
    assert pair.server.send_window(sid) == 4 * MiB
    pair.server.send_data(sid, b"x" * (4 * MiB))  # split into 1 MiB frames by the core
    at_client, _ = pair.pump()
    assert len(data_of(at_client, sid)) == 4 * MiB
    assert pair.server.send_window(sid) == 0  # nothing acknowledged: the sender is stopped
    pair.client.acknowledge(sid, 1024)
    pair.pump()
    assert pair.server.send_window(sid) == 0  # h2 batches updates until half the window is consumed
    pair.client.acknowledge(sid, 2 * MiB)
    at_server = pair.pump()[1]
    assert ev.WindowOpened(sid) in at_server
    assert pair.server.send_window(sid) == 2 * MiB + 1024


def four_full_streams() -> tuple[Pair, list[int]]:
    """Five tunnels; the server has sent a full 4 MiB stream window on each of the first four, unread."""
    pair = Pair()
    sids = [pair.tunnel() for _ in range(5)]
    for sid in sids[:4]:
        pair.server.send_data(sid, b"y" * (4 * MiB))
    pair.pump()
    return pair, sids


def test_connection_window_is_larger_than_one_stream_and_shared() -> None:
    pair, sids = four_full_streams()
    # Four full streams use the 16 MiB connection window: the fifth cannot send.
    assert pair.server.send_window(sids[4]) == 0


def test_releasing_a_stream_returns_its_unread_bytes_to_the_connection() -> None:
    pair, sids = four_full_streams()
    assert pair.server.send_window(sids[4]) == 0
    pair.client.release_stream(sids[0])  # never read: 4 MiB must still be acknowledged
    _at_client, at_server = pair.pump()
    assert ev.StreamReset(sids[0], CANCEL, remote=True) in at_server
    assert pair.server.send_window(sids[4]) == 4 * MiB


def test_remote_reset_returns_unread_bytes_too() -> None:
    pair, sids = four_full_streams()
    pair.server.reset_stream(sids[1], CANCEL)
    at_client, _ = pair.pump()
    assert ev.StreamReset(sids[1], CANCEL, remote=True) in at_client
    assert pair.server.send_window(sids[4]) == 4 * MiB
    # Acknowledging after the teardown is a no-op, not a double credit.
    pair.client.acknowledge(sids[1], 4 * MiB)
    pair.pump()
    assert pair.client._h2.inbound_flow_control_window <= 16 * MiB


def test_padding_is_acknowledged_by_the_core() -> None:
    pair = Pair()
    sid = pair.tunnel()
    frame = DataFrame(sid, data=b"abc", pad_length=200, flags=["PADDED"])
    at_client = pair.client.receive_data(frame.serialize())
    assert at_client == [ev.DataReceived(sid, b"abc")]
    pair.client.acknowledge(sid, 3)
    manager = pair.client._h2._inbound_flow_control_window_manager  # the exact accounting invariant
    assert manager.current_window_size + manager._bytes_processed == manager.max_window_size


# ---- GOAWAY, PING, termination -----------------------------------------------------------------------


def test_graceful_goaway_lets_in_flight_streams_finish() -> None:
    pair = Pair()
    sid = pair.tunnel()
    pair.server.goaway()
    at_client, _ = pair.pump()
    assert at_client == [ev.GoAwayReceived(sid, NO_ERROR, b"")]
    assert pair.client.available_streams == 0
    with pytest.raises(LocalProtocolError, match="GOAWAY"):
        pair.client.open_tunnel("10.0.0.1:80")
    # The in-flight stream still works both ways (h2 alone would refuse every frame now).
    pair.client.send_data(sid, b"late", end_stream=True)
    pair.server.send_data(sid, b"reply", end_stream=True)
    at_client, at_server = pair.pump()
    assert data_of(at_server, sid) == b"late" and data_of(at_client, sid) == b"reply"


def test_stream_racing_the_goaway_is_refused() -> None:
    pair = Pair()
    first = pair.tunnel()
    pair.server.goaway()  # not delivered yet
    late = pair.client.open_tunnel("10.0.0.1:80")
    at_client, at_server = pair.pump()
    assert not any(isinstance(e, ev.TunnelRequested) for e in at_server)
    assert ev.StreamReset(late, REFUSED_STREAM, remote=True) in at_client
    assert ev.GoAwayReceived(first, NO_ERROR, b"") in at_client


def test_error_goaway_terminates_every_stream() -> None:
    pair = Pair()
    sid = pair.tunnel()
    pair.server.close(INTERNAL_ERROR, b"bye")
    at_client, _ = pair.pump()
    assert at_client == [
        ev.StreamReset(sid, INTERNAL_ERROR, remote=True),
        ev.ConnectionTerminated(INTERNAL_ERROR, sid, b"bye"),
    ]
    assert pair.client.closed and pair.server.closed


def test_ping_is_acknowledged() -> None:
    pair = Pair()
    payload = pair.client.ping()
    at_client, _ = pair.pump()
    assert at_client == [ev.PingAcked(payload)]
    assert pair.client.ping() != payload


def test_data_frames_are_never_hex_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """h2 calls repr(frame) for every received frame; hyperframe's repr hex-encodes DATA payloads."""

    def boom(data: object) -> str:
        raise AssertionError("DATA payload was formatted on the hot path")

    pair = Pair()
    sid = pair.tunnel()
    monkeypatch.setattr(hyperframe.frame, "_raw_data_repr", boom)
    pair.server.send_data(sid, b"z" * 100_000)
    at_client, _ = pair.pump()
    assert len(data_of(at_client, sid)) == 100_000


# ---- malformed input from the peer --------------------------------------------------------------------


def _server_after_preface() -> HboneConnection:
    server = HboneConnection(Role.SERVER)
    server.receive_data(PREFACE + SettingsFrame(0).serialize())
    server.data_to_send()
    return server


def _headers_frame(stream_id: int, block: bytes, flags: tuple[str, ...] = ("END_HEADERS",)) -> Frame:
    return HeadersFrame(stream_id, data=block, flags=flags)


def _oversized_data_header() -> bytes:
    return (2 * MiB).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"


MALFORMED: list[tuple[str, Callable[[], bytes]]] = [
    ("data on stream 0", lambda: b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"),
    ("data on an idle stream", lambda: DataFrame(7, data=b"x").serialize()),
    ("garbage header block", lambda: _headers_frame(1, b"\xff\xff\xff\xff").serialize()),
    ("continuation without headers", lambda: ContinuationFrame(1, data=b"").serialize()),
    (
        "headers interrupted by another frame",
        lambda: (
            _headers_frame(1, Encoder().encode([(":method", "GET")]), ()).serialize()
            + PingFrame(0, opaque_data=b"12345678").serialize()
        ),
    ),
    ("window update of zero", lambda: WindowUpdateFrame(0, window_increment=0).serialize()),
    ("settings window above 2^31-1", lambda: b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x04\x80\x00\x00\x00"),
    ("ping of the wrong size", lambda: b"\x00\x00\x03\x06\x00\x00\x00\x00\x00abc"),
    ("goaway on a stream", lambda: b"\x00\x00\x08\x07\x00\x00\x00\x00\x01" + b"\x00" * 8),
    ("frame above max frame size", _oversized_data_header),
    (
        "even stream id from a client",
        lambda: _headers_frame(2, Encoder().encode([(":method", "GET")])).serialize(),
    ),
    (
        "connect with a path",
        lambda: _headers_frame(
            1,
            Encoder().encode([(":method", "CONNECT"), (":authority", "1.2.3.4:5"), (":path", "/")]),
        ).serialize(),
    ),
]


@pytest.mark.parametrize(("name", "make"), MALFORMED, ids=[name for name, _ in MALFORMED])
def test_malformed_frames_are_remote_protocol_errors(name: str, make: Callable[[], bytes]) -> None:
    server = _server_after_preface()
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(make())
    assert info.value.error_code != NO_ERROR
    assert server.closed
    goaway = GoAwayFrame(0)
    out = server.data_to_send()
    assert out[3] == goaway.type, "the peer is told why with a GOAWAY"
    assert server.receive_data(b"more") == []  # finished: further input is ignored


def test_oversized_frame_is_refused_from_its_header() -> None:
    server = _server_after_preface()
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(_oversized_data_header())  # no body needed to decide
    assert info.value.error_code == FRAME_SIZE_ERROR


@pytest.mark.parametrize(
    "garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00", b"PRI * HTTP/1.1"]
)
def test_non_http2_bytes_at_the_server(garbage: bytes) -> None:
    server = HboneConnection(Role.SERVER)
    with pytest.raises(RemoteProtocolError):
        server.receive_data(garbage)


# ---- Hypothesis -----------------------------------------------------------------------------------------


def _conversation() -> tuple[bytes, list[ev.Event]]:
    """The client's bytes for a small conversation, and the events the server makes of them whole."""
    client = HboneConnection(Role.CLIENT)
    server = HboneConnection(Role.SERVER)
    server.data_to_send()
    sid = client.open_tunnel("10.1.2.3:443", forwarded_for=("10.0.0.9", 1234))
    client.send_data(sid, b"a" * 60_000)  # several 16 KiB frames (no server SETTINGS yet)
    client.ping()
    other = client.send_request("GET", "10.1.2.3:15008", "/meshd/v1/catalog")
    client.send_data(sid, b"b" * 10, end_stream=True)
    client.reset_stream(other)
    wire = client.data_to_send()
    return wire, server.receive_data(wire)


WIRE, WHOLE_EVENTS = _conversation()


def _merge_data(events: list[ev.Event]) -> list[ev.Event]:
    merged: list[ev.Event] = []
    for e in events:
        if isinstance(e, ev.DataReceived) and merged and isinstance(merged[-1], ev.DataReceived):
            last = merged[-1]
            if last.stream_id == e.stream_id:
                merged[-1] = ev.DataReceived(e.stream_id, last.data + e.data)
                continue
        merged.append(e)
    return merged


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(WIRE)), max_size=30))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    server = HboneConnection(Role.SERVER)
    events: list[ev.Event] = []
    bounds = [0, *sorted(cuts), len(WIRE)]
    for a, b in itertools.pairwise(bounds):
        events += server.receive_data(WIRE[a:b])
    assert _merge_data(events) == _merge_data(WHOLE_EVENTS)


@given(prefix_len=st.integers(min_value=0, max_value=len(WIRE)), noise=st.binary(min_size=1, max_size=200))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_random_bytes_never_crash(prefix_len: int, noise: bytes) -> None:
    server = HboneConnection(Role.SERVER)
    try:
        server.receive_data(WIRE[:prefix_len] + noise)
        server.receive_data(noise)
    except RemoteProtocolError as e:
        assert server.closed and e.error_code >= 0


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["open", "client_send", "server_send", "client_ack", "end", "reset", "release", "ping"]
        ),
        st.integers(min_value=0, max_value=7),
        st.integers(min_value=0, max_value=150_000),
    ),
    max_size=40,
)


@given(ops=OPS)
@settings(max_examples=60, deadline=None)
def test_random_operations_keep_the_window_accounting_exact(ops: list[tuple[str, int, int]]) -> None:
    """Whatever the order of opens, sends, acks, resets and releases, every byte the client received
    is either acknowledged by the app or handed back at teardown: the window never leaks."""
    small = HboneSettings(stream_window=65_535, connection_window=200_000, max_frame_size=16_384)
    pair = Pair(small, small)
    opened: list[int] = []
    for op, pick, size in ops:
        live = [s for s in opened if pair.client.has_stream(s)]
        sid = live[pick % len(live)] if live else None
        try:
            if op == "open" and pair.client.available_streams:
                opened.append(pair.client.open_tunnel("10.0.0.1:80"))
                pair.pump()
                pair.server.accept(opened[-1])
            elif sid is None:
                pass
            elif op == "client_send" and pair.client.can_send(sid):
                pair.client.send_data(sid, b"c" * min(size, pair.client.send_window(sid)))
            elif op == "server_send" and pair.server.can_send(sid):
                pair.server.send_data(sid, b"s" * min(size, pair.server.send_window(sid)))
            elif op == "client_ack":
                pair.client.acknowledge(sid, size)
            elif op == "end" and pair.client.can_send(sid):
                pair.client.end_stream(sid)
            elif op == "reset":
                (pair.client if pick % 2 else pair.server).reset_stream(sid)
            elif op == "release":
                pair.client.release_stream(sid)
                pair.server.release_stream(sid)
            elif op == "ping":
                pair.client.ping()
        except LocalProtocolError:
            pass
        pair.pump()
    for sid in opened:
        pair.client.release_stream(sid)
        pair.server.release_stream(sid)
    pair.pump()
    manager = pair.client._h2._inbound_flow_control_window_manager
    assert manager.current_window_size + manager._bytes_processed == manager.max_window_size


def test_closed_streams_are_remembered_up_to_a_bound() -> None:
    """h2 keeps how each closed stream ended; a long-lived pooled connection must not keep 65,536 of
    them (~6.5 MiB) per connection. Checked on h2's own table: the bound is our setting of it."""
    pair = Pair()
    for _ in range(MAX_CLOSED_STREAMS + 500):
        sid = pair.tunnel()
        pair.client.end_stream(sid)
        pair.server.send_data(sid, b"x", end_stream=True)
        pair.pump()
        pair.client.release_stream(sid)
        pair.server.release_stream(sid)
    for side in (pair.client, pair.server):
        assert len(side._h2._closed_streams) <= MAX_CLOSED_STREAMS
    sid = pair.tunnel()  # and the connection still carries new tunnels
    pair.client.send_data(sid, b"still here")
    _, at_server = pair.pump()
    assert data_of(at_server, sid) == b"still here"
