"""The plain-DATA paths (h2_plumbing.H2Connection.send_plain_data / receive_plain_data) change nothing
but the cost: fed the same bytes, a connection with them and one that sends every frame through h2
give the same events, the same bytes out and the same errors, including for DATA that h2 must refuse
(closed streams, exhausted windows, padding, END_STREAM, DATA inside a header block)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fuzz.targets import _FRAME_SPECS, _cuts, _react, _serialize
from meshd.hbone import events as ev
from meshd.hbone.connection import HboneConnection, HboneSettings, Role
from meshd.hbone.errors import RemoteProtocolError
from meshd.hbone.h2_plumbing import H2Connection

# Frames a peer sends after a valid start: mostly plain DATA on the open tunnels 1 and 3, some with
# flags or on a stream that is not open, the rest anything at all.
_SIZES = st.integers(0, 16_000).map(lambda n: b"d" * n)
_PLAIN_DATA = st.tuples(st.just("data"), st.sampled_from([1, 1, 3]), _SIZES, st.just(set()))
_DATA_ON_TUNNELS = st.tuples(
    st.just("data"),
    st.sampled_from([1, 3, 5]),
    _SIZES,
    st.sets(st.sampled_from(["END_STREAM", "PADDED"]), max_size=1),
)
# Small windows, so a few frames exhaust them and acknowledgements reopen them (WINDOW_UPDATE).
SMALL_WINDOWS = HboneSettings(stream_window=65_535, connection_window=100_000)
# Trailers without END_HEADERS: a header block the peer leaves open, so the DATA after it is an error.
_OPEN_HEADER_BLOCK = st.tuples(
    st.just("headers"), st.sampled_from([1, 3]), st.just([("x-t", "1")]), st.just(set())
)
_SPECS = st.builds(
    lambda plain, tail: plain + tail,
    st.lists(_PLAIN_DATA, max_size=16),
    st.lists(st.one_of(_PLAIN_DATA, _DATA_ON_TUNNELS, _OPEN_HEADER_BLOCK, _FRAME_SPECS), max_size=6),
)


def _transcript(role: Role, specs: list[Any], cuts: list[int] | None, answer_3: bool = True) -> list[object]:
    """What the connection under test says and sends, chunk by chunk, after a valid start (cuts None:
    a chunk per frame, so the app acknowledges between frames and windows reopen)."""
    peer = HboneConnection(Role.SERVER if role is Role.CLIENT else Role.CLIENT, SMALL_WINDOWS)
    conn = HboneConnection(role, SMALL_WINDOWS)
    if role is Role.CLIENT:
        conn.open_tunnel("10.0.0.1:80")
        conn.open_tunnel("10.0.0.2:80")
        peer.receive_data(conn.data_to_send())
        for sid in (1, 3) if answer_3 else (1,):  # else DATA on 3 comes before its headers
            peer.accept(sid)
    else:
        peer.open_tunnel("10.0.0.1:80")
        peer.open_tunnel("10.0.0.2:80")
    start = peer.data_to_send()
    said: list[object] = []
    if cuts is None:  # HPACK state depends on earlier frames only: a prefix serializes as a prefix
        cuts = [len(_serialize(specs[:n])) for n in range(1, len(specs))]
    for chunk in [start, *_cuts(_serialize(specs), cuts)]:
        try:
            events = conn.receive_data(chunk)
        except RemoteProtocolError as exc:
            said.append(("error", str(exc), conn.data_to_send()))
            return said
        said.append([repr(e) for e in events])
        if not conn.closed:
            _react(conn, events)
            for e in events:
                if isinstance(e, ev.DataReceived) and conn.can_send(e.stream_id):
                    size = min(len(e.data), conn.send_window(e.stream_id))
                    conn.send_data(e.stream_id, e.data[:size])  # echo: the send path too
        said.append(conn.data_to_send())
    return said


@contextlib.contextmanager
def through_h2_only() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(H2Connection, "send_plain_data", lambda self, *a: False)
        patch.setattr(H2Connection, "receive_plain_data", lambda self, *a: False)
        yield


_WINDOW_FULL = [("data", 1, b"d" * 12_000, set())] * 8  # more than a 65,535-byte window, echoed
_CONNECTION_FULL = [("data", 1, b"d" * 12_000, set())] * 5 + [("data", 3, b"d" * 12_000, set())] * 5
_DATA_IN_HEADER_BLOCK = [
    ("data", 1, b"d", set()),
    ("headers", 1, [("x-t", "1")], set()),
    ("data", 1, b"d", set()),
]


@settings(max_examples=400, deadline=None)
@example(role=Role.SERVER, specs=_WINDOW_FULL, cuts=None, answer_3=True)
@example(role=Role.CLIENT, specs=_WINDOW_FULL, cuts=None, answer_3=True)
@example(role=Role.CLIENT, specs=_CONNECTION_FULL, cuts=None, answer_3=True)  # 3 is refused by a server
@example(role=Role.SERVER, specs=_DATA_IN_HEADER_BLOCK, cuts=None, answer_3=True)
@example(role=Role.CLIENT, specs=[("data", 3, b"d", set())], cuts=None, answer_3=False)
@given(
    role=st.sampled_from([Role.SERVER, Role.CLIENT]),
    specs=_SPECS,
    cuts=st.none() | st.lists(st.integers(0, 20_000), max_size=5),
    answer_3=st.booleans(),
)
def test_plain_data_paths_behave_as_h2(
    role: Role, specs: list[Any], cuts: list[int] | None, answer_3: bool
) -> None:
    fast = _transcript(role, specs, cuts, answer_3)
    with through_h2_only():
        slow = _transcript(role, specs, cuts, answer_3)
    assert fast == slow


def test_a_tunnels_data_takes_the_plain_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The equivalence above is not vacuous: ordinary tunnel bytes do go through both plain paths."""
    calls = {"send": 0, "receive": 0}
    send, receive = H2Connection.send_plain_data, H2Connection.receive_plain_data

    def counted_send(self: H2Connection, *a: Any) -> bool:
        calls["send"] += 1
        return send(self, *a)

    def counted_receive(self: H2Connection, *a: Any) -> bool:
        calls["receive"] += 1
        return receive(self, *a)

    monkeypatch.setattr(H2Connection, "send_plain_data", counted_send)
    monkeypatch.setattr(H2Connection, "receive_plain_data", counted_receive)
    client, server = HboneConnection(Role.CLIENT), HboneConnection(Role.SERVER)
    sid = client.open_tunnel("10.0.0.1:80")
    server.receive_data(client.data_to_send())
    server.accept(sid)
    client.receive_data(server.data_to_send())
    client.send_data(sid, b"x" * 100)
    client.send_data(sid, b"y" * 10_000)
    events = server.receive_data(client.data_to_send())
    assert [e for e in events if isinstance(e, ev.DataReceived)] == [
        ev.DataReceived(sid, b"x" * 100),
        ev.DataReceived(sid, b"y" * 10_000),
    ]
    assert calls == {"send": 2, "receive": 2}
