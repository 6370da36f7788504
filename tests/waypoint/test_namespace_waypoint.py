"""Namespace-default waypoints: published in a node's catalog, resolved once in the merged catalog."""

from __future__ import annotations

from pathlib import Path

from meshd.config.load import load_config
from meshd.discovery.catalog import NodeCatalog, ServiceEntry, local_catalog
from tests.support.catalogs import TD, merged, node, service
from tests.support.configs import node_config


def _node(
    name: str, services: tuple[ServiceEntry, ...] = (), namespaces: tuple[tuple[str, str], ...] = ()
) -> NodeCatalog:
    return node(name, "127.0.0.9:15008", services=services, namespaces=namespaces)


def _http(name: str, namespace: str = "apps", waypoint: str | None = None) -> ServiceEntry:
    return service(name, 80, protocol="http", namespace=namespace, waypoint=waypoint)


def test_namespace_default_applies_unless_the_service_says_otherwise() -> None:
    services = (
        _http("ratings"),  # no waypoint: the namespace default
        _http("details", waypoint="none"),  # opted out
        _http("reviews", waypoint="other"),  # its own
        _http("echo", "default"),  # another namespace
    )
    # The default is published by another node (here the waypoint itself) and merged like services.
    cat = merged(_node("beta", services), (_node("wp", namespaces=(("apps", "wp"),)), "127.0.0.9"))
    assert {k: s.waypoint for k, s in cat.services.items()} == {
        "ratings.apps": "wp",
        "details.apps": None,
        "reviews.apps": "other",
        "echo.default": None,
    }
    assert not cat.conflicts


def test_conflicting_namespace_defaults_are_reported_and_resolved_deterministically() -> None:
    local = _node("alpha", (_http("ratings"),))
    cat = merged(
        local,
        (_node("wp2", namespaces=(("apps", "wp2"),)), "h"),
        (_node("wp1", namespaces=(("apps", "wp1"),)), "h"),
    )
    assert cat.services["ratings.apps"].waypoint == "wp1"  # the lowest node name's
    assert any("namespace apps" in c for c in cat.conflicts)


def test_namespace_defaults_round_trip_and_leave_other_catalogs_unchanged() -> None:
    plain = _node("beta")
    assert "namespaces" not in plain.to_json()  # the encoding (and revision) of catalogs without them
    cat = _node("beta", namespaces=(("apps", "wp"),))
    assert NodeCatalog.decode(cat.encode(), trust_domain=TD) == cat


def test_config_namespace_table(tmp_path: Path) -> None:
    path = node_config(
        tmp_path / "wp.toml", "wp", tmp_path / "ca", body='[[namespace]]\nname = "apps"\nwaypoint = "wp"\n'
    )
    cfg = load_config(path)
    assert local_catalog(cfg).namespaces == (("apps", "wp"),)
