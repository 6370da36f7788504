"""Errors of the HBONE library, split as h11 splits them.

Must never know: trio, sockets, TLS objects. Pure exception types so the sans-I/O core can raise them.

- `LocalProtocolError`: we misused the API (sent on a closed stream, beyond the window, after GOAWAY).
- `RemoteProtocolError`: the peer broke HTTP/2; the connection is finished and `data_to_send()` holds
  the GOAWAY that says why. `error_code` is the HTTP/2 error code we reported.
- `TunnelRefused`, `HboneConnectError`, `PeerIdentityError`: what a caller of the client side sees.
"""

from __future__ import annotations


class HboneError(Exception):
    """Base class of every error raised by meshd.hbone."""


class LocalProtocolError(HboneError):
    """This side asked the connection to do something HTTP/2 does not allow now."""


class RemoteProtocolError(HboneError):
    """The peer violated HTTP/2; the connection cannot continue."""

    def __init__(self, message: str, error_code: int) -> None:
        super().__init__(message)
        self.error_code = error_code


class TunnelRefused(HboneError):
    """The peer answered the CONNECT (or request) with a non-2xx status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(
            f"tunnel refused with {status}: {reason}" if reason else f"tunnel refused with {status}"
        )
        self.status = status
        self.reason = reason


class HboneConnectError(HboneError):
    """The HBONE connection could not be set up or broke; `reason` names the likely cause."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PeerIdentityError(HboneError):
    """The peer's certificate does not carry the identity we require."""
