"""Which waypoint a service gets in the merged catalog (pure): its own binding, else its workloads'
service account's, else its namespace's; "none" opts out; every node reads it the same way."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from meshd.config.load import load_config
from meshd.discovery.catalog import NodeCatalog, local_catalog, merge
from meshd.errors import ConfigError
from tests.support.catalogs import TD, merged, node, service, workload


def _beta(
    *, waypoint: str | None, accounts: tuple[tuple[str, str, str], ...] = (), ns: bool = True
) -> NodeCatalog:
    web = [
        workload("beta", name, "127.0.0.9", 8080, sa="web", services=("web.default",))
        for name in ("web-1", "web-2")
    ]
    return node(
        "beta",
        "127.0.0.3:15008",
        *web,
        services=(service("web", 80, 8080, "http", waypoint=waypoint),),
        namespaces=(("default", "wp-ns"),) if ns else (),
        accounts=accounts,
    )


SA = (("default", "web", "wp-sa"),)


@pytest.mark.parametrize(
    ("waypoint", "accounts", "ns", "expected"),
    [
        ("wp-own", SA, True, ("wp-own", "service")),  # the service's own binding beats both
        (None, SA, True, ("wp-sa", "service-account")),  # the account's beats the namespace's
        (None, (), True, ("wp-ns", "namespace")),
        (None, (("default", "other", "wp-x"),), False, (None, None)),  # an account none of its workloads use
        ("none", SA, True, (None, None)),  # opted out of both defaults
    ],
)
def test_precedence(
    waypoint: str | None,
    accounts: tuple[tuple[str, str, str], ...],
    ns: bool,
    expected: tuple[str | None, ...],
) -> None:
    local = node("alpha", "127.0.0.2:15008", services=())
    cat = merged(local, (_beta(waypoint=waypoint, accounts=accounts, ns=ns), "127.0.0.3"))
    got = (cat.services["web.default"].waypoint, cat.bindings.get("web.default"))
    assert got == expected
    dumped = cat.to_json()["waypoints"].get("web.default")
    assert dumped == (None if expected[0] is None else {"waypoint": expected[0], "binding": expected[1]})


def test_binding_is_carried_in_the_catalog_and_conflicts_are_reported() -> None:
    beta = _beta(waypoint=None, accounts=SA, ns=False)
    assert NodeCatalog.decode(beta.encode(), trust_domain=TD) == beta  # round trip
    plain = replace(beta, service_accounts=())
    assert b"service_accounts" not in plain.encode()  # catalogs without bindings keep their encoding
    gamma = node("gamma", "127.0.0.4:15008", services=(), accounts=(("default", "web", "wp-other"),))
    local = node("alpha", "127.0.0.2:15008", services=())
    cat = merged(local, (gamma, "x"), (beta, "x"))
    assert cat.services["web.default"].waypoint == "wp-sa"  # beta's (node names in order), reported
    assert any("service account default/web: node gamma sets waypoint 'wp-other'" in c for c in cat.conflicts)


def test_service_account_binding_from_config(tmp_path: Path) -> None:
    cfg = tmp_path / "beta.toml"
    cfg.write_text(
        'node_name = "beta"\ntrust_domain = "home.arpa"\n[discovery]\nmdns = false\n'
        '[[workload]]\nname = "web-1"\nservice_account = "web"\naddress = "127.0.0.9"\nports = [8080]\n'
        'services = ["web"]\n'
        '[[service]]\nname = "web"\nports = [{ port = 80, target_port = 8080, protocol = "http" }]\n'
        '[[service_account]]\nname = "web"\nwaypoint = "wp-sa"\n'
    )
    local = local_catalog(load_config(cfg))
    assert local.service_accounts == (("default", "web", "wp-sa"),)
    resolved = merge(local)
    assert (resolved.services["web.default"].waypoint, resolved.bindings["web.default"]) == (
        "wp-sa",
        "service-account",
    )
    cfg.write_text(cfg.read_text() + '[[service_account]]\nname = "web"\nwaypoint = "wp-2"\n')
    with pytest.raises(ConfigError, match="service account"):
        load_config(cfg)
