"""Endpoint choice in the node's outbound: round robin, ejection after failures, source identity."""

from __future__ import annotations

from typing import Any

from meshd.balance import ConnectBackoff
from meshd.discovery.catalog import Endpoint, WorkloadEntry
from meshd.identity.spiffe import SpiffeId
from meshd.node.outbound import EJECT_BASE, EJECT_MAX, EndpointPicker
from meshd.units import Address


def ep(name: str) -> Endpoint:
    w = WorkloadEntry("n-" + name, name, "default", name, "127.0.0.1", (7000,), ("echo.default",))
    return Endpoint(w, 7000, Address("127.0.0.1", 15008), SpiffeId("td", "default", name), "127.0.0.1:7000")


def test_ejection_grows_and_resets() -> None:
    health: ConnectBackoff[Any] = ConnectBackoff(EJECT_BASE, EJECT_MAX)
    a = ep("a")
    assert health.healthy(a, 0.0)
    health.failed(a, 0.0)
    assert not health.healthy(a, 0.5) and health.healthy(a, 1.0)
    health.failed(a, 1.0)
    assert not health.healthy(a, 2.5) and health.healthy(a, 3.0)
    for _ in range(20):
        health.failed(a, 100.0)
    assert health.healthy(a, 100.0 + EJECT_MAX)
    health.succeeded(a)
    assert health.healthy(a, 0.0)


def test_round_robin_puts_ejected_endpoints_last() -> None:
    picker = EndpointPicker()
    eps = [ep("a"), ep("b"), ep("c")]
    firsts = [picker.candidates("svc", eps, 0.0)[0].workload.name for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    picker.health.failed(eps[1], 0.0)  # b ejected for a second
    for _ in range(3):
        order = [e.workload.name for e in picker.candidates("svc", eps, 0.5)]
        assert order[-1] == "b" and sorted(order) == ["a", "b", "c"]
    assert picker.candidates("svc", eps, 2.0)[0].workload.name in {"a", "b", "c"}
    assert picker.candidates("svc", [], 0.0) == []
