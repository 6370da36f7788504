"""Networks in the catalog, the network catalog a gateway serves, and the gateway's admission of outer
CONNECTs: all pure, table-tested. The data path itself is tested in tests/netns/test_gateway_netns.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshd.config.load import load_config
from meshd.config.model import GatewayConfig
from meshd.dataplane.proxied import Refused
from meshd.discovery.catalog import Catalog, CatalogError, GatewayEntry, NodeCatalog, WorkloadEntry
from meshd.discovery.networks import decode_network_catalog, encode_network_catalog, served_catalogs
from meshd.errors import ConfigError
from meshd.gateway.admission import admit, admit_catalog_read
from meshd.hbone.target import parse_connect_target
from meshd.identity.spiffe import SpiffeId
from meshd.units import Address
from tests.support.catalogs import TD, merged, node, service, workload


def site_node(name: str, hbone: str, network: str, *echo_addresses: str) -> NodeCatalog:
    """Node `name` of `network` with an echo workload at each of `echo_addresses`."""
    echoes = (workload(name, "echo", address, network=network) for address in echo_addresses)
    return node(name, hbone, *echoes, network=network)


def gateway_node(name: str, network: str, public: str | None) -> NodeCatalog:
    """Gateway `name` (listening on 0.0.0.0:15008) fronting `network`, dialable at `public` if given."""
    entry = GatewayEntry(None if public is None else Address.parse(public), (network,))
    return node(name, "0.0.0.0:15008", services=(), role="gateway", network=network, gateway=entry)


A1 = site_node("a1", "10.0.1.11:15008", "site-a")
B1 = site_node("b1", "10.0.2.11:15008", "site-b", "10.0.2.11")
GWB = gateway_node("gwb", "site-b", "198.51.100.2:15008")
GWA = gateway_node("gwa", "site-a", "198.51.100.1:15008")


def gateway_b_view() -> Catalog:
    """gwb's merged catalog: itself, b1 (its own network, reached at 10.0.2.11), a1 and gwa (fetched)."""
    return merged(GWB, (B1, "10.0.2.11"), (A1, ""), (GWA, ""))


def test_a_single_network_catalog_keeps_its_encoding() -> None:
    plain = node("n", "10.0.0.1:15008", services=())
    assert "network" not in plain.to_json() and "gateway" not in plain.to_json()
    back = NodeCatalog.decode(plain.encode(), trust_domain=TD)
    assert back == plain and back.network == "default"


def test_network_and_gateway_round_trip_and_reach_the_workloads() -> None:
    for cat in (B1, GWB):
        back = NodeCatalog.decode(cat.encode(), trust_domain=TD)
        assert back == cat
    assert NodeCatalog.decode(B1.encode(), trust_domain=TD).workloads[0].network == "site-b"
    reverse = gateway_node("gw", "x", None)
    assert NodeCatalog.decode(reverse.encode(), trust_domain=TD).gateway == GatewayEntry(None, ("x",))


@pytest.mark.parametrize("gateway", [[], "site-b", {"public": None}, {"networks": "site-b"}])
def test_a_malformed_gateway_entry_is_a_catalog_error(gateway: object) -> None:
    # Found by the network-catalog fuzz target: `"gateway": []` raised AttributeError, not CatalogError.
    raw = json.loads(GWB.encode())
    raw["gateway"] = gateway
    with pytest.raises(CatalogError, match="gateway must be a table"):
        NodeCatalog.decode(json.dumps(raw).encode(), trust_domain=TD)


def test_gateways_for_lists_only_dialable_gateways_of_that_network() -> None:
    cat = merged(A1, (GWA, "10.0.1.1"), (GWB, ""), (B1, ""))
    assert [g.node for g in cat.gateways_for("site-b")] == ["gwb"]
    assert [g.node for g in cat.gateways_for("site-a")] == ["gwa"]
    assert cat.gateways_for("elsewhere") == []
    nat = gateway_node("gwb", "site-b", None)
    assert merged(A1, (nat, "")).gateways_for("site-b") == []


