"""Explain = enforcement, as a property: for random policies and connections (and requests), the
explanation's decision is the enforced decision, and no line of it contradicts the headline."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.policy.evaluate import (
    ConnectionAttrs,
    Decision,
    PolicySet,
    RequestAttrs,
    authorize_connection,
    authorize_request,
)
from meshd.policy.explain import Explanation, explain, render
from tests.support.policy import CLIENT, authz, conn, conns, policy_set, requests

# Besides the broad strategies of the kit (most of whose random policies do not apply, or do not
# match), small pools that make policies apply and rules match often, L7 rules at a node included.
_SOURCE_FIELDS = [
    {"principals": [CLIENT]},
    {"principals": ["*"]},
    {"not_principals": ["*"]},
    {"namespaces": ["default"]},
    {"namespaces": ["prod"]},
    {"service_accounts": ["default/client"]},
    {"ip_blocks": ["127.0.0.0/8"]},
    {"not_remote_ip_blocks": ["10.0.0.0/8"]},
    {"request_principals": ["*"]},
    {"not_request_principals": ["*"]},
]
_OPERATION_FIELDS = [
    {"ports": [7000]},
    {"ports": [1]},
    {"not_ports": [7000]},
    {"methods": ["GET"]},
    {"methods": ["POST"]},
    {"paths": ["/api/*"]},
    {"ports": [7000], "methods": ["POST"]},
    {"not_hosts": ["x"]},
]
_CONDITIONS = [
    {"key": "source.ip", "values": ["127.0.0.1"]},
    {"key": "destination.port", "not_values": ["7000"]},
    {"key": "source.network", "values": ["default"]},
    {"key": "request.headers[x-user]", "values": ["alice"]},
    {"key": "request.headers[x-user]", "not_values": ["alice"]},
]
small_rules = st.fixed_dictionaries(
    {},
    optional={
        "from": st.lists(st.sampled_from(_SOURCE_FIELDS), max_size=2),
        "to": st.lists(st.sampled_from(_OPERATION_FIELDS), min_size=1, max_size=2),
        "when": st.lists(st.sampled_from(_CONDITIONS), min_size=1, max_size=2),
    },
)
small_authz = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["a", "b", "c"]),
        "action": st.sampled_from(["ALLOW", "DENY", "DENY", "AUDIT"]),
        "rules": st.lists(small_rules, max_size=3),
    },
    optional={"namespace": st.just("default"), "dry_run": st.booleans()},
)
small_conns = st.builds(
    conn,
    source=st.sampled_from([None, CLIENT, "home.arpa/ns/prod/sa/web"]),
    source_ip=st.sampled_from(["127.0.0.1", "10.0.0.1"]),
    port=st.sampled_from([7000, 1]),
)
any_authz = authz | small_authz
any_conns = conns | small_conns


def check_consistent(ex: Explanation, enforced: Decision) -> None:
    d = ex.decision
    assert d == enforced  # the same decision, audits and dry-run verdicts included
    live = [p for p in ex.policies if not p.dry_run]
    matched = {p.name for p in live if p.matched}
    deny_hits = [p for p in live if p.action == "DENY" and p.matched]
    allow_applies = [p for p in live if p.action == "ALLOW" and p.applies]
    assert set(d.audited) == {p.name for p in live if p.action == "AUDIT" and p.matched}
    if d.policy is not None:
        (deciding,) = [p for p in live if p.name == d.policy]
        rule = int(re.search(r"\(rule (\d+)\)$", d.reason).group(1))  # type: ignore[union-attr]
        assert deciding.applies and deciding.action == ("ALLOW" if d.allowed else "DENY")
        # the rule the headline names matches, and no earlier rule of that policy did
        assert next(r.index for r in deciding.rules if r.matched) == rule
        text = render(ex).splitlines()
        block = text[text.index(next(x for x in text if x.startswith("* "))) + 1 :]
        assert f"    rule {rule}: matches" in block[: 2 * rule]
    if d.allowed:
        assert not deny_hits  # no DENY policy's line says it matched
        if d.policy is None:
            assert d.reason == "no ALLOW policy applies" and not allow_applies
    else:
        assert deny_hits or (allow_applies and not (matched & {p.name for p in allow_applies}))
        if d.policy is None:
            assert not deny_hits and not any(p.matched for p in allow_applies)
    dry_names = {p.name for p in ex.policies if p.dry_run and p.applies}
    assert {r.policy for r in d.dry_run} == dry_names
    # a policy that does not apply has no rule lines
    assert all(not p.rules for p in ex.policies if not p.applies)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(docs=st.lists(any_authz, max_size=5), attrs=any_conns)
def test_explain_decides_as_the_node_enforces(docs: list[dict[str, Any]], attrs: ConnectionAttrs) -> None:
    ps = policy_set(docs)
    check_consistent(explain(ps, attrs), authorize_connection(ps, attrs))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    docs=st.lists(any_authz, max_size=5),
    req=requests(
        any_conns,
        paths=st.sampled_from(["/", "/api/x", "/a.png", "/api?x=1"]),
        hosts=st.sampled_from(["echo.default", "ECHO.default", "x"]),
        headers=st.dictionaries(st.sampled_from(["x-user"]), st.sampled_from(["alice", "x", ""])),
    ),
)
def test_explain_decides_as_the_waypoint_enforces(docs: list[dict[str, Any]], req: RequestAttrs) -> None:
    ps = policy_set(docs)
    check_consistent(explain(ps, req), authorize_request(ps, req))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(docs=st.lists(any_authz, max_size=5), attrs=any_conns)
def test_dry_run_never_changes_the_decision_and_reports_the_enforced_one(
    docs: list[dict[str, Any]], attrs: ConnectionAttrs
) -> None:
    """A dry-run policy's verdict is what the evaluator decides once it is enforced (with the enforced
    ones), and marking policies dry-run leaves the decision as if they were absent."""
    ps = policy_set(docs)
    d = authorize_connection(ps, attrs)
    without = PolicySet([a for a in ps.authorizations if not a.value.dry_run])
    assert dataclasses.replace(d, dry_run=()) == authorize_connection(without, attrs)
    for r in d.dry_run:
        promoted = PolicySet(
            [
                dataclasses.replace(a, value=dataclasses.replace(a.value, dry_run=False))
                if a.value.name == r.policy
                else a
                for a in ps.authorizations
            ]
        )
        assert authorize_connection(promoted, attrs).allowed is r.allowed
