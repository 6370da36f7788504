"""`meshd peers --prometheus-sd`: the file_sd groups from a /config_dump, and a peer's scrape target."""

from __future__ import annotations

from meshd.cli_admin import prometheus_sd
from meshd.discovery.catalog import NodeCatalog, metrics_target
from meshd.units import Address


def dump(metrics: str, hbone: str, peers: list[dict[str, object]]) -> dict[str, object]:
    return {
        "node_name": "alpha",
        "role": "node",
        "listeners": {"metrics": metrics},
        "config": {"listen": {"metrics": metrics, "hbone": hbone}},
        "peers": peers,
    }


def test_own_wildcard_address_becomes_the_hbone_host_or_loopback() -> None:
    assert prometheus_sd(dump("0.0.0.0:15020", "10.0.0.1:15008", []))[0]["targets"] == ["10.0.0.1:15020"]
    assert prometheus_sd(dump("0.0.0.0:15020", "0.0.0.0:15008", []))[0]["targets"] == ["127.0.0.1:15020"]


def test_peers_without_a_catalog_or_metrics_are_left_out() -> None:
    peers = [
        {"name": "beta", "role": "waypoint", "how": "mdns", "metrics": "10.0.0.2:15020"},
        {"name": None, "role": None, "how": "static", "metrics": None},  # never answered
        {"name": "old", "role": "node", "how": "static", "metrics": None},  # an older meshd
    ]
    groups = prometheus_sd(dump("127.0.0.1:15020", "127.0.0.1:15008", peers))
    assert groups[1:] == [
        {
            "targets": ["10.0.0.2:15020"],
            "labels": {"meshd_node": "beta", "meshd_role": "waypoint", "meshd_found_by": "mdns"},
        }
    ]


def test_metrics_target_replaces_a_wildcard_with_where_the_peer_was_reached() -> None:
    cat = NodeCatalog("beta", "home.arpa", "node", Address.parse("0.0.0.0:15008"), (), ())
    assert metrics_target(cat, "10.0.0.2") is None
    wild = NodeCatalog("beta", "home.arpa", "node", cat.hbone, (), (), metrics=Address.parse("0.0.0.0:15020"))
    assert metrics_target(wild, "10.0.0.2") == "10.0.0.2:15020"
    fixed = NodeCatalog("beta", "home.arpa", "node", cat.hbone, (), (), metrics=Address.parse("[::1]:9100"))
    assert metrics_target(fixed, "10.0.0.2") == "[::1]:9100"
    assert NodeCatalog.decode(fixed.encode(), trust_domain="home.arpa").metrics == Address.parse("[::1]:9100")