def test_the_network_catalog_serves_fronted_and_fetched_networks_and_drops_the_receivers() -> None:
    cat = merged(GWB, (B1, "10.0.2.11"), (A1, ""))
    served = served_catalogs(cat, ("site-b",), [GWA])
    assert [c.node for c in served] == ["b1", "gwa", "gwb"]  # a1 is not site B's; gwa came fetched
    body = encode_network_catalog("site-b", served)
    assert [c.node for c in decode_network_catalog(body, trust_domain=TD, own_network="site-a")] == [
        "b1",
        "gwb",
    ]
    assert [c.node for c in decode_network_catalog(body, trust_domain=TD, own_network="site-b")] == ["gwa"]
    with pytest.raises(CatalogError, match="trust domain"):
        decode_network_catalog(body, trust_domain="other.example", own_network="site-a")
    for bad in (
        b"[]",
        b"{",
        json.dumps({"version": 1}).encode(),
        json.dumps({"version": 2, "catalogs": []}).encode(),
    ):
        with pytest.raises(CatalogError):
            decode_network_catalog(bad, trust_domain=TD, own_network="site-a")


NODE_A1 = SpiffeId.node(TD, "a1")
NODE_B1 = SpiffeId.node(TD, "b1")


@pytest.mark.parametrize(
    ("peer", "authority", "config", "status", "why"),
    [
        (SpiffeId(TD, "default", "client"), "10.0.2.11:7000", GatewayConfig(), 401, "nor a workload"),
        (
            SpiffeId.node(TD, "stranger"),
            "10.0.2.11:7000",
            GatewayConfig(),
            401,
            "no network this gateway knows",
        ),
        (NODE_B1, "10.0.2.11:7000", GatewayConfig(), 401, "dial directly"),
        (NODE_A1, "10.0.2.99:7000", GatewayConfig(), 503, "no node or workload"),
        (NODE_A1, "10.0.2.11:22", GatewayConfig(), 503, "no node or workload"),
        (NODE_A1, "echo.default:7000", GatewayConfig(), 400, "not ip:port"),
        (NODE_A1, "10.0.2.11:7000", GatewayConfig(allow_networks=("site-c",)), 401, "allow_networks"),
        (NODE_A1, "10.0.2.11:7000", GatewayConfig(allow_nodes=("a2",)), 401, "allow_nodes"),
    ],
)
def test_admission_refuses(
    peer: SpiffeId, authority: str, config: GatewayConfig, status: int, why: str
) -> None:
    with pytest.raises(Refused, match=why) as info:
        admit(gateway_b_view(), config, ("site-b",), peer, parse_connect_target(authority))
    assert info.value.status == status


def test_admission_maps_a_workload_or_a_node_to_its_nodes_hbone_endpoint() -> None:
    cat = gateway_b_view()
    to_workload = admit(cat, GatewayConfig(), ("site-b",), NODE_A1, parse_connect_target("10.0.2.11:7000"))
    to_node = admit(
        cat,
        GatewayConfig(allow_networks=("site-a",), allow_nodes=("a1",)),
        ("site-b",),
        NODE_A1,
        parse_connect_target("10.0.2.11:15008"),
    )
    for forward in (to_workload, to_node):
        assert (forward.source_node, forward.source_network, forward.target_node) == ("a1", "site-a", "b1")
        assert forward.target == Address("10.0.2.11", 15008) and forward.via_reverse is None


