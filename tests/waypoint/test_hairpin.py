"""Hairpin claims (meshd/waypoint/hairpin.py): which node may speak for which client, table-tested on a
catalog of a waypoint `wp`, nodes beta (hosts web-1) and gamma (hosts web-2), service web bound to wp.
The end-to-end path (real daemons) is in test_waypoint_e2e.py."""

from __future__ import annotations

import pytest

from meshd.discovery.catalog import Catalog
from meshd.identity.spiffe import SpiffeId
from meshd.waypoint.hairpin import HairpinClaim, HairpinRefused, accept_claim, bound_service, claim_headers
from tests.support.catalogs import TD, merged, node, service, workload

WEB = service("web", 80, 8080, "http", waypoint="wp")
PLAIN = service("plain", 81, 8080)
WEB1 = workload("beta", "web-1", "10.0.0.3", 8080, sa="web", services=("plain.default", "web.default"))
WEB2 = workload("gamma", "web-2", "10.0.0.4", 8080, sa="web", services=("web.default",))
CLIENT = SpiffeId(TD, "default", "client")
BETA = SpiffeId.node(TD, "beta")


def catalog() -> Catalog:
    wp = node("wp", "10.0.0.5:15008", services=(), role="waypoint")
    beta = node("beta", "10.0.0.3:15008", WEB1, services=(WEB, PLAIN))
    gamma = node("gamma", "10.0.0.4:15008", WEB2, services=(WEB,))
    return merged(wp, (beta, "10.0.0.3"), (gamma, "10.0.0.4"))


def claim(peer: SpiffeId, source: str | None, target: str | None) -> HairpinClaim | None:
    cat = catalog()
    svc = cat.services["web.default"]
    return accept_claim(cat, peer, svc, svc.ports[0], source, target)


def test_the_hosting_node_may_speak_for_clients_of_its_workload() -> None:
    headers = dict(claim_headers(CLIENT, "10.0.0.3:8080"))
    got = claim(BETA, headers["x-meshd-hairpin-source"], headers["x-meshd-hairpin-target"])
    assert got is not None
    assert (got.source, got.target, got.workload.name) == (CLIENT, ("10.0.0.3", 8080), "web-1")


def test_no_claim_is_an_ordinary_client() -> None:
    assert claim(BETA, None, None) is None


@pytest.mark.parametrize(
    ("peer", "source", "target", "why"),
    [
        # gamma hosts web-2, not web-1: it may not borrow a client's identity to reach beta's workload
        (SpiffeId.node(TD, "gamma"), CLIENT.uri, "10.0.0.3:8080", "only its node, 'beta'"),
        # a workload identity is not a node
        (CLIENT, CLIENT.uri, "10.0.0.3:8080", "only its node, 'beta'"),
        # the waypoint's own identity (and any node not in the catalog)
        (SpiffeId.node(TD, "wp"), CLIENT.uri, "10.0.0.3:8080", "only its node"),
        (SpiffeId.node(TD, "nobody"), CLIENT.uri, "10.0.0.3:8080", "only its node"),
        (BETA, CLIENT.uri, None, "needs both"),
        (BETA, None, "10.0.0.3:8080", "needs both"),
        (BETA, "spiffe://other.example/ns/default/sa/client", "10.0.0.3:8080", "not of trust domain"),
        (BETA, "not-a-spiffe-id", "10.0.0.3:8080", "x-meshd-hairpin-source"),
        (BETA, CLIENT.uri, "web-1:8080", "is not ip:port"),
        (BETA, CLIENT.uri, "10.0.0.3:9999", "not the target port"),
        (BETA, CLIENT.uri, "10.0.0.9:8080", "no workload of web.default"),
    ],
)
def test_claims_that_would_widen_a_nodes_reach_are_refused(
    peer: SpiffeId, source: str | None, target: str | None, why: str
) -> None:
    with pytest.raises(HairpinRefused, match=why):
        claim(peer, source, target)


def test_bound_service_picks_the_service_with_a_waypoint_on_that_port() -> None:
    cat = catalog()
    found = bound_service(cat, WEB1, 8080)
    assert found is not None and (found[0].key, found[1].port) == ("web.default", 80)
    assert bound_service(cat, WEB1, 9090) is None
