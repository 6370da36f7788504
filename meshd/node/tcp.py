"""`TcpStream`: a connected TCP socket as a `trio.abc.HalfCloseableStream`, for the local legs of a
proxied connection (app <-> node, node <-> workload).

Must never know: what it carries, HBONE, policy.

Why not `trio.SocketStream`: every successful trio socket call ends with a trip through the scheduler,
and `receive_some` always tries `recv` first, which in request/response traffic fails with EAGAIN
about half the time before it waits. Here:
- `receive_some` waits for readability first after a short read (the next bytes are not there yet)
  and tries the socket first after a full one (bulk: they usually are), so neither case pays a
  wasted syscall. It is one schedule point either way (the wait, or a checkpoint).
- `send_nowait` hands bytes to the kernel without yielding (what the pump uses after a
  `receive_some` that was its schedule point); `send_all` is the ordinary checkpointing send.
"""

from __future__ import annotations

import socket

import trio

DEFAULT_RECEIVE = 64 * 1024


class TcpStream(trio.abc.HalfCloseableStream):
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # proxied bytes go out at once
        self.socket = sock
        self._wait_first = True  # the last read was short: wait before the next recv
        self._send_busy = False
        self._receive_busy = False
        self._closed = False
        self._eof_sent = False

    @classmethod
    def adopt(cls, stream: trio.SocketStream) -> TcpStream:
        """Take over the socket of a trio stream (which must not be used afterwards)."""
        return cls(socket.socket(fileno=stream.socket.detach()))

    @classmethod
    async def connect(cls, host: str, port: int) -> TcpStream:
        return cls.adopt(await trio.open_tcp_stream(host, port))

    def __repr__(self) -> str:
        return f"<TcpStream fd={self.socket.fileno()}>"

    # ---- receiving ---------------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE
        elif not isinstance(max_bytes, int):
            raise TypeError("max_bytes must be an integer or None")
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receive_busy:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receive_busy = True
        try:
            self._check_open()
            sock = self.socket
            if self._wait_first:
                await trio.lowlevel.wait_readable(sock)
            else:
                await trio.lowlevel.checkpoint()
            while True:
                self._check_open()
                try:
                    data = sock.recv(max_bytes)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                except OSError as e:
                    raise trio.BrokenResourceError(e.strerror or str(e)) from e
            self._wait_first = len(data) < max_bytes
            return data
        finally:
            self._receive_busy = False

    # ---- sending -----------------------------------------------------------------------------------

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Give the kernel what it takes now, without yielding; returns how many bytes it took."""
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._check_can_send()
        try:
            return self.socket.send(data)
        except BlockingIOError:
            return 0
        except OSError as e:
            raise trio.BrokenResourceError(e.strerror or str(e)) from e

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._send_busy = True
        try:
            self._check_can_send()
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            with memoryview(data) as view:
                view = view.cast("B")
                while view:
                    try:
                        sent = self.socket.send(view)
                    except BlockingIOError:
                        waited = True
                        await trio.lowlevel.wait_writable(self.socket)
                        self._check_can_send()
                        continue
                    except OSError as e:
                        raise trio.BrokenResourceError(e.strerror or str(e)) from e
                    view = view[sent:]
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._send_busy = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._send_busy = True
        try:
            self._check_can_send()
            await trio.lowlevel.wait_writable(self.socket)
        finally:
            self._send_busy = False

    async def send_eof(self) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._check_open()
        await trio.lowlevel.checkpoint()
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as e:
            raise trio.BrokenResourceError(e.strerror or str(e)) from e

    # ---- closing -----------------------------------------------------------------------------------

    def close_nowait(self) -> None:
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self.socket)
        self.socket.close()

    async def aclose(self) -> None:
        self.close_nowait()
        await trio.lowlevel.checkpoint()

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")

    def _check_can_send(self) -> None:
        self._check_open()
        if self._eof_sent:
            raise trio.ClosedResourceError("the sending side was shut down (send_eof)")