def test_admission_through_a_reverse_connection() -> None:
    """gwa holds site B's reverse connection: a1 (site A, which gwa fronts) may go to site B through it,
    b1 may not use it to come back into its own network."""
    cat = merged(GWA, (A1, "10.0.1.11"), (B1, ""), (GWB, ""))
    forward = admit(
        cat, GatewayConfig(), ("site-a",), NODE_A1, parse_connect_target("10.0.2.11:7000"), reverse={"site-b"}
    )
    assert forward.via_reverse == "site-b" and forward.target_node == "b1"
    with pytest.raises(Refused, match="dial directly"):
        admit(
            cat,
            GatewayConfig(),
            ("site-a",),
            NODE_B1,
            parse_connect_target("10.0.2.11:7000"),
            reverse={"site-b"},
        )
    with pytest.raises(Refused, match="no node or workload"):
        admit(cat, GatewayConfig(), ("site-a",), NODE_A1, parse_connect_target("10.0.2.11:7000"))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('role = "gateway"\n', "gateway.public"),
        ('role = "gateway"\n[gateway]\nreverse = true\n', "gateway.remote"),
        ('network = "Site A"\n', "network"),
        (
            'role = "gateway"\n[gateway]\npublic = "10.0.0.1:15008"\nmax_connections_per_network = 0\n',
            "max_connections",
        ),
    ],
)
def test_gateway_config_errors_say_what_to_set(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "meshd.toml"
    path.write_text('node_name = "gw"\n' + text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert problem in "\n".join(p.format() for p in info.value.problems)


def test_a_gateway_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "meshd.toml"
    path.write_text(
        'node_name = "gw"\nrole = "gateway"\nnetwork = "home"\n'
        '[gateway]\npublic = "203.0.113.7:15008"\nremote = ["198.51.100.2:15008"]\nallow_networks = ["vps"]\n'
    )
    cfg = load_config(path)
    assert cfg.fronted_networks == ("home",) and cfg.gateway.remote == (Address("198.51.100.2", 15008),)


def test_who_may_read_the_network_catalog() -> None:
    cat = gateway_b_view()
    fronted = ("site-b",)
    admit_catalog_read(cat, GatewayConfig(), fronted, NODE_A1)  # another network: yes
    admit_catalog_read(cat, GatewayConfig(), fronted, NODE_B1)  # our own: yes
    admit_catalog_read(
        cat, GatewayConfig(allow_networks=("site-c",)), fronted, SpiffeId.node(TD, "new")
    )  # unknown
    with pytest.raises(Refused, match="allow_networks") as info:
        admit_catalog_read(cat, GatewayConfig(allow_networks=("site-c",)), fronted, NODE_A1)
    assert info.value.status == 403
    with pytest.raises(Refused, match="node identities only"):
        admit_catalog_read(cat, GatewayConfig(), fronted, SpiffeId(TD, "default", "client"))


# ---- ztunnel's double HBONE: a service hostname outside, a workload identity on the outer TLS --------

CLIENT = SpiffeId(TD, "default", "client")
ECHO_HOST = "echo.default.svc.cluster.local:7000"


def ztunnel_view(*extra: tuple[NodeCatalog, str]) -> Catalog:
    """gwb's view with a1 running the `client` workload and a second echo endpoint on b2."""
    a1 = node("a1", "10.0.1.11:15008", client_on("a1", "10.0.1.11", "site-a"), network="site-a")
    echo2 = workload("b2", "echo-2", "10.0.2.12", sa="echo", network="site-b")
    b2 = node("b2", "10.0.2.12:15008", echo2, network="site-b")
    return merged(GWB, (B1, "10.0.2.11"), (b2, "10.0.2.12"), (a1, ""), (GWA, ""), *extra)


def client_on(node_name: str, address: str, network: str, name: str = "client") -> WorkloadEntry:
    return workload(node_name, name, address, 8000, sa="client", services=(), network=network)


def test_a_service_hostname_is_routed_round_robin_to_the_services_endpoints() -> None:
    cat, rotations = ztunnel_view(), {}  # type: ignore[var-annotated]
    picks = [
        admit(cat, GatewayConfig(), ("site-b",), CLIENT, parse_connect_target(ECHO_HOST), rotations=rotations)
        for _ in range(4)
    ]
    assert [(f.target_node, f.target) for f in picks] == [
        ("b1", Address("10.0.2.11", 15008)),
        ("b2", Address("10.0.2.12", 15008)),
    ] * 2
    assert {(f.source_node, f.source_network, f.service) for f in picks} == {("a1", "site-a", "echo.default")}
    # A meshd node identity may name the service too (meshd's own nodes do).
    by_node = admit(cat, GatewayConfig(), ("site-b",), NODE_A1, parse_connect_target(ECHO_HOST.upper()))
    assert by_node.service == "echo.default" and by_node.source_node == "a1"


@pytest.mark.parametrize(
    ("peer", "authority", "config", "status", "why"),
    [
        (CLIENT, "nosuch.default.svc.cluster.local:7000", GatewayConfig(), 503, "no service nosuch.default"),
        (CLIENT, "echo.default.svc.cluster.local:7001", GatewayConfig(), 503, "has no port 7001"),
        (CLIENT, "echo.default:7000", GatewayConfig(), 400, "not ip:port nor a service"),
        (CLIENT, "echo.default.mesh:7000", GatewayConfig(), 400, "svc.cluster.local"),
        (CLIENT, ECHO_HOST, GatewayConfig(allow_networks=("site-c",)), 401, "allow_networks"),
        (
            CLIENT,
            ECHO_HOST,
            GatewayConfig(allow_nodes=("a2",)),
            401,
            "node 'a1' is not in gateway.allow_nodes",
        ),
        (SpiffeId(TD, "default", "echo"), ECHO_HOST, GatewayConfig(), 401, "dial directly"),
        (SpiffeId(TD, "default", "stranger"), ECHO_HOST, GatewayConfig(), 401, "nor a workload"),
        (SpiffeId(TD, "default", "client"), None, GatewayConfig(), 400, "not ip:port"),
    ],
)
def test_service_hostname_and_workload_identity_refusals(
    peer: SpiffeId, authority: str | None, config: GatewayConfig, status: int, why: str
) -> None:
    target = parse_connect_target(authority) if authority is not None else None
    with pytest.raises(Refused, match=why) as info:
        admit(ztunnel_view(), config, ("site-b",), peer, target)
    assert info.value.status == status


def test_a_workload_identity_in_two_networks_is_refused() -> None:
    other = client_on("c1", "10.0.3.11", "site-c", "client-c")
    c1 = node("c1", "10.0.3.11:15008", other, network="site-c")
    with pytest.raises(Refused, match="several networks") as info:
        admit(
            ztunnel_view((c1, "")),
            GatewayConfig(),
            ("site-b",),
            CLIENT,
            parse_connect_target(ECHO_HOST),
        )
    assert info.value.status == 401


def test_a_service_behind_a_waypoint_goes_to_its_waypoint_and_without_endpoints_here_is_503() -> None:
    web = service("web", 80, 8080, "http", waypoint="wb")
    b3 = node("b3", "10.0.2.13:15008", services=(web,), network="site-b")
    web_host = parse_connect_target("web.default.svc.cluster.local:80")
    cat = ztunnel_view((b3, "10.0.2.13"))
    with pytest.raises(Refused, match="uses waypoint 'wb', which is not in the catalog") as info:
        admit(cat, GatewayConfig(), ("site-b",), CLIENT, web_host)
    assert info.value.status == 503
    # ztunnel names the service whether or not it has a waypoint: the gateway sends it to the waypoint.
    wb = node("wb", "0.0.0.0:15008", services=(), role="waypoint", network="site-b")
    forward = admit(
        ztunnel_view((b3, "10.0.2.13"), (wb, "10.0.2.14")),
        GatewayConfig(),
        ("site-b",),
        CLIENT,
        web_host,
    )
    assert (forward.target_node, forward.target, forward.service) == (
        "wb",
        Address("10.0.2.14", 15008),
        "web.default",
    )
    wc = node("wb", "10.0.3.12:15008", services=(), role="waypoint", network="site-c")
    with pytest.raises(Refused, match="in no network this gateway fronts"):
        admit(
            ztunnel_view((b3, "10.0.2.13"), (wc, "")),
            GatewayConfig(),
            ("site-b",),
            CLIENT,
            web_host,
        )
    # echo's endpoints are all in site B: a gateway fronting only site C has none to pick.
    with pytest.raises(Refused, match="no endpoint in network site-c"):
        admit(cat, GatewayConfig(), ("site-c",), CLIENT, parse_connect_target(ECHO_HOST))
