"""What a CONNECT's `:authority` names: an address, or a service hostname (ztunnel's double HBONE).

Must never know: trio, sockets, TLS, catalogs. Pure parsing, so the core hands the roles a typed target
and no role re-parses the string.

ztunnel's `HboneAddress` (istio/ztunnel `src/proxy.rs`) has the same two cases: `SocketAddr` (an IP
literal and port: every single-network tunnel, and a bare workload address) and `SvcHostname` (a service
hostname and the *service* port: both CONNECTs of double HBONE, `build_request_through_gateway` in
`src/proxy/outbound.rs`), told apart as ztunnel's `TryFrom<&Uri>` does: whatever parses as an IP socket
address is one, anything else with a host and a port is a hostname. meshd is stricter about the name: an
RFC 1123 DNS name (letters, digits, hyphens; labels of 1..63; at most 253 characters; the last label not
all digits, so a mistyped IP such as `10.0.0.300` is refused instead of taken for a name).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshd.units import Address

MAX_HOSTNAME = 253
MAX_LABEL = 63
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


@dataclass(frozen=True, slots=True)
class SocketTarget:
    """`ip:port` (`[ipv6]:port`): a workload, node or waypoint address."""

    host: str
    port: int

    def __str__(self) -> str:
        return str(Address(self.host, self.port))


@dataclass(frozen=True, slots=True)
class HostnameTarget:
    """`hostname:port`: a service by name and its service port; the role receiving it picks the endpoint.
    `hostname` is lowercased (DNS names are case-insensitive)."""

    hostname: str
    port: int

    def __str__(self) -> str:
        return f"{self.hostname}:{self.port}"


ConnectTarget = SocketTarget | HostnameTarget


def parse_socket_target(text: str) -> SocketTarget | None:
    """`ip:port` or `[ipv6]:port`; None if it is anything else."""
    try:
        addr = Address.parse(text)
    except ValueError:
        return None
    if text != text.strip() or not addr.is_ip or not 1 <= addr.port <= 65535:
        return None
    return SocketTarget(addr.host, addr.port)


def is_hostname(name: str) -> bool:
    """An RFC 1123 DNS name (no trailing dot), whose last label is not all digits."""
    if not name or len(name) > MAX_HOSTNAME or not name.isascii():
        return False
    labels = name.lower().split(".")
    for label in labels:
        if not 1 <= len(label) <= MAX_LABEL or not _LABEL_CHARS.issuperset(label):
            return False
        if label.startswith("-") or label.endswith("-"):
            return False
    return not labels[-1].isdigit()


def _port(text: str) -> int | None:
    if not (text.isascii() and text.isdigit() and len(text) <= 5):
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def parse_connect_target(text: str) -> ConnectTarget | None:
    """The target a CONNECT `:authority` names; None if it is neither `ip:port` nor `hostname:port`."""
    socket_target = parse_socket_target(text)
    if socket_target is not None:
        return socket_target
    host, sep, port_text = text.rpartition(":")
    port = _port(port_text)
    if not sep or port is None or not is_hostname(host):
        return None
    return HostnameTarget(host.lower(), port)
