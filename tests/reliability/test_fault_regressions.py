"""Bugs the faults-under-load tests found, pinned as fast unit tests."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from meshd.balance import ConnectBackoff
from meshd.node.outbound import EJECT_BASE, EJECT_MAX


def test_endpoint_ejection_survives_thousands_of_failures() -> None:
    # A waypoint down under load: every request's connect failed and counted, and after 1025 the
    # back-off 2 ** failures overflowed a float; every later request to that service failed.
    health: ConnectBackoff[Any] = ConnectBackoff(EJECT_BASE, EJECT_MAX)
    ep: Any = SimpleNamespace(key=("echo.default", "10.0.0.1", 15008))
    for _ in range(5000):
        health.failed(ep, 0.0)
    assert health.ejected[ep.key].until == EJECT_MAX
    assert health.healthy(ep, EJECT_MAX)
