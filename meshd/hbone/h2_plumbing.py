"""One h2 plumbing for every HTTP/2 connection meshd runs: HBONE (both sides) and the waypoint's
HTTP/2 front and upstream sides.

Must never know: trio, sockets, TLS, tunnels, HTTP semantics. What h2 does that meshd works around,
once: `H2Connection` refuses one stream past MAX_CONCURRENT_STREAMS instead of failing the connection,
remembers fewer closed streams and keeps large DATA payloads uncopied; `quiet` keeps hyperframe's
payload-hex-encoding repr off received DATA frames (two frame buffers use it: `QuietFrames`, h2's own
buffering, and `QuietFrameBuffer`, which parses whole frames in place for HBONE); `graceful_goaway`
serializes a GOAWAY by hand, because h2 closes its state machine on sending one and then refuses every
frame of the streams still open. Kept apart from hbone/connection.py because these classes subclass
h2's own (interpreted) classes, while connection.py may be compiled (mypyc).
"""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.errors
import h2.exceptions
import h2.settings
from h2.connection import ConnectionState
from h2.frame_buffer import FrameBuffer
from h2.stream import StreamClosedBy, StreamState
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

REFUSED_STREAM = int(h2.errors.ErrorCodes.REFUSED_STREAM)


def _elided_body_repr() -> str:
    return "<payload not shown>"


def quiet(frame: Frame) -> Frame:
    """A received frame, with a DATA frame's repr kept from hex-encoding its payload (h2 computes
    repr(frame) for every received frame whatever the log level: half the receiving CPU once)."""
    if type(frame) is DataFrame:
        # Instance attribute shadows the method that hex-encodes the payload for repr().
        frame._body_repr = _elided_body_repr  # type: ignore[method-assign]
    return frame


def graceful_goaway(last_stream_id: int, error_code: int = 0, additional_data: bytes = b"") -> bytes:
    """A GOAWAY frame serialized by hand (h2 must not see it: see the module doc)."""
    frame = GoAwayFrame(0)
    frame.last_stream_id = last_stream_id
    frame.error_code = error_code
    frame.additional_data = additional_data
    return bytes(frame.serialize())


def start_connection(
    *,
    client: bool,
    settings: dict[h2.settings.SettingCodes, int],
    connection_window: int,
    frames: FrameBuffer,
) -> H2Connection:
    """An `H2Connection` with our SETTINGS and frame buffer, its preface queued, and its connection
    window widened to `connection_window` (it starts at 65535 whatever SETTINGS say)."""
    conn = H2Connection(config=h2.config.H2Configuration(client_side=client, header_encoding=None))
    conn.incoming_buffer = frames
    if client:
        settings = {**settings, h2.settings.SettingCodes.ENABLE_PUSH: 0}
    # Public h2 attributes, set before the preface goes out (as hypercorn does).
    conn.local_settings = h2.settings.Settings(client=client, initial_values=settings)
    if h2.settings.SettingCodes.MAX_FRAME_SIZE in settings:
        conn.max_inbound_frame_size = settings[h2.settings.SettingCodes.MAX_FRAME_SIZE]
    conn.initiate_connection()
    conn.increment_flow_control_window(connection_window - 65535)
    return conn


class QuietFrames(FrameBuffer):
    """h2's frame buffer (any bytes in, frames out), with received DATA frames `quiet`."""

    def __next__(self) -> Frame:
        return quiet(super().__next__())


# h2 remembers how each closed stream ended (to answer late frames on it) for its last 65,536 closed
# streams, ~100 B each: a pooled connection that carries a short tunnel per client connection reaches
# that in minutes and then holds ~6.5 MiB for its lifetime (found by the soak with --trace-memory).
# A few thousand covers every late frame a live peer sends; DATA on an older stream is still answered
# with RST_STREAM (h2 handles DATA on any closed stream), only a late HEADERS would fail the connection.
MAX_CLOSED_STREAMS = 4096

