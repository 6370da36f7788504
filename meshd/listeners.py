"""Listening sockets and the per-connection boundary every meshd server shares.

- `open_listeners(key, address)`: a bind failure becomes a `ListenError` naming the address and the
  config key that set it, with a hint that is true for that errno (only EADDRINUSE suggests another
  program holds the address).
- `per_connection(handler, component)`: one connection's failure (an OSError from the file system,
  a bug) is logged with its cause and costs that connection only; trio's `serve_listeners` would
  otherwise let it cancel the server and the daemon with it.
- `original_destination(sock)`: where a connection redirected by nftables (transparent capture) was
  headed, from SO_ORIGINAL_DST.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from meshd.errors import UserFacingError
from meshd.units import Address

log = logging.getLogger("meshd")

_HINTS = {
    errno.EADDRINUSE: "is another meshd or program using that address? `ss -ltnp` shows who; set {key} to a free one",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE; or set {key} to a port >= 1024",
    errno.EADDRNOTAVAIL: "that IP is not on any interface of this host; set {key} to one that is, or 0.0.0.0",
}


class ListenError(UserFacingError):
    """A listener could not be opened; the message names the address, the key and the likely cause."""

    def __init__(self, key: str, address: Address, cause: OSError, owner: str = "") -> None:
        self.key = key
        self.address = address
        self.cause = cause
        reason = cause.strerror or str(cause)
        hint = _HINTS.get(cause.errno or 0, "check {key}").format(key=key)
        if isinstance(cause, socket.gaierror):
            hint = f"{address.host!r} is not an IP or a name this host resolves; check {key}"
        where = f"{key} of {owner}" if owner else key
        super().__init__(f"cannot listen on {address} ({where}): {reason} ({hint})")


async def open_listeners(key: str, address: Address, owner: str = "") -> list[trio.SocketListener]:
    """TCP listeners on `address`; ListenError (naming `key`, and `owner` if several share it)."""
    try:
        return await trio.open_tcp_listeners(address.port, host=address.host)
    except OSError as exc:
        raise ListenError(key, address, exc, owner) from exc


class SocketBacked(Protocol):
    """A stream over one socket: trio's SocketStream, the node's TcpStream."""

    @property
    def socket(self) -> socket.socket | trio.socket.SocketType: ...


def peer_of(stream: SocketBacked) -> tuple[str, int] | None:
    """The client's (ip, port); None if it already reset the connection (ENOTCONN: a port scan,
    a client that gave up). Such a connection is closed quietly, not logged as a failure."""
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return None
    return str(peer[0]), int(peer[1])


ConnectionHandler = Callable[[trio.SocketStream], Awaitable[None]]


def per_connection(handler: ConnectionHandler, component: str) -> ConnectionHandler:
    """`handler`, with any failure confined to its own connection (logged with the cause)."""

    async def guarded(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except Exception as exc:
            log.error(
                "%s: a connection failed, the server carries on: %s",
                component,
                exc or type(exc).__name__,
                exc_info=not isinstance(exc, OSError),  # an OS error's message is its cause
                extra={"component": component},
            )
            await trio.aclose_forcefully(stream)

    return guarded


SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


def original_destination(sock: socket.socket | trio.socket.SocketType) -> tuple[str, int] | None:
    """Where a redirected (captured) connection was headed; None if it was not redirected."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port, packed = struct.unpack_from("!2xH4s", raw)
    dest = (socket.inet_ntoa(packed), port)
    local = sock.getsockname()
    return None if (dest[0], dest[1]) == (local[0], local[1]) else dest
