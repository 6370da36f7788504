"""The catalog is pure: decoding, merging, endpoints and the tunnel identity rule, table-tested."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.discovery.catalog import MAX_CATALOG_BYTES, CatalogError, NodeCatalog
from meshd.identity.spiffe import SpiffeId
from tests.support.catalogs import ECHO, TD, merged, node, service, workload


def test_encode_decode_round_trip() -> None:
    cat = node("beta", "127.0.0.3:15008", workload("beta", "echo", "127.0.0.3"))
    assert NodeCatalog.decode(cat.encode(), trust_domain=TD, expected_node="beta") == cat
    assert (
        len(cat.revision) == 16 and cat.revision == NodeCatalog.decode(cat.encode(), trust_domain=TD).revision
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=2), "unsupported catalog version"),
        (lambda d: d.update(trust_domain="evil.example"), "trust domain 'evil.example'"),
        (lambda d: d["workloads"][0].update(address="not-an-ip"), "malformed"),
        (lambda d: d["workloads"][0].update(ports=[0]), "malformed"),
        (lambda d: d["workloads"][0].update(namespace="a/b"), "malformed"),
        (lambda d: d["workloads"][0].update(labels=["x"]), "malformed"),
        (lambda d: d.pop("services"), "malformed"),
        (lambda d: d.update(node="gamma"), "claims node 'gamma' but was served by node 'beta'"),
    ],
)
def test_decode_refuses_bad_catalogs(mutate: object, message: str) -> None:
    data = node("beta", "127.0.0.3:15008", workload("beta", "echo", "127.0.0.3")).to_json()
    mutate(data)  # type: ignore[operator]
    with pytest.raises(CatalogError, match=message):
        NodeCatalog.decode(json.dumps(data).encode(), trust_domain=TD, expected_node="beta")


def test_decode_refuses_huge_and_non_json() -> None:
    with pytest.raises(CatalogError, match="over the"):
        NodeCatalog.decode(b" " * (MAX_CATALOG_BYTES + 1), trust_domain=TD)
    with pytest.raises(CatalogError, match="not JSON"):
        NodeCatalog.decode(b"\xff{", trust_domain=TD)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_decode_never_crashes_on_garbage(data: bytes) -> None:
    with contextlib.suppress(CatalogError):
        NodeCatalog.decode(data, trust_domain=TD)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    )
)
def test_decode_never_crashes_on_odd_json(value: object) -> None:
    base = node("beta", "127.0.0.3:15008", workload("beta", "echo", "127.0.0.3")).to_json()
    for key in ("workloads", "services", "hbone", "node"):
        data = dict(base, **{key: value})
        with contextlib.suppress(CatalogError):
            NodeCatalog.decode(json.dumps(data).encode(), trust_domain=TD)


@pytest.mark.parametrize(
    ("listen", "workloads", "dialed", "expected"),
    [
        ("127.0.0.3:15008", [("echo", "127.0.0.3")], "127.0.0.3", "echo"),
        ("127.0.0.3:15008", [("echo", "127.0.0.3"), ("db", "127.0.0.3")], "127.0.0.3", "node-beta"),
        ("127.0.0.3:15008", [("echo", "127.0.0.9")], "127.0.0.3", "node-beta"),
        ("0.0.0.0:15008", [("echo", "10.0.0.5"), ("db", "10.0.0.6")], "10.0.0.6", "db"),
    ],
)
def test_tunnel_identity_rule(
    listen: str, workloads: list[tuple[str, str]], dialed: str, expected: str
) -> None:
    cat = node("beta", listen, *(workload("beta", n, a) for n, a in workloads))
    assert cat.tunnel_identity(dialed).service_account == expected


def test_two_workloads_of_one_identity_share_an_address() -> None:
    cat = node(
        "beta",
        "127.0.0.3:15008",
        workload("beta", "a", "127.0.0.3", sa="web"),
        workload("beta", "b", "127.0.0.3", sa="web"),
    )
    assert cat.tunnel_identity("127.0.0.3") == SpiffeId(TD, "default", "web")


def test_endpoints_dial_the_node_and_expect_the_tunnel_identity() -> None:
    local = node("alpha", "127.0.0.2:15008", services=())
    beta = node("beta", "0.0.0.0:15008", workload("beta", "echo", "127.0.0.1"))
    gamma = node("gamma", "0.0.0.0:15008", workload("gamma", "echo2", "10.1.2.3"))
    cat = merged(local, (beta, "192.0.2.10"), (gamma, "192.0.2.11"))
    eps = cat.endpoints("echo.default", 7000)
    assert [(e.workload.name, str(e.dial), e.identity.service_account, e.authority) for e in eps] == [
        # loopback workload on a wildcard listener: dial where we reached the node; node identity
        ("echo", "192.0.2.10:15008", "node-beta", "127.0.0.1:7000"),
        # routable workload address on a wildcard listener: dial the workload's own address
        ("echo2", "10.1.2.3:15008", "echo2", "10.1.2.3:7000"),
    ]
    assert cat.endpoints("echo.default", 9999) == []
    assert cat.endpoints("nope.default", 7000) == []


def test_merge_is_deterministic_and_reports_conflicts() -> None:
    local = node("alpha", "127.0.0.2:15008", workload("alpha", "echo", "127.0.0.2"))
    other_echo = service("echo", 7000, 7001)
    b = node("beta", "127.0.0.3:15008", workload("beta", "echo", "127.0.0.3"), services=(other_echo,))
    c = node("cat", "127.0.0.4:15008", workload("cat", "echo", "127.0.0.4"))
    one = merged(local, (c, "x"), (b, "x"))
    two = merged(local, (b, "x"), (c, "x"))
    assert one == two
    assert [w.node for w in one.workloads] == ["alpha"]  # our own claim wins
    assert one.services["echo.default"] == ECHO
    assert any("service echo.default: node beta defines it differently" in c for c in one.conflicts)
    assert any("workload echo.default: claimed by node beta and node alpha" in c for c in one.conflicts)


def test_merge_ignores_a_peer_claiming_to_be_us() -> None:
    local = node("alpha", "127.0.0.2:15008")
    impostor = node("alpha", "127.0.0.9:15008", workload("alpha", "evil", "127.0.0.9"))
    assert merged(local, (impostor, "x")).workloads == ()


def test_revision_changes_with_content() -> None:
    a = node("beta", "127.0.0.3:15008", workload("beta", "echo", "127.0.0.3"))
    assert a.revision != replace(a, workloads=()).revision