DATA_BY_REFERENCE = 4096  # DATA payloads this large are not copied into the output buffer
END_STREAM_FLAG = 0x1
_FRAME_HEADER = struct.Struct(">HBBBL")  # 24-bit length (16 + 8), type, flags, stream id

# Where h2's state machines let DATA through without a state change (RFC 9113 5.1): the plain-DATA
# paths below only take these cases and leave every other one to h2.
_OPEN_CONNECTION = frozenset((ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN))
_MAY_SEND_DATA = frozenset((StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE))
_MAY_RECEIVE_DATA = frozenset((StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL))


class H2Connection(h2.connection.H2Connection):
    """h2, plus: a HEADERS frame that would exceed our MAX_CONCURRENT_STREAMS refuses that one stream
    (REFUSED_STREAM, a stream error as RFC 9113 5.1.2 allows) instead of failing the whole connection
    with every tunnel on it, as h2's TooManyStreamsError does. A peer that floods CONNECTs loses the
    extra streams only. And it remembers fewer closed streams (MAX_CLOSED_STREAMS)."""

    MAX_CLOSED_STREAMS = MAX_CLOSED_STREAMS

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self._pieces: list[bytes] = []  # output ahead of _data_to_send, in order

    # Output as pieces: h2 serializes every frame into one bytearray and copies it out again in
    # data_to_send (three copies of each payload byte); a large DATA payload is kept by reference
    # instead, behind its 9-byte header, and the TLS writer takes the pieces as they are.

    def _prepare_for_sending(self, frames: list[Frame]) -> None:
        for frame in frames:
            if type(frame) is DataFrame and len(frame.data) >= DATA_BY_REFERENCE and not frame.pad_length:
                size = len(frame.data)
                flags = END_STREAM_FLAG if "END_STREAM" in frame.flags else 0
                self._data_to_send += _FRAME_HEADER.pack(size >> 8, size & 0xFF, 0x0, flags, frame.stream_id)
                self._pieces.append(bytes(self._data_to_send))
                self._pieces.append(frame.data)
                self._data_to_send = bytearray()
            else:
                self._data_to_send += frame.serialize()

    # Plain DATA (no END_STREAM, no padding, on an open stream) is nearly all a tunnel carries. h2
    # handles each such frame with a frame object, a flags set, two state-machine steps, an event
    # object and debug-log calls; these two do the same flow-control accounting on h2's own counters
    # and nothing else, and say False for any other case, which then goes through h2 as before.

    def send_plain_data(self, stream_id: int, data: bytes) -> bool:
        """Queue one DATA frame without END_STREAM, as h2's send_data would; False (nothing done): not
        that simple case (closed stream or connection, no window, larger than a frame)."""
        size = len(data)
        stream = self.streams.get(stream_id)
        if (
            stream is None
            or not 0 < size <= self.max_outbound_frame_size
            or size > self.outbound_flow_control_window
            or size > stream.outbound_flow_control_window
            or self.state_machine.state not in _OPEN_CONNECTION
            or stream.state_machine.state not in _MAY_SEND_DATA
        ):
            return False
        self.outbound_flow_control_window -= size
        stream.outbound_flow_control_window -= size
        self._data_to_send += _FRAME_HEADER.pack(size >> 8, size & 0xFF, 0x0, 0, stream_id)
        if size >= DATA_BY_REFERENCE:
            self._pieces.append(bytes(self._data_to_send))
            self._pieces.append(data)
            self._data_to_send = bytearray()
        else:
            self._data_to_send += data
        return True

    def receive_plain_data(self, stream_id: int, length: int) -> bool:
        """Account for a received DATA frame without flags (no END_STREAM, no padding) of `length`
        bytes, as h2 would; False (nothing done): not that simple case, hand the frame to h2, which
        raises the error or answers the closed stream."""
        stream = self.streams.get(stream_id)
        if (
            stream is None
            or self.state_machine.state not in _OPEN_CONNECTION
            or stream.state_machine.state not in _MAY_RECEIVE_DATA
            or not stream.state_machine.headers_received  # h2: "cannot receive data before headers"
            or stream._expected_content_length is not None  # h2 counts such a body against it
            or length > self._inbound_flow_control_window_manager.current_window_size
            or length > stream._inbound_window_manager.current_window_size
            or self.incoming_buffer._headers_buffer  # inside a header block DATA is an error
        ):
            return False
        self._inbound_flow_control_window_manager.window_consumed(length)
        stream._inbound_window_manager.window_consumed(length)
        return True

    def pieces_to_send(self) -> list[bytes]:
        pieces = self._pieces
        if self._data_to_send:
            pieces.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        self._pieces = []
        return pieces

    def data_to_send(self, amount: int | None = None) -> bytes:
        assert amount is None, "meshd takes all output at once"
        return b"".join(self.pieces_to_send())

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        sid = frame.stream_id
        if (
            not self.config.client_side
            and sid not in self.streams
            and sid % 2 == 1
            and sid > self.highest_inbound_stream_id
            and self.open_inbound_streams >= self.local_settings.max_concurrent_streams
        ):
            list(h2.connection._decode_headers(self.decoder, frame.data))  # HPACK state follows every block
            self.state_machine.process_input(h2.connection.ConnectionInputs.RECV_HEADERS)
            self.highest_inbound_stream_id = sid
            # Later frames on it (DATA, CONTINUATION...) are then answered with RST, not a connection error.
            self._closed_streams[sid] = StreamClosedBy.SEND_RST_STREAM
            rst = RstStreamFrame(sid)
            rst.error_code = REFUSED_STREAM
            return [rst], []
        return super()._receive_headers_frame(frame)


