"""Service VIPs (pure): stable, in range, the same whatever the order, collisions probed and reported."""

from __future__ import annotations

import ipaddress

import pytest

from meshd.discovery.vip import DEFAULT_VIP_RANGE, VipIndex, VipRangeFull, allocate, home_index

KEYS = ["echo.default", "web.default", "db.prod", "api.prod", "cache.infra"]


def test_every_service_gets_an_address_in_the_range_not_network_or_broadcast() -> None:
    table = allocate(KEYS)
    net = ipaddress.IPv4Network(DEFAULT_VIP_RANGE)
    assert set(table.by_service) == set(KEYS)
    for key, vip in table.by_service.items():
        addr = ipaddress.IPv4Address(vip)
        assert addr in net and addr not in (net.network_address, net.broadcast_address)
        assert table.service(vip) == key and table.vip(key) == vip
    assert len(set(table.by_service.values())) == len(KEYS)
    assert table.collisions == ()


def test_same_on_every_node_whatever_the_order_and_known_values() -> None:
    assert allocate(KEYS).by_service == allocate(reversed(KEYS)).by_service
    # A fixed point: the hash is part of the contract between nodes of different versions.
    assert allocate(["echo.default"]).vip("echo.default") == "240.240.191.241"
    # Without collisions, adding a service moves nobody.
    bigger = allocate([*KEYS, "new.default"])
    assert all(bigger.vip(k) == allocate(KEYS).vip(k) for k in KEYS)


@pytest.mark.parametrize(
    ("keys", "network", "expected", "collisions"),
    [
        # /29 has six usable addresses (.1-.6); homes from sha256: a.x->3, b.x->1, c.x->5, d.x->1
        (
            ["a.x", "b.x", "c.x", "d.x"],
            "10.0.0.0/29",
            {"a.x": "10.0.0.4", "b.x": "10.0.0.2", "c.x": "10.0.0.6", "d.x": "10.0.0.3"},
            ("service d.x: VIP 10.0.0.2 is taken by b.x; using 10.0.0.3",),
        ),
        # /30 has two usable addresses: the second key wraps around
        (["a.x", "b.x"], "10.0.0.0/30", None, None),
    ],
)
def test_collisions_probe_to_the_next_free_address_in_sorted_order(
    keys: list[str], network: str, expected: dict[str, str] | None, collisions: tuple[str, ...] | None
) -> None:
    table = allocate(keys, network)
    if expected is not None:
        assert dict(table.by_service) == expected
    if collisions is not None:
        assert table.collisions == collisions
    assert len(set(table.by_service.values())) == len(keys)
    assert allocate(list(reversed(keys)), network) == table


def test_home_index_is_sha256_modulo_size() -> None:
    assert [home_index(k, 6) for k in ("a.x", "b.x", "c.x", "d.x")] == [3, 1, 5, 1]


def test_a_full_range_is_an_error() -> None:
    with pytest.raises(VipRangeFull, match="3 services but only 2 addresses"):
        allocate(["a.x", "b.x", "c.x"], "10.0.0.0/30")


def test_index_rebuilds_only_on_a_new_key_set_and_reports_new_collisions_once() -> None:
    index = VipIndex("10.0.0.0/29")
    first, new = index.table(["a.x", "b.x"])
    assert new == ()
    again, new = index.table({"b.x": 1, "a.x": 2})  # any iterable of keys
    assert again is first and new == ()
    _, new = index.table(["a.x", "b.x", "d.x"])
    assert new == ("service d.x: VIP 10.0.0.2 is taken by b.x; using 10.0.0.3",)
    _, new = index.table(["a.x", "b.x", "d.x", "c.x"])
    assert new == ()
