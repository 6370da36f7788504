"""The AuthorizationPolicy fields meshd added for Istio parity, table-style; each row cites the Istio
rule it follows (istio.io AuthorizationPolicy reference; istio/ztunnel src/rbac.rs and src/state.rs;
istiod's ambient translation pilot/pkg/serviceregistry/ambient/authorization.go), or says where meshd
differs on purpose (docs/policy.md, "Differences from Istio").

Columns: (id, policy TOML, request, allowed at a waypoint, allowed at a node, the rule followed).
The node decides the request's connection (L4 only); the waypoint decides the request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshd.errors import ConfigError
from meshd.policy.evaluate import (
    ConnectionAttrs,
    Decision,
    DryRunResult,
    RequestAttrs,
    authorize_connection,
    authorize_request,
)
from meshd.policy.explain import explain, render
from meshd.policy.load import load_policy_dir
from tests.support.policy import (
    CLIENT,
    allow,
    conn,
    deny,
    frm,
    policies,
    policy,
    request,
    to,
    when,
)

ZT_RBAC = "istio/ztunnel src/rbac.rs"
ISTIOD = "istiod ambient/authorization.go"
REF = "istio.io AuthorizationPolicy reference"
PROD_WEB = "home.arpa/ns/prod/sa/web"
OTHER_TD = "other.td/ns/default/sa/client"


def parity(*rows: tuple[Any, ...]) -> list[Any]:
    return [pytest.param(*row[1:5], id=f"{row[0]} [{row[5]}]") for row in rows]


SERVICE_ACCOUNTS = parity(
    # rbac_test!(service_accounts): plaintext false, the matching account true, another false
    ("sa exact", allow(frm(service_accounts=["default/client"])), request(), True, True, ZT_RBAC),
    (
        "sa plaintext",
        allow(frm(service_accounts=["default/client"])),
        request(source=None),
        False,
        False,
        ZT_RBAC,
    ),
    (
        "sa other",
        allow(frm(service_accounts=["default/client"])),
        request(source=PROD_WEB),
        False,
        False,
        ZT_RBAC,
    ),
    # ServiceAccountMatch compares namespace and account only: the trust domain is not looked at
    (
        "sa any trust domain",
        allow(frm(service_accounts=["default/client"])),
        request(source=OTHER_TD),
        True,
        True,
        ZT_RBAC,
    ),
    # stringToServiceAccountMatch: a bare account is in the policy's namespace
    ("sa bare = policy ns", allow(frm(service_accounts=["client"])), request(), True, True, ISTIOD),
    (
        "sa bare other ns",
        allow(frm(service_accounts=["web"])),
        request(source=PROD_WEB),
        False,
        False,
        ISTIOD,
    ),
    # rbac_test!(not_service_accounts): plaintext true, the account false, another true
    ("not_sa", allow(frm(not_service_accounts=["default/client"])), request(), False, False, ZT_RBAC),
    (
        "not_sa plaintext",
        allow(frm(not_service_accounts=["default/client"])),
        request(source=None),
        True,
        True,
        ZT_RBAC,
    ),
    (
        "not_sa other",
        allow(frm(not_service_accounts=["default/client"])),
        request(source=PROD_WEB),
        True,
        True,
        ZT_RBAC,
    ),
    (
        "sa OR'd values",
        allow(frm(service_accounts=["prod/web", "default/client"])),
        request(),
        True,
        True,
        REF,
    ),
    (
        "sa AND ip_blocks",
        allow(frm(service_accounts=["default/client"], ip_blocks=["10.0.0.0/8"])),
        request(),
        False,
        False,
        REF,
    ),
)

EMPTY_FROM = parity(
    # Rule.from: "If not set, any source is allowed"; ztunnel rbac_empty_policy: an empty clause matches
    ("from = [] allows", allow({"from": []}), request(source=None), True, True, REF),
    ("from = [{}] allows", allow({"from": [{}]}), request(source=None), True, True, REF),
    ("from = [{}] AND to", allow({"from": [{}], "to": [{"ports": [1]}]}), request(), False, False, REF),
    ("from = [{}] OR'd", allow({"from": [{"namespaces": ["x"]}, {}]}), request(), True, True, REF),
    ("deny from = [{}]", deny({"from": [{}]}), request(), False, False, REF),
)

REQUEST_PRINCIPALS = parity(
    # Source.requestPrincipals needs request authentication (JWT); meshd has none, so a request never
    # carries one: requestPrincipals never match, notRequestPrincipals always do (Istio without a
    # RequestAuthentication). At a node they are L7: istiod's httpSources lists them, and handleRule
    # drops an ALLOW rule with L7 fields ("L7 policies never match for ALLOW").
    ("rp allow", allow(frm(request_principals=["*"])), request(), False, False, REF + "; " + ISTIOD),
    ("not_rp allow", allow(frm(not_request_principals=["*"])), request(), True, False, REF + "; " + ISTIOD),
    ("rp OR L4 rule", allow(frm(request_principals=["*"]), to(ports=[7000])), request(), True, True, ISTIOD),
    (
        "when request.auth.principal",
        allow(when("request.auth.principal", ["*"])),
        request(),
        False,
        False,
        REF,
    ),
    # DENY "require a JWT": at a waypoint it denies every request (no JWT); at a node the L7 field is
    # dropped and meshd fails closed (ztunnel skips the emptied entry: meshd's deliberate difference)
    ("deny not_rp", deny(frm(not_request_principals=["*"])), request(), False, False, "meshd fail-closed"),
    ("deny rp", deny(frm(request_principals=["iss/sub"])), request(), True, False, "meshd fail-closed"),
    (
        "deny rp + namespaces",
        deny(frm(request_principals=["a/b"], namespaces=["prod"])),
        request(),
        True,
        True,
        ISTIOD,
    ),
)

REMOTE_IP = parity(
    # Source.remoteIpBlocks is remote.ip: the original client from X-Forwarded-For / PROXY protocol with
    # trusted proxies; meshd trusts none (numTrustedProxies 0), so it is the peer address, as ipBlocks
    ("remote ip", allow(frm(remote_ip_blocks=["127.0.0.0/8"])), request(), True, True, REF),
    ("remote ip miss", allow(frm(remote_ip_blocks=["10.0.0.0/8"])), request(), False, False, REF),
    (
        "remote ip mapped",
        allow(frm(remote_ip_blocks=["10.0.0.0/8"])),
        request(source_ip="::ffff:10.1.1.1"),
        True,
        True,
        REF,
    ),
    ("not remote ip", allow(frm(not_remote_ip_blocks=["127.0.0.1"])), request(), False, False, REF),
    ("not remote ip other", allow(frm(not_remote_ip_blocks=["10.0.0.0/8"])), request(), True, True, REF),
    ("when remote.ip", allow(when("remote.ip", ["127.0.0.1"])), request(), True, True, REF),
    ("deny remote ip", deny(frm(remote_ip_blocks=["127.0.0.0/8"])), request(), False, False, REF),
)

NETWORK = parity(
    # source.network: meshd's key for the networks to come; until then every peer is in "default"
    ("network default", allow(when("source.network", ["default"])), request(), True, True, "meshd"),
    ("network other", allow(when("source.network", ["lan2"])), request(), False, False, "meshd"),
    ("not network", deny(when("source.network", not_values=["default"])), request(), True, True, "meshd"),
    ("network given", allow(when("source.network", ["lan2"])), request(network="lan2"), True, True, "meshd"),
)


@pytest.mark.parametrize(
    ("toml", "req", "at_waypoint", "at_node"),
    SERVICE_ACCOUNTS + EMPTY_FROM + REQUEST_PRINCIPALS + REMOTE_IP + NETWORK,
)
def test_parity(toml: str, req: RequestAttrs, at_waypoint: bool, at_node: bool) -> None:
    ps = policies(toml)
    assert authorize_request(ps, req).allowed is at_waypoint
    assert authorize_connection(ps, req.connection).allowed is at_node


# ---- dry run (istio.io/dry-run; ztunnel src/state.rs assert_rbac*) --------------------------------


def dry(text: str) -> str:
    return text.replace('action = "', 'dry_run = true\naction = "', 1)


def test_dry_run_wildcards_have_no_effect() -> None:
    """ztunnel assert_rbac_logic_deny_allow: "Dry run policies should have no effect" (a dry-run
    wildcard ALLOW and a dry-run wildcard DENY beside the real policies)."""
    ps = policies(
        dry(allow({}, name="wildcard-allow"))
        + dry(deny({}, name="wildcard-deny"))
        + allow(frm(principals=[CLIENT]), name="real-allow")
        + deny(frm(principals=[PROD_WEB]), name="real-deny")
    )
    assert authorize_connection(ps, conn()).policy == "real-allow"
    assert authorize_connection(ps, conn(PROD_WEB)).policy == "real-deny"
    assert not authorize_connection(ps, conn("home.arpa/ns/default/sa/x")).allowed


def test_dry_run_reports_what_each_policy_would_decide() -> None:
    """ztunnel assert_rbac_dry_run_with_real_policies: a dry-run DENY and a dry-run ALLOW matching the
    client are reported; the real ALLOW decides."""
    ps = policies(
        deny(frm(principals=["home.arpa/ns/default/sa/denyacct"]), name="real-deny")
        + dry(deny(frm(principals=[CLIENT]), name="dry-run-deny"))
        + allow(frm(principals=[CLIENT]), name="real-allow")
        + dry(allow(frm(principals=[CLIENT]), name="dry-run-allow"))
    )
    d = authorize_connection(ps, conn())
    assert (d.allowed, d.policy) == (True, "real-allow")
    assert d.dry_run == (
        DryRunResult("dry-run-allow", "ALLOW", True, "allowed by policy real-allow (rule 1)"),
        DryRunResult("dry-run-deny", "DENY", False, "denied by policy dry-run-deny (rule 1)"),
    )


@pytest.mark.parametrize(
    ("toml", "attrs", "expected"),
    [
        # a DENY that would hit; one that would not
        (dry(deny(frm(namespaces=["default"]), name="d")), conn(), ("deny", "denied by policy d (rule 1)")),
        (dry(deny(frm(namespaces=["prod"]), name="d")), conn(), ("allow", "no ALLOW policy applies")),
        # "If there are no ALLOW policies for the workload, allow": a dry-run ALLOW that would be the
        # first ALLOW policy, and does not match, would deny ("dry-run: no allow policies match")
        (
            dry(allow(frm(namespaces=["prod"]), name="a")),
            conn(),
            ("deny", "no ALLOW policy matched (checked a)"),
        ),
        (
            dry(allow(frm(namespaces=["default"]), name="a")),
            conn(),
            ("allow", "allowed by policy a (rule 1)"),
        ),
        # an enforced DENY decides first whatever the dry-run policy says
        (
            deny({}, name="x") + dry(allow({}, name="a")),
            conn(),
            ("deny", "denied by policy x (rule 1)"),
        ),
    ],
)
def test_dry_run_result(toml: str, attrs: ConnectionAttrs, expected: tuple[str, str]) -> None:
    d = authorize_connection(policies(toml), attrs)
    (r,) = d.dry_run
    assert (r.result, r.reason) == expected
    assert d.allowed is (d.policy != "x")  # never the dry-run policy's doing


def test_dry_run_out_of_scope_is_not_reported() -> None:
    ps = policies(dry(deny({}, name="d", scope='namespace = "prod"')))
    assert authorize_connection(ps, conn()).dry_run == ()


# ---- explain = enforcement ------------------------------------------------------------------------


def test_node_explains_an_l7_deny_rule_as_it_enforces_it() -> None:
    """The contradiction of issue 20: a DENY rule whose only fields are L7, at a node. The headline and
    the rule's line now come from the same evaluation."""
    ps = policies(deny(to(methods=["POST"]), name="d"))
    ex = explain(ps, conn())
    assert ex.decision == Decision(False, "d", "denied by policy d (rule 1)")
    text = render(ex)
    assert "DENY: denied by policy d (rule 1)" in text
    assert (
        "    rule 1: matches\n      (uses L7 fields (methods) a node cannot see: enforced without them"
        in text
    )
    # at a waypoint, a GET does not match the rule, and the explanation says so
    wp = explain(ps, request("GET"))
    assert wp.decision.allowed and "rule 1: no match: to did not match" in render(wp)


