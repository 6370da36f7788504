"""Plain TCP clients for tests: read to the end, and one send-half-close-read round trip."""

from __future__ import annotations

import errno
import socket


def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(1 << 16):
        out += chunk
    return bytes(out)


def recv_until_closed(sock: socket.socket) -> bytes:
    """What arrives before the peer closes (or resets) the connection."""
    try:
        return recv_all(sock)
    except ConnectionResetError:
        return b""


def send_and_read(address: tuple[str, int], data: bytes, timeout: float = 10.0) -> bytes:
    """Connect, send, half-close, and return what came back (b"" if the connection was refused
    after accept, as the mesh does for a denied client)."""
    with socket.create_connection(address, timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (ConnectionResetError, BrokenPipeError):
            return b""
        except OSError as e:
            # The reset can land before the half-close: the socket is then already gone.
            if e.errno == errno.ENOTCONN:
                return b""
            raise
        return recv_until_closed(s)
