"""Authorization decisions, table-style (as ztunnel's rbac.rs): policy TOML x connection -> allowed?

Each row builds its policy from TOML text, so the tables exercise the same path as a policy file.
`frm`, `to` and `when` build one rule; `allow(...)`/`deny(...)` wrap rules in a policy for default/*.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.policy.evaluate import (
    ConnectionAttrs,
    Decision,
    PolicySet,
    RequestAttrs,
    authorize_connection,
    authorize_request,
    mtls_mode,
)
from tests.support.policy import (
    CLIENT,
    allow,
    authz,
    both,
    cases,
    conn,
    conns,
    deny,
    frm,
    policies,
    policy,
    policy_set,
    request,
    requests,
    to,
    when,
)

# ---- L4 fields, at the node (and the same answer at a waypoint) ---------------------------------

SPIFFE_CLIENT = f"spiffe://{CLIENT}"
OTHER = "home.arpa/ns/prod/sa/web"
V4, V6, MAPPED = "10.1.2.3", "fd00::1", "::ffff:10.0.0.5"

L4_CASES = [
    # principals: both spellings, patterns, plaintext
    ("principal exact", allow(frm(principals=[CLIENT])), conn(), True),
    ("principal spiffe spelling", allow(frm(principals=[SPIFFE_CLIENT])), conn(), True),
    ("principal policy spelling", allow(frm(principals=[CLIENT])), conn(SPIFFE_CLIENT), True),
    ("principal other", allow(frm(principals=[CLIENT])), conn(OTHER), False),
    ("principal other td", allow(frm(principals=[CLIENT])), conn("other.td/ns/default/sa/client"), False),
    ("principal prefix", allow(frm(principals=["home.arpa/ns/default/*"])), conn(), True),
    ("principal prefix spiffe", allow(frm(principals=["spiffe://home.arpa/ns/*"])), conn(), True),
    ("principal prefix miss", allow(frm(principals=["home.arpa/ns/prod/*"])), conn(), False),
    ("principal suffix", allow(frm(principals=["*/sa/client"])), conn(), True),
    ("principal present", allow(frm(principals=["*"])), conn(), True),
    ("principal present spiffe", allow(frm(principals=["spiffe://*"])), conn(), True),
    ("principal present plaintext", allow(frm(principals=["*"])), conn(None), False),
    ("principal plaintext", allow(frm(principals=[CLIENT])), conn(None), False),
    ("not_principal match", allow(frm(not_principals=[CLIENT])), conn(), False),
    ("not_principal spiffe", allow(frm(not_principals=[SPIFFE_CLIENT])), conn(), False),
    ("not_principal other", allow(frm(not_principals=[CLIENT])), conn(OTHER), True),
    ("not_principal plaintext", allow(frm(not_principals=[CLIENT])), conn(None), True),
    ("not_principal present plaintext", allow(frm(not_principals=["*"])), conn(None), True),
    # namespaces (of the peer's identity)
    ("namespace", allow(frm(namespaces=["default"])), conn(), True),
    ("namespace prefix", allow(frm(namespaces=["def*"])), conn(), True),
    ("namespace other", allow(frm(namespaces=["prod"])), conn(), False),
    ("namespace plaintext", allow(frm(namespaces=["default"])), conn(None), False),
    ("not_namespace", allow(frm(not_namespaces=["default"])), conn(), False),
    ("not_namespace other", allow(frm(not_namespaces=["prod"])), conn(), True),
    ("not_namespace plaintext", allow(frm(not_namespaces=["default"])), conn(None), True),
    # ip blocks, v4 and v6
    ("ip block v4", allow(frm(ip_blocks=["10.0.0.0/8"])), conn(source_ip=V4), True),
    ("ip block v4 miss", allow(frm(ip_blocks=["10.0.0.0/8"])), conn(source_ip="192.168.1.1"), False),
    ("ip single address", allow(frm(ip_blocks=[V4])), conn(source_ip=V4), True),
    ("ip v4-mapped v6", allow(frm(ip_blocks=["10.0.0.0/8"])), conn(source_ip=MAPPED), True),
    ("ip block v6", allow(frm(ip_blocks=["fd00::/8"])), conn(source_ip=V6), True),
    ("ip block v6 miss", allow(frm(ip_blocks=["fd00::/8"])), conn(source_ip="2001:db8::1"), False),
    ("ip v6 block, v4 source", allow(frm(ip_blocks=["::/0"])), conn(source_ip=V4), False),
    ("ip block plaintext", allow(frm(ip_blocks=["127.0.0.0/8"])), conn(None), True),
    ("ip unparsable source", allow(frm(ip_blocks=["0.0.0.0/0"])), conn(source_ip="junk"), False),
    ("not_ip_block", allow(frm(not_ip_blocks=["127.0.0.0/8"])), conn(), False),
    ("not_ip_block v6", allow(frm(not_ip_blocks=["::1/128"])), conn(source_ip="::1"), False),
    ("not_ip_block other", allow(frm(not_ip_blocks=["10.0.0.0/8"])), conn(), True),
    # ports
    ("port", allow(to(ports=[7000])), conn(), True),
    ("port other", allow(to(ports=[7000])), conn(port=8080), False),
    ("not_port", allow(to(not_ports=[7000])), conn(), False),
    ("not_port other", allow(to(not_ports=[7000])), conn(port=22), True),
    # when, L4 keys
    ("when source.ip", allow(when("source.ip", ["127.0.0.0/8"])), conn(), True),
    ("when source.ip not", allow(when("source.ip", not_values=["127.0.0.1"])), conn(), False),
    ("when destination.ip", allow(when("destination.ip", ["10.0.0.1"])), conn(), False),
    ("when destination.ip v6", allow(when("destination.ip", ["::1"])), conn(destination_ip="::1"), True),
    ("when destination.port", allow(when("destination.port", ["7000"])), conn(), True),
    ("when destination.port not", allow(when("destination.port", not_values=["7000"])), conn(), False),
    ("when source.namespace", allow(when("source.namespace", ["default"])), conn(), True),
    ("when source.namespace not", allow(when("source.namespace", not_values=["default"])), conn(), False),
    ("when source.principal", allow(when("source.principal", [SPIFFE_CLIENT])), conn(), True),
    ("when source.principal plaintext", allow(when("source.principal", ["*"])), conn(None), False),
    ("when not principal plaintext", allow(when("source.principal", not_values=["*"])), conn(None), True),
    ("when values and not_values", allow(when("source.namespace", ["*"], ["default"])), conn(), False),
    # combinations: fields AND'd, entries OR'd, rules OR'd, from/to/when AND'd
    ("fields AND'd", allow(frm(principals=[CLIENT], namespaces=["prod"])), conn(), False),
    (
        "from entries OR'd",
        allow({"from": [{"namespaces": ["prod"]}, {"principals": [CLIENT]}]}),
        conn(),
        True,
    ),
    ("from AND to", allow({**frm(principals=[CLIENT]), **to(ports=[1])}), conn(), False),
    ("from AND to match", allow({**frm(principals=[CLIENT]), **to(ports=[7000])}), conn(), True),
    ("to entries OR'd", allow({"to": [{"ports": [1]}, {"ports": [7000]}]}), conn(), True),
    ("rules OR'd", allow(to(ports=[1]), frm(namespaces=["default"])), conn(), True),
    (
        "when AND'd",
        allow(both(when("source.ip", ["127.0.0.0/8"]), when("source.namespace", ["x"]))),
        conn(),
        False,
    ),
    # empty rules, as Istio: no rules match nothing; an empty rule matches everything
    ("ALLOW no rules denies", allow(), conn(), False),
    ("ALLOW empty rule allows", allow({}), conn(None, port=1), True),
    ("DENY no rules matches nothing", deny(), conn(), True),
    ("DENY empty rule denies", deny({}), conn(), False),
    ("no policies", "", conn(None), True),
]


@pytest.mark.parametrize(("toml", "attrs", "allowed"), cases(L4_CASES))
def test_l4(toml: str, attrs: ConnectionAttrs, allowed: bool) -> None:
    ps = policies(toml)
    assert authorize_connection(ps, attrs).allowed is allowed
    # L4 fields mean the same at a waypoint
    assert authorize_request(ps, RequestAttrs(attrs, "GET", "/", "echo", {})).allowed is allowed


# ---- L7 fields: full meaning at a waypoint, Istio's ztunnel meaning at a node -------------------

XU = "request.headers[x-user]"
ALICE = {"x-user": "alice"}

L7_CASES = [
    # (id, policy, request, allowed at waypoint, allowed at node)
    ("method", allow(to(methods=["GET"])), request("GET"), True, False),
    ("method other", allow(to(methods=["GET"])), request("POST"), False, False),
    ("method case-sensitive", allow(to(methods=["GET"])), request("get"), False, False),
    ("not_method", allow(to(not_methods=["DELETE"])), request("DELETE"), False, False),
    ("not_method other", allow(to(not_methods=["DELETE"])), request("GET"), True, False),
    ("path exact", allow(to(paths=["/api"])), request(path="/api"), True, False),
    ("path exact other", allow(to(paths=["/api"])), request(path="/api/x"), False, False),
    ("path prefix", allow(to(paths=["/api/*"])), request(path="/api/v1/x"), True, False),
    ("path suffix", allow(to(paths=["*.png"])), request(path="/img/a.png"), True, False),
    ("path query ignored", allow(to(paths=["/api"])), request(path="/api?x=1"), True, False),
    ("not_path", allow(to(not_paths=["/admin*"])), request(path="/admin/x"), False, False),
    ("not_path other", allow(to(not_paths=["/admin*"])), request(path="/"), True, False),
    ("host", allow(to(hosts=["echo.default"])), request(host="echo.default"), True, False),
    ("host case-insensitive", allow(to(hosts=["Echo.Default"])), request(host="ECHO.default"), True, False),
    ("host suffix", allow(to(hosts=["*.default"])), request(host="echo.default"), True, False),
    ("host other", allow(to(hosts=["x.default"])), request(host="echo.default"), False, False),
    ("not_host", allow(to(not_hosts=["echo.*"])), request(host="echo.default"), False, False),
    ("not_host other", allow(to(not_hosts=["x.*"])), request(host="echo.default"), True, False),
    ("header", allow(when(XU, ["alice"])), request(headers=ALICE), True, False),
    (
        "header name case",
        allow(when("request.headers[X-User]", ["alice"])),
        request(headers=ALICE),
        True,
        False,
    ),
    ("header prefix", allow(when(XU, ["al*"])), request(headers=ALICE), True, False),
    ("header other", allow(when(XU, ["bob"])), request(headers=ALICE), False, False),
    ("header missing", allow(when(XU, ["*"])), request(), False, False),
    ("header not_values", allow(when(XU, not_values=["alice"])), request(headers=ALICE), False, False),
    ("header not_values missing", allow(when(XU, not_values=["alice"])), request(), True, False),
    # ALLOW with L4 + L7: at a node the whole rule never matches; other rules still can
    ("allow L4+L7", allow(to(ports=[7000], methods=["GET"])), request(), True, False),
    ("allow L7 rule + L4 rule", allow(to(methods=["GET"]), to(ports=[7000])), request("POST"), True, True),
    # DENY with L7: at a node enforced without the L7 parts (stricter)
    ("deny method", deny(to(methods=["POST"])), request("GET"), True, False),
    ("deny method hit", deny(to(methods=["POST"])), request("POST"), False, False),
    ("deny port+method, other port", deny(to(ports=[9000], methods=["POST"])), request("POST"), True, True),
    ("deny port+method", deny(to(ports=[7000], methods=["POST"])), request("GET"), True, False),
    ("deny not_paths", deny(to(not_paths=["/public/*"])), request(path="/public/a"), True, False),
    ("deny header", deny(when("request.headers[x-evil]", ["*"])), request(), True, False),
    (
        "deny header + L4 when",
        deny(both(when(XU, ["*"]), when("destination.port", ["1"]))),
        request(),
        True,
        True,
    ),
]


@pytest.mark.parametrize(("toml", "req", "at_waypoint", "at_node"), cases(L7_CASES))
def test_l7(toml: str, req: RequestAttrs, at_waypoint: bool, at_node: bool) -> None:
    ps = policies(toml)
    assert authorize_request(ps, req).allowed is at_waypoint
    assert authorize_connection(ps, req.connection).allowed is at_node


# ---- scopes --------------------------------------------------------------------------------------

NS = 'namespace = "default"\n'
V2 = {"version": "v2"}
SCOPE_CASES = [
    # (id, scope lines of a deny-all policy, connection, allowed)
    ("namespace applies", NS, conn(), False),
    ("namespace other", 'namespace = "prod"', conn(), True),
    ("mesh-wide", "", conn(ns="anything", name="x"), False),
    ("workloads listed", NS + 'workloads = ["echo", "web"]', conn(), False),
    ("workloads not listed", NS + 'workloads = ["web"]', conn(), True),
    ("workloads other namespace", 'namespace = "prod"\nworkloads = ["echo"]', conn(), True),
    ("selector match", NS + 'selector = { version = "v2" }', conn(labels={**V2, "a": "b"}), False),
    ("selector mismatch", NS + 'selector = { version = "v2" }', conn(labels={"version": "v1"}), True),
    ("selector missing label", NS + 'selector = { version = "v2" }', conn(), True),
    ("selector all labels", 'selector = { version = "v2", app = "echo" }', conn(labels=V2), True),
    ("selector mesh-wide", 'selector = { version = "v2" }', conn(ns="prod", labels=V2), False),
    (
        "selector and workloads",
        NS + 'workloads = ["web"]\nselector = { version = "v2" }',
        conn(labels=V2),
        True,
    ),
]


@pytest.mark.parametrize(("scope", "attrs", "allowed"), cases(SCOPE_CASES))
def test_scope(scope: str, attrs: ConnectionAttrs, allowed: bool) -> None:
    ps = policies(deny({}, name="deny-all", scope=scope))
    assert authorize_connection(ps, attrs).allowed is allowed


def test_allow_policy_in_other_scope_does_not_restrict() -> None:
    ps = policies(allow(frm(principals=[CLIENT]), scope='namespace = "prod"'))
    d = authorize_connection(ps, conn(None))
    assert d == Decision(True, None, "no ALLOW policy applies", ())


def test_mesh_wide_and_namespace_allow_policies_combine() -> None:
    ps = policies(
        allow(frm(namespaces=["ops"]), name="mesh", scope="") + allow(frm(principals=[CLIENT]), name="ns")
    )
    assert authorize_connection(ps, conn()).policy == "ns"
    assert authorize_connection(ps, conn("home.arpa/ns/ops/sa/x")).policy == "mesh"
    assert not authorize_connection(ps, conn("home.arpa/ns/web/sa/x")).allowed
    # in another namespace only the mesh-wide policy applies
    assert not authorize_connection(ps, conn(ns="prod")).allowed
    assert authorize_connection(ps, conn("home.arpa/ns/ops/sa/x", ns="prod")).allowed


# ---- order, decisions, AUDIT ---------------------------------------------------------------------


def test_deny_wins_over_allow_and_names_the_rule() -> None:
    ps = policies(
        allow({}, name="allow-all") + deny(to(ports=[1]), frm(namespaces=["default"]), name="deny-evil")
    )
    d = authorize_connection(ps, conn())
    assert d == Decision(False, "deny-evil", "denied by policy deny-evil (rule 2)", ())
    d = authorize_connection(ps, conn("home.arpa/ns/prod/sa/x"))
    assert d == Decision(True, "allow-all", "allowed by policy allow-all (rule 1)", ())


def test_no_allow_matched_lists_the_policies_checked() -> None:
    ps = policies(allow(to(ports=[1]), name="a") + allow(to(ports=[2]), name="b"))
    d = authorize_connection(ps, conn())
    assert d == Decision(False, None, "no ALLOW policy matched (checked a, b)", ())


def test_audit_is_reported_and_never_decides() -> None:
    ps = policies(
        policy("AUDIT", {}, name="audit-all")
        + policy("AUDIT", to(ports=[1]), name="audit-port-1")
        + policy("AUDIT", to(methods=["GET"]), name="audit-get")
        + deny(to(ports=[9]), name="deny-9")
    )
    assert authorize_connection(ps, conn()) == Decision(True, None, "no ALLOW policy applies", ("audit-all",))
    d = authorize_connection(ps, conn(port=9))
    assert (d.allowed, d.policy, d.audited) == (False, "deny-9", ("audit-all",))
    # an AUDIT rule with L7 fields matches only where L7 is seen
    assert authorize_request(ps, request("GET")).audited == ("audit-all", "audit-get")


def test_audit_alone_does_not_make_allow_policies_apply() -> None:
    ps = policies(policy("AUDIT", frm(namespaces=["x"])))
    assert authorize_connection(ps, conn(None)).allowed


# ---- mTLS mode -----------------------------------------------------------------------------------

PEER_AUTH = """
[[peer_authentication]]
name = "mesh"
mode = "STRICT"
[[peer_authentication]]
name = "prod"
namespace = "prod"
mode = "PERMISSIVE"
[[peer_authentication]]
name = "prod-db"
namespace = "prod"
workloads = ["db"]
mode = "STRICT"
"""


@pytest.mark.parametrize(
    ("toml", "ns", "name", "configured", "expected"),
    [
        ("", "default", "echo", None, "PERMISSIVE"),
        ("", "default", "echo", "STRICT", "STRICT"),
        (PEER_AUTH, "default", "echo", None, "STRICT"),
        (PEER_AUTH, "default", "echo", "PERMISSIVE", "PERMISSIVE"),
        (PEER_AUTH, "prod", "web", None, "PERMISSIVE"),
        (PEER_AUTH, "prod", "db", None, "STRICT"),
        (PEER_AUTH, "prod", "db", "PERMISSIVE", "PERMISSIVE"),
    ],
)
def test_mtls_mode(toml: str, ns: str, name: str, configured: str | None, expected: str) -> None:
    assert mtls_mode(policies(toml), ns, name, configured) == expected


def test_mtls_mode_rejects_a_bad_configured_value() -> None:
    with pytest.raises(ValueError, match="DISABLE"):
        mtls_mode(PolicySet(), "default", "echo", "DISABLE")


def test_config_dump_has_sources() -> None:
    dump = policies(allow({}) + PEER_AUTH).config_dump()
    assert dump["authorization"][0]["source"] == "test.toml:0"
    assert dump["authorization"][0]["rules"] == [{"from": None, "to": None, "when": None}]
    assert [p["name"] for p in dump["peer_authentication"]] == ["mesh", "prod", "prod-db"]


# ---- Hypothesis: whatever validates, the evaluator answers (never raises) -------------------------
# Pools are valid values (what fails validation is test_policy_load's business); some combinations
# still fail (e.g. a `when` value of the wrong kind) and are skipped. Connections may be odd.


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    docs=st.lists(authz, max_size=4),
    req=requests(
        conns,
        paths=st.text(max_size=10),
        hosts=st.text(max_size=10),
        headers=st.dictionaries(st.sampled_from(["x-user", "host"]), st.text(max_size=5)),
    ),
)
def test_random_policies_never_crash(docs: list[dict[str, Any]], req: RequestAttrs) -> None:
    ps = policy_set(docs)
    for d in (authorize_connection(ps, req.connection), authorize_request(ps, req)):
        assert isinstance(d, Decision)
        assert d.allowed or d.reason.startswith(("denied by", "no ALLOW policy matched"))
