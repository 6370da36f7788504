"""`TunnelStream`: one HBONE CONNECT stream as a `trio.abc.HalfCloseableStream`.

Must never know: TLS, sockets, pooling, how the stream was opened (client CONNECT or server accept).

Mapping to TCP:
- `send_all` waits for HTTP/2 flow-control window; each chunk is framed, encrypted and offered to the
  socket by the sending task itself. When the socket backs up (`HboneLink.backed_up`) the sender waits
  until the kernel has taken everything, so a fast sender buffers at most about HIGH_WATER + one chunk.
- `receive_some` returns buffered payload, acknowledging it (that reopens the peer's window: the only
  back-pressure there is); b"" after END_STREAM (FIN); BrokenResourceError after a reset without FIN.
- `send_eof` sends END_STREAM. `aclose` sends END_STREAM if we had not, and RST_STREAM(CANCEL) too if the
  peer has not finished sending (like closing a TCP socket with the other direction still open).
"""

from __future__ import annotations

import trio

from meshd.hbone._link import HboneLink, Slot
from meshd.hbone.connection import CANCEL
from meshd.hbone.errors import LocalProtocolError
from meshd.identity.spiffe import SpiffeId

SEND_CHUNK = 1024 * 1024  # one max-size frame per write


class TunnelStream(trio.abc.HalfCloseableStream):
    def __init__(self, link: HboneLink, stream_id: int) -> None:
        slot = link.slot(stream_id)
        assert slot is not None, f"stream {stream_id} has no slot"
        self._link = link
        self._conn = link.conn
        self._slot: Slot = slot
        self.stream_id = stream_id
        self.bytes_sent = 0
        self.bytes_received = 0
        self._send_busy = False
        self._receive_busy = False
        self._send_closed = False  # send_eof() or aclose()
        self._eof_sent = False
        self._closed = False

    @property
    def peer_identity(self) -> SpiffeId:
        return self._link.peer_identity

    @property
    def peer_address(self) -> tuple[str, int]:
        return self._link.peer_address

    def __repr__(self) -> str:
        return f"<TunnelStream {self.stream_id} to {self._link.peer_identity} at {self._link.peer_address}>"

    # ---- sending -----------------------------------------------------------------------------------

    def _check_send(self) -> None:
        if self._closed or self._send_closed:
            raise trio.ClosedResourceError("tunnel stream is closed for sending")
        slot = self._slot
        if slot.reset_code is not None:
            raise trio.BrokenResourceError(f"peer reset the tunnel (HTTP/2 error {slot.reset_code})")
        if self._link.broken or not self._conn.can_send(self.stream_id):
            raise trio.BrokenResourceError(self._link.failure or "tunnel can no longer send")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this tunnel stream")
        self._send_busy = True
        try:
            self._check_send()
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            view = memoryview(data).cast("B")
            while view:
                self._check_send()
                n = self._send_some(data, view)
                view = view[n:]
                if n == 0 or (view and self._link.backed_up):
                    waited = True
                    await self._wait_writable()
            if self._link.backed_up:
                waited = True
                await self._link.wait_drained()
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._send_busy = False

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Frame and send what the flow-control window allows now, without yielding; returns the bytes
        taken (0 when the window is shut or the connection is backed up: then use `send_all`)."""
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this tunnel stream")
        self._check_send()
        if self._link.backed_up:
            return 0
        return self._send_some(data, memoryview(data).cast("B"))

    def _send_some(self, data: bytes | bytearray | memoryview, view: memoryview) -> int:
        window = self._conn.send_window(self.stream_id)
        if window <= 0:
            return 0
        n = min(window, len(view), SEND_CHUNK)
        # Whole `bytes` go down as they are: the frame serializer then makes no copy.
        payload = data if n == len(view) == len(data) and type(data) is bytes else view[:n]
        try:
            self._conn.send_data(self.stream_id, payload)
        except LocalProtocolError as e:
            raise trio.BrokenResourceError(str(e)) from e
        self.bytes_sent += n
        self._link.send_pending()
        return n

    async def _wait_writable(self) -> None:
        """Until the window opens (if shut) and the connection is no longer backed up."""
        if self._link.backed_up:
            await self._link.wait_drained()
        while self._conn.can_send(self.stream_id) and self._conn.send_window(self.stream_id) <= 0:
            self._check_send()
            await self._slot.writable.wait()
        self._check_send()

    async def wait_send_all_might_not_block(self) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this tunnel stream")
        self._send_busy = True
        try:
            self._check_send()
            await trio.lowlevel.checkpoint()
            while True:
                self._check_send()
                if self._conn.send_window(self.stream_id) > 0:
                    return
                await self._slot.writable.wait()
        finally:
            self._send_busy = False

    async def send_eof(self) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this tunnel stream")
        if self._closed:
            raise trio.ClosedResourceError("tunnel stream is closed")
        if not self._eof_sent:
            self._send_closed = self._eof_sent = True
            if self._conn.can_send(self.stream_id):
                self._conn.end_stream(self.stream_id)
                self._link.send_pending()
        await trio.lowlevel.checkpoint()

    # ---- receiving ---------------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            if not isinstance(max_bytes, int):
                raise TypeError("max_bytes must be an integer or None")
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receive_busy:
            raise trio.BusyResourceError("another task is receiving on this tunnel stream")
        self._receive_busy = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("tunnel stream is closed")
            slot = self._slot
            if slot.chunks:
                await trio.lowlevel.checkpoint()
            waited = False  # waiting is the schedule point; else a checkpoint before returning
            while not slot.chunks:
                end = self._end_of_data()
                if end is not None:
                    if not waited:
                        await trio.lowlevel.checkpoint()
                    if isinstance(end, Exception):
                        raise end
                    return b""
                await slot.readable.wait()
                waited = True
            chunk = slot.chunks[0]
            if max_bytes is None or len(chunk) <= max_bytes:
                slot.chunks.popleft()
            else:
                slot.chunks[0] = chunk[max_bytes:]
                chunk = chunk[:max_bytes]
            self.bytes_received += len(chunk)
            self._conn.acknowledge(self.stream_id, len(chunk))
            self._link.send_pending()
            return chunk
        finally:
            self._receive_busy = False

    def _end_of_data(self) -> Exception | bytes | None:
        """Why no more data can come (b"" = the peer's END_STREAM, or an error to raise); None if it may."""
        slot = self._slot
        if self._closed:
            return trio.ClosedResourceError("tunnel stream is closed")
        if slot.remote_ended:
            return b""
        if slot.reset_code is not None:
            return trio.BrokenResourceError(f"peer reset the tunnel (HTTP/2 error {slot.reset_code})")
        if self._link.broken:
            return trio.BrokenResourceError(self._link.failure or "connection lost")
        return None

    # ---- closing -----------------------------------------------------------------------------------

    def close_nowait(self) -> None:
        """`aclose` without the checkpoint (for finally blocks and sync cleanup)."""
        if self._closed:
            return
        self._closed = self._send_closed = True
        conn, sid = self._conn, self.stream_id
        if conn.can_send(sid) and not self._link.broken:
            conn.end_stream(sid)
        if not self._slot.remote_ended and self._slot.reset_code is None:
            conn.reset_stream(sid, CANCEL)
        self._link.release(sid)

    async def aclose(self) -> None:
        self.close_nowait()
        await trio.lowlevel.checkpoint()
