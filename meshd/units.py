"""Parsing of the small value types users write: durations and host:port addresses. Pure."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import timedelta

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> timedelta:
    """Parse `250ms`, `10s`, `1h30m`, `7d`; raise ValueError with a hint otherwise."""
    s = text.strip()
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m:
            raise ValueError(f"{text!r} is not a duration (write e.g. 500ms, 10s, 5m, 24h, 7d or 1h30m)")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not s:
        raise ValueError("empty duration (write e.g. 10s or 24h)")
    return seconds_to_timedelta(total, text)


def seconds_to_timedelta(total: float, text: object) -> timedelta:
    """`total` seconds as a timedelta; ValueError naming `text` if it does not fit."""
    try:
        return timedelta(seconds=total)
    except (OverflowError, ValueError):  # inf, nan, or beyond timedelta's 999999999 days
        raise ValueError(f"{text!r} is not a usable duration (too long, or not finite)") from None


def format_duration(d: timedelta) -> str:
    secs = d.total_seconds()
    for unit in ("d", "h", "m", "s"):
        size = _UNIT_SECONDS[unit]
        if secs >= size and secs % size == 0:
            return f"{int(secs // size)}{unit}"
    return f"{int(secs * 1000)}ms"


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """ "1 peer", "2 peers" (`nouns` for an irregular plural)."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


@dataclass(frozen=True, slots=True)
class Address:
    """A host:port pair; host is an IP literal or a name. IPv6 is written [::1]:15008."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        s = text.strip()
        if s.startswith("["):
            end = s.find("]")
            if end < 0 or not s[end + 1 :].startswith(":"):
                raise ValueError(f"{text!r} is not an address (write [::1]:15008 for IPv6)")
            host, port_text = s[1:end], s[end + 2 :]
        else:
            host, sep, port_text = s.rpartition(":")
            if not sep or not host:
                raise ValueError(f"{text!r} is not an address (write HOST:PORT, e.g. 127.0.0.1:15008)")
            if ":" in host:
                raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:15008")
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValueError(
                f"{text!r}: port {port_text!r} is not a number from 0 to 65535 (write e.g. 127.0.0.1:15008)"
            )
        return cls(host, int(port_text))

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