def test_explain_shows_dry_run_policies_separately() -> None:
    ps = policies(allow({}, name="open") + dry(deny(frm(namespaces=["default"]), name="trial")))
    text = render(explain(ps, conn()))
    head, _, tail = text.partition("dry run (evaluated, not enforced):")
    assert head.startswith("ALLOW: allowed by policy open (rule 1)") and "trial" not in head
    assert "~ DENY  trial [test.toml:" in tail and "would deny: denied by policy trial (rule 1)" in tail
    assert explain(ps, conn()).to_json()["dry_run"] == [
        {"policy": "trial", "action": "DENY", "result": "deny", "reason": "denied by policy trial (rule 1)"}
    ]


# ---- loading ----------------------------------------------------------------------------------------


def test_node_warns_what_an_l7_deny_rule_will_deny(tmp_path: Path) -> None:
    d = tmp_path / "p"
    d.mkdir()
    (d / "a.toml").write_text(
        '[[authorization]]\nname = "no-post"\naction = "DENY"\n'
        '[[authorization.rules]]\nto = [{ methods = ["POST"] }]\n'
        '[[authorization.rules]]\nfrom = [{ namespaces = ["dev"], request_principals = ["*"] }]\n'
        'to = [{ ports = [8080], paths = ["/admin*"] }]\n'
    )
    _, warnings = load_policy_dir(d, role="node")
    first, second = (w.format() for w in warnings)
    assert first.startswith(f"{d / 'a.toml'}:4: rule 1 of DENY policy 'no-post' uses L7 fields (methods)")
    assert "so it denies every connection to the workloads it applies to" in first
    assert "ztunnel would skip this rule and deny nothing: meshd fails closed on purpose" in first
    assert "uses L7 fields (request_principals, paths)" in second
    assert "denies every connection from namespaces ['dev'], to ports [8080]" in second
    assert "ztunnel would skip" not in second  # L4 fields remain in every entry: ztunnel agrees


def test_dry_run_key_and_service_accounts_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "p"
    d.mkdir()
    (d / "a.toml").write_text(
        '[[authorization]]\nname = "x"\nnamespace = "default"\ndry_run = true\naction = "DENY"\n'
        'rules = [{ from = [{ service_accounts = ["client", "prod/web"] }] }]\n'
    )
    ps, _ = load_policy_dir(d, role="node")
    dumped = ps.config_dump()["authorization"][0]
    assert dumped["dry_run"] is True
    assert dumped["rules"][0]["from"][0]["service_accounts"] == ["client", "prod/web"]
    (d / "b.toml").write_text('[[authorization]]\nname = "y"\ndry_run = "yes"\n')
    with pytest.raises(ConfigError) as info:
        load_policy_dir(d, role="node")
    (p,) = info.value.problems
    assert (Path(p.file).name, p.line) == ("b.toml", 3)


def test_audit_with_service_accounts() -> None:
    """AUDIT reports a service-account match (ztunnel rbac_test!(service_accounts) applied to AUDIT)."""
    ps = policies(policy("AUDIT", frm(service_accounts=["default/client"]), name="audit"))
    assert authorize_connection(ps, conn()).audited == ("audit",)
    assert authorize_connection(ps, conn(None)).audited == ()
