"""gRPC as a proxy sees it (pure): is a request gRPC, its deadline, its status, and how a proxy's own
answer (deny, no route, timeout, overflow) is spelt for a gRPC client.

A gRPC client reads a call's outcome from `grpc-status` (trailers, or the headers of a trailers-only
response), not from the HTTP status: a proxy's `403` must become HTTP 200 + `grpc-status: 7`, as
Envoy does, or the client sees a protocol error instead of PERMISSION_DENIED.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import quote

OK: Final = 0
CANCELLED: Final = 1
UNKNOWN: Final = 2
DEADLINE_EXCEEDED: Final = 4
PERMISSION_DENIED: Final = 7
RESOURCE_EXHAUSTED: Final = 8
UNIMPLEMENTED: Final = 12
INTERNAL: Final = 13
UNAVAILABLE: Final = 14
UNAUTHENTICATED: Final = 16

# Envoy's retry_on names for gRPC statuses.
RETRY_ON: Final = {
    "cancelled": CANCELLED,
    "deadline-exceeded": DEADLINE_EXCEEDED,
    "internal": INTERNAL,
    "resource-exhausted": RESOURCE_EXHAUSTED,
    "unavailable": UNAVAILABLE,
}

# A proxy's HTTP answer -> the gRPC status a client should see (gRPC's "HTTP to gRPC status mapping",
# with 504 read as Envoy does for its own timeouts: the deadline passed).
_FROM_HTTP: Final = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}
_UNITS: Final = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def is_grpc(content_type: str | None) -> bool:
    return content_type is not None and content_type.startswith("application/grpc")


def timeout_seconds(value: str | None) -> float | None:
    """`grpc-timeout` (1-8 digits and a unit: H M S m u n) in seconds; None if absent or malformed."""
    if not value or len(value) > 9 or value[-1] not in _UNITS or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * _UNITS[value[-1]]


def status_of(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def local_reply_headers(http_status: int, message: str) -> list[tuple[str, str]]:
    """The headers of a trailers-only gRPC response standing for a proxy's own HTTP answer."""
    code = _FROM_HTTP.get(http_status, UNKNOWN)
    return [
        ("content-type", "application/grpc"),
        ("grpc-status", str(code)),
        ("grpc-message", quote(message.strip(), safe=" !#$&'()*+,-./:;<=>?@[]^_`{|}~")),
    ]
