"""`Wire`: the byte pipe under one HBONE connection, a TCP socket with TLS done in memory.

Must never know: HTTP/2, streams, pooling, what identities mean (it only hands out the peer's
certificate).

Why not `trio.SSLStream`: its `send_all` may be awaited by one task at a time and must never be
cancelled half way (that breaks the TLS stream for every tunnel on it), so a link over it needed a
writer task of its own, and every chunk crossed from the sending task to that writer: with fifty
streams on one connection the writer sent what all of them queued in one scheduler batch, and requests
moved between daemons in herds. Here TLS runs on an `ssl.SSLObject` over memory BIOs and `write()` is
synchronous: it encrypts and offers the ciphertext to the socket at once, and keeps what the kernel
does not take, in order, for `flush()`. With no await inside a write there is no half-done write to
cancel, and any task (a sender, the reader answering a PING or a TLS KeyUpdate) may write, one at a
time by construction. Only `flush()` waits for the socket, and only one task (the link's flusher)
may call it.

Reading: `receive()` returns all the plaintext that the bytes buffered in the kernel decrypt to, up to
`RECEIVE_SIZE` at a time. After a short read it waits for readability before the next recv, so a
request/response exchange does not pay a recv that fails with EAGAIN; after a full read it tries the
socket first (bulk traffic is usually already there).

Without TLS (`tls=None`) the same object carries plaintext: tests use it over a socketpair.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections import deque
from collections.abc import Iterator
from itertools import islice
from typing import Any

import trio

RECEIVE_SIZE = 256 * 1024
TLS_RECORD = 16384  # the largest TLS record's plaintext
_IOV_MAX = 1024  # Linux's limit on the buffers one sendmsg takes


class Wire:
    """One connected socket, optionally with TLS on an `ssl.SSLObject`. Build it with `handshake()`."""

    def __init__(
        self,
        sock: socket.socket,
        tls: ssl.SSLObject | None = None,
        incoming: ssl.MemoryBIO | None = None,
        outgoing: ssl.MemoryBIO | None = None,
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._tls = tls
        self._incoming = incoming if incoming is not None else ssl.MemoryBIO()
        self._outgoing = outgoing if outgoing is not None else ssl.MemoryBIO()
        # Ciphertext the kernel has not taken yet, in order, as the pieces it was written in (so a
        # large backlog is sent from where it lies: no copying it along, no moving its rest down).
        self._out: deque[memoryview] = deque()
        self._pending = 0
        self._buffer = bytearray(RECEIVE_SIZE)
        self._view = memoryview(self._buffer)
        self._eof = False
        self._wait_first = True  # the last recv was short: wait for readability before the next
        self._failure: BaseException | None = None  # the socket or TLS error that broke the wire
        self._closed = False

    # ---- set-up ------------------------------------------------------------------------------------

    @classmethod
    async def handshake(
        cls,
        tcp: trio.SocketStream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> Wire:
        """Take over `tcp`'s socket and run the TLS handshake on it. Raises `trio.BrokenResourceError`
        (caused by the `ssl.SSLError` or `OSError`) if it fails; the socket is closed then."""
        sock = socket.socket(fileno=tcp.socket.detach())
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname)
        wire = cls(sock, tls, incoming, outgoing)
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as e:
                    wire._send_outgoing()  # our alert, if any
                    raise trio.BrokenResourceError(f"TLS handshake failed: {e}") from e
                wire._send_outgoing()
                await wire.flush()
                if not await wire._fill():
                    raise trio.BrokenResourceError("peer closed the connection during the TLS handshake")
            wire._send_outgoing()  # our Finished, session tickets
            await wire.flush()
        except BaseException:
            wire.close()
            raise
        return wire

    # ---- what the handshake agreed -----------------------------------------------------------------

    def selected_alpn_protocol(self) -> str | None:
        return self._tls.selected_alpn_protocol() if self._tls is not None else None

    def cipher(self) -> tuple[str, str, int] | None:
        return self._tls.cipher() if self._tls is not None else None

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        if self._tls is None:
            return None
        der = self._tls.getpeercert(binary_form=True)
        return der if isinstance(der, bytes) else None

    # ---- writing -----------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Bytes written but not yet taken by the kernel (`flush()` sends them)."""
        return self._pending

    def write(self, *pieces: bytes | bytearray | memoryview) -> None:
        """Encrypt the pieces (in order, as one byte stream) and send them now, as far as the socket
        takes them; the rest waits for `flush()`. Never blocks. Raises `trio.BrokenResourceError` once
        the socket has failed."""
        self._check_usable()
        tls = self._tls
        if tls is None:
            for piece in pieces:
                self._send_now(piece)
            return
        try:
            for record in _records(pieces):
                tls.write(record)
        except ssl.SSLError as e:
            self._failure = e
            raise trio.BrokenResourceError(f"TLS error: {e}") from e
        self._send_now(self._outgoing.read())

    def _send_outgoing(self) -> None:
        """Send TLS output that reading or the handshake produced (alerts, Finished, KeyUpdate)."""
        if self._outgoing.pending:
            self._send_now(self._outgoing.read())

    def _send_now(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._out:  # keep the byte order: behind what is already waiting
            self._queue(memoryview(data))
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self._failure = e
            raise trio.BrokenResourceError(_describe_os_error(e)) from e
        if sent < len(data):
            self._queue(memoryview(data)[sent:])

    def _queue(self, piece: memoryview) -> None:
        self._out.append(piece)
        self._pending += len(piece)

    async def flush(self) -> None:
        """Wait until the kernel has taken everything written. One task at a time (trio allows one
        waiter per socket direction): the link's flusher."""
        out = self._out
        while out:
            self._check_usable()
            await trio.lowlevel.wait_writable(self._sock)
            try:
                # All waiting pieces in one syscall (up to the kernel's iovec limit).
                sent = self._sock.sendmsg(list(islice(out, _IOV_MAX)))
            except BlockingIOError:
                continue
            except OSError as e:
                self._failure = e
                raise trio.BrokenResourceError(_describe_os_error(e)) from e
            self._pending -= sent
            while sent:
                head = out[0]
                if sent < len(head):
                    out[0] = head[sent:]
                    break
                sent -= len(head)
                out.popleft()

    # ---- reading -----------------------------------------------------------------------------------

    async def receive(self) -> bytes | memoryview:
        """Plaintext available now (waiting for some if there is none); b"" at the peer's clean end
        (FIN or TLS close_notify). A memoryview result is valid until the next call. Raises
        `trio.BrokenResourceError` for a reset connection or a TLS error (an alert from the peer)."""
        tls = self._tls
        self._check_usable()
        while True:
            if tls is not None:
                plain = self._decrypt()
                if plain:
                    return plain
            if self._eof:
                return b""
            got = await self._fill()
            if tls is None:
                return self._view[:got] if got else b""

    async def _fill(self) -> int:
        """One recv into the buffer (fed to TLS, if any); 0 at EOF."""
        self._check_usable()
        if self._wait_first:
            await trio.lowlevel.wait_readable(self._sock)
        else:
            await trio.lowlevel.checkpoint()
        while True:
            try:
                got = self._sock.recv_into(self._buffer)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
            except OSError as e:
                self._failure = e
                raise trio.BrokenResourceError(_describe_os_error(e)) from e
        self._wait_first = got < RECEIVE_SIZE
        if got == 0:
            self._eof = True
            if self._tls is not None:
                self._incoming.write_eof()
        elif self._tls is not None:
            self._incoming.write(self._view[:got])
        return got

    def _decrypt(self) -> bytes | memoryview:
        """Every record the buffered ciphertext completes, as one plaintext chunk."""
        assert self._tls is not None
        view, pos = self._view, 0
        # Given a buffer, SSLObject.read returns a count (typeshed says bytes, and compiled code checks).
        read_into: Any = self._tls.read
        try:
            while pos < RECEIVE_SIZE:
                n: int = read_into(RECEIVE_SIZE - pos, view[pos:])
                if not n:
                    break
                pos += n
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            self._eof = True  # close_notify, or a FIN without it (ended all the same, as HTTPS treats it)
        except ssl.SSLError as e:
            self._failure = e
            if not pos:
                raise trio.BrokenResourceError(f"TLS error: {e}") from e
        with contextlib.suppress(trio.BrokenResourceError):  # reported by the next write or read
            self._send_outgoing()  # a KeyUpdate we must answer, an alert
        return view[:pos] if pos else b""

    # ---- closing -----------------------------------------------------------------------------------

    def close_notify(self) -> None:
        """Queue TLS close_notify (a clean end for the peer); `flush()` then hang up with `close()`."""
        if self._tls is None or self._failure is not None or self._closed:
            return
        try:
            self._tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass  # sent ours; we do not wait for theirs
        except (ssl.SSLError, ValueError):
            return
        with contextlib.suppress(trio.BrokenResourceError):
            self._send_outgoing()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the connection is closed")
        if self._failure is not None:
            raise trio.BrokenResourceError(str(self._failure)) from self._failure


def _records(pieces: tuple[bytes | bytearray | memoryview, ...]) -> Iterator[bytes | bytearray | memoryview]:
    """The pieces regrouped for TLS writes: each write ends a TLS record, so small pieces (a frame
    header, a WINDOW_UPDATE) are joined with what follows up to a full record, and the rest of a large
    piece is written from where it lies, uncopied."""
    small = bytearray()
    for piece in pieces:
        size = len(piece)
        if size < TLS_RECORD:
            small += piece
            if len(small) >= TLS_RECORD:
                yield small
                small = bytearray()
            continue
        view = memoryview(piece)
        if small:
            cut = TLS_RECORD - len(small)
            small += view[:cut]
            yield small
            small = bytearray()
            view = view[cut:]
        yield view
    if small:
        yield small


def _describe_os_error(e: OSError) -> str:
    return e.strerror or str(e)
