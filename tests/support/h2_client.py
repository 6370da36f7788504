"""A small HTTP/2 prior-knowledge client (h2 over a plain socket) for waypoint tests: sends several
requests at once on one connection and collects each response, in the order the streams ended."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions


@dataclass
class H2Request:
    path: str
    method: str = "GET"
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


@dataclass
class H2Response:
    status: int = 0  # 0: reset before any response
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    reset: int | None = None  # the RST_STREAM error code, if the stream was reset


def h2_exchange(
    address: tuple[str, int],
    requests: list[H2Request],
    *,
    authority: str = "reviews.default",
    timeout: float = 10.0,
) -> tuple[dict[int, H2Response], list[int]]:
    """Send every request at once; returns ({stream id: response}, stream ids in the order they ended)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    responses: dict[int, H2Response] = {}
    pending: dict[int, memoryview] = {}
    order: list[int] = []
    with socket.create_connection(address, timeout=timeout) as sock:
        for r in requests:
            sid = conn.get_next_available_stream_id()
            head = [(":method", r.method), (":path", r.path), (":scheme", "http"), (":authority", authority)]
            if r.body:
                head.append(("content-length", str(len(r.body))))
            conn.send_headers(sid, head + r.headers, end_stream=not r.body)
            responses[sid] = H2Response()
            if r.body:
                pending[sid] = memoryview(r.body)
        while len(order) < len(responses):
            for sid, rest in list(pending.items()):
                try:
                    while rest and (
                        window := min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    ):
                        piece, rest = rest[:window], rest[window:]
                        conn.send_data(sid, bytes(piece), end_stream=not rest)
                except h2.exceptions.StreamClosedError:
                    rest = memoryview(b"")  # the server answered and reset it: stop sending
                pending[sid] = rest
                if not rest:
                    del pending[sid]
            sock.sendall(conn.data_to_send())
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError(f"server closed the connection; ended so far: {order}")
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    assert ev.stream_id is not None and ev.headers is not None
                    headers = {str(k): str(v) for k, v in ev.headers}
                    responses[ev.stream_id].status = int(headers.pop(":status"))
                    responses[ev.stream_id].headers = headers
                elif isinstance(ev, h2.events.DataReceived):
                    assert ev.stream_id is not None and ev.data is not None
                    responses[ev.stream_id].body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    assert ev.stream_id is not None
                    order.append(ev.stream_id)
                elif isinstance(ev, h2.events.StreamReset):
                    assert ev.stream_id is not None
                    responses[ev.stream_id].reset = int(ev.error_code or 0)
                    if ev.stream_id not in order:
                        order.append(ev.stream_id)
        conn.close_connection()
        sock.sendall(conn.data_to_send())
    return responses, order
