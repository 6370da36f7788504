"""The CONNECT target the HBONE core hands the roles (meshd/hbone/target.py): an address, or a service
hostname as ztunnel's double HBONE names it (`HboneAddress::SvcHostname`)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.hbone.target import HostnameTarget, SocketTarget, is_hostname, parse_connect_target


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:80", SocketTarget("10.0.0.1", 80)),
        ("[fd00::1]:8080", SocketTarget("fd00::1", 8080)),
        ("echo.default.svc.cluster.local:7000", HostnameTarget("echo.default.svc.cluster.local", 7000)),
        ("Echo.Default.SVC.cluster.local:80", HostnameTarget("echo.default.svc.cluster.local", 80)),
        ("localhost:1", HostnameTarget("localhost", 1)),
        ("a-b.c9:65535", HostnameTarget("a-b.c9", 65535)),
        ("echo.default.svc.cluster.local", None),  # no port
        ("echo.default.svc.cluster.local:0", None),
        ("echo.default.svc.cluster.local:65536", None),
        ("echo.default.svc.cluster.local:+80", None),
        ("echo.default.svc.cluster.local: 80", None),
        ("echo.default.svc.cluster.local.:80", None),  # trailing dot: ztunnel's hostnames have none
        ("-echo.default:80", None),
        ("echo-.default:80", None),
        ("echo..default:80", None),
        ("ech_o.default:80", None),
        ("10.0.0.300:80", None),  # a mistyped IP is not a name
        ("1.2.3:80", None),
        ("[echo]:80", None),
        ("fd00::1:80", None),
        ("a" * 64 + ".x:80", None),
        (".".join(["a" * 63] * 4) + ":80", None),  # 255 characters
        ("é.default:80", None),
        ("", None),
        (":80", None),
    ],
)
def test_parse_connect_target(text: str, expected: object) -> None:
    assert parse_connect_target(text) == expected


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(_LABEL, min_size=1, max_size=5), st.integers(1, 65535))
def test_every_dns_name_and_port_parses_to_a_hostname_target(labels: list[str], port: int) -> None:
    name = ".".join(labels)
    parsed = parse_connect_target(f"{name}:{port}")
    if len(name) > 253:
        assert parsed is None
    elif labels[-1].isdigit():  # an IPv4 address, or nothing (never a name)
        assert parsed is None or isinstance(parsed, SocketTarget)
    else:
        assert parsed == HostnameTarget(name, port) and is_hostname(name.upper())


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_any_text_is_refused_or_a_target_that_prints_back_the_same(text: str) -> None:
    target = parse_connect_target(text)
    if target is not None:
        assert parse_connect_target(str(target)) == target
        assert 1 <= target.port <= 65535