class QuietFrameBuffer(FrameBuffer):
    """h2's frame iterator, reading the whole frames `HboneConnection` hands it in place, plus: cheap
    DATA repr, and GOAWAY frames set aside for the wrapper.

    h2's own buffer copies everything into a bytearray, copies each frame's body out of it and then
    moves the rest of the buffer down (`del data[:n]`) frame by frame: four copies of every payload
    byte, quadratic with many frames per read. Here each frame is parsed from a memoryview of the
    caller's bytes, and only the frame parser's own copy of the body remains. `release()` drops the
    view once h2 is done, so the caller may reuse its buffer.
    """

    def __init__(self, server: bool) -> None:
        super().__init__(server=server)
        self.goaways: list[GoAwayFrame] = []
        self._view = _EMPTY_VIEW
        self._pos = 0

    def add_data(self, data: bytes | bytearray | memoryview) -> None:  # type: ignore[override]
        if self._preamble_len:  # the client preface: h2 checks it (HboneConnection sends it alone)
            super().add_data(data)
            data, self._data = bytes(self._data), bytearray()
        self._view = memoryview(data)
        self._pos = 0

    def release(self) -> None:
        self._view = _EMPTY_VIEW

    def __next__(self) -> Frame:
        view = self._view
        while True:
            pos = self._pos
            if len(view) - pos < 9:
                if pos != len(view):
                    raise h2.exceptions.ProtocolError("partial frame handed to the frame buffer")
                raise StopIteration
            try:
                frame, length = Frame.parse_frame_header(view[pos : pos + 9])
            except (InvalidDataError, InvalidFrameError) as err:
                raise h2.exceptions.ProtocolError(f"Received frame with invalid header: {err!s}") from err
            end = pos + 9 + length
            if end > len(view):
                raise h2.exceptions.ProtocolError("partial frame handed to the frame buffer")
            self._validate_frame_length(length)
            try:
                frame.parse_body(view[pos + 9 : end])
            except InvalidDataError as err:
                raise h2.exceptions.ProtocolError("Received frame with non-compliant data") from err
            except InvalidFrameError as err:
                raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid") from err
            self._pos = end
            complete = self._update_header_buffer(frame)
            if complete is None:
                continue  # a HEADERS frame waiting for its CONTINUATIONs
            if type(complete) is DataFrame:
                return quiet(complete)
            if type(complete) is GoAwayFrame:
                self.goaways.append(complete)
                continue
            return complete


_EMPTY_VIEW = memoryview(b"")
