"""Service virtual IPs. Pure: no I/O, no clock.

Rule 1: a service's VIP is a function of the set of service keys (`name.namespace`) and the range
only, so every node that knows the same services computes the same VIPs without talking.
Rule 2: a service's *home* address is sha256(key) modulo the number of usable addresses in the
range (network and broadcast addresses excluded). Keys are placed in sorted order; a key whose home
is taken probes upwards (wrapping) to the next free address, and the collision is reported.

So a VIP changes only when a colliding key appears that sorts before it: with the default /16 that
needs two of a homelab's services to hash to the same one of 65534 addresses.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_VIP_RANGE = "240.240.0.0/16"  # class E: never routed, never assigned to an interface


class VipRangeFull(ValueError):
    """More services than addresses in the VIP range."""


def usable(network: ipaddress.IPv4Network) -> tuple[int, int]:
    """(first address as int, count) of the addresses a VIP may take."""
    if network.prefixlen >= 31:
        return int(network.network_address), network.num_addresses
    return int(network.network_address) + 1, network.num_addresses - 2


def home_index(key: str, size: int) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % size


@dataclass(frozen=True, slots=True)
class VipTable:
    network: ipaddress.IPv4Network
    by_service: Mapping[str, str] = field(default_factory=dict)
    by_ip: Mapping[str, str] = field(default_factory=dict)
    collisions: tuple[str, ...] = ()

    def vip(self, service_key: str) -> str | None:
        return self.by_service.get(service_key)

    def service(self, ip: str) -> str | None:
        return self.by_ip.get(ip)

    def to_json(self) -> dict[str, Any]:
        return {
            "range": str(self.network),
            "vips": dict(sorted(self.by_service.items())),
            "collisions": list(self.collisions),
        }


def allocate(keys: Iterable[str], network: ipaddress.IPv4Network | str = DEFAULT_VIP_RANGE) -> VipTable:
    """VIPs for every service key (see the module docstring for the rules)."""
    net = ipaddress.IPv4Network(network)
    first, size = usable(net)
    ordered = sorted(set(keys))
    if len(ordered) > size:
        raise VipRangeFull(f"{len(ordered)} services but only {size} addresses in the VIP range {net}")
    owner: dict[int, str] = {}
    collisions: list[str] = []
    for key in ordered:
        home = i = home_index(key, size)
        while i in owner:
            i = (i + 1) % size
        if i != home:
            collisions.append(
                f"service {key}: VIP {ipaddress.IPv4Address(first + home)} is taken by {owner[home]}; "
                f"using {ipaddress.IPv4Address(first + i)}"
            )
        owner[i] = key
    by_ip = {str(ipaddress.IPv4Address(first + i)): key for i, key in owner.items()}
    return VipTable(net, {key: ip for ip, key in by_ip.items()}, by_ip, tuple(collisions))


class VipIndex:
    """The VIP table of the current catalog's services, rebuilt only when the key set changes."""

    def __init__(self, network: ipaddress.IPv4Network | str = DEFAULT_VIP_RANGE) -> None:
        self.network = ipaddress.IPv4Network(network)
        self._keys: frozenset[str] | None = None
        self._table = VipTable(self.network)

    def table(self, keys: Iterable[str]) -> tuple[VipTable, tuple[str, ...]]:
        """(the table, collisions that are new since the previous table) for these service keys."""
        wanted = frozenset(keys)
        if wanted == self._keys:
            return self._table, ()
        old = set(self._table.collisions)
        self._table = allocate(wanted, self.network)
        self._keys = wanted
        return self._table, tuple(c for c in self._table.collisions if c not in old)
