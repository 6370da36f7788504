"""Why a connection or request is allowed or denied: the decision, the policy and rule that made
it (file:line), and for every other policy why it did not apply or did not match. Pure.

It asks the real evaluator, never a second implementation: each question ("does this policy apply
to the workload?", "does rule 2's `from` match?") is put to `authorize_*` as a one-policy set, so
the explanation cannot drift from what the node or waypoint enforces.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from meshd.policy.evaluate import (
    ConnectionAttrs,
    Decision,
    PolicySet,
    RequestAttrs,
    authorize_connection,
    authorize_request,
)
from meshd.policy.model import AuthorizationPolicy, Located, Origin, Rule

_PROBE_ORIGIN = Origin("<explain>", None)


@dataclass(frozen=True)
class RuleVerdict:
    index: int  # 1-based, as decisions name them
    matched: bool
    failed: tuple[str, ...] = ()  # which of from / to / when did not match
    note: str | None = None


@dataclass(frozen=True)
class PolicyVerdict:
    name: str
    action: str
    source: str  # FILE:LINE
    applies: bool
    scope_reason: str  # why it applies or not
    rules: tuple[RuleVerdict, ...] = ()

    @property
    def matched(self) -> bool:
        return self.applies and any(r.matched for r in self.rules)


@dataclass(frozen=True)
class Explanation:
    decision: Decision
    at: str  # "node" or "waypoint"
    policies: tuple[PolicyVerdict, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "allowed": self.decision.allowed,
            "policy": self.decision.policy,
            "reason": self.decision.reason,
            "audited": list(self.decision.audited),
            "evaluated_at": self.at,
            "policies": [dataclasses.asdict(p) for p in self.policies],
        }


def _decide(policy: AuthorizationPolicy, attrs: ConnectionAttrs | RequestAttrs) -> Decision:
    one = PolicySet([Located(policy, _PROBE_ORIGIN)])
    if isinstance(attrs, RequestAttrs):
        return authorize_request(one, attrs)
    return authorize_connection(one, attrs)


def _matches(rule: Rule, attrs: ConnectionAttrs | RequestAttrs) -> bool:
    probe = AuthorizationPolicy(name="explain-probe", action="ALLOW", rules=(rule,))
    return _decide(probe, attrs).allowed


def _scope(policy: AuthorizationPolicy, conn: ConnectionAttrs) -> tuple[bool, str]:
    probe = dataclasses.replace(policy, action="ALLOW", rules=(Rule(),))
    applies = _decide(probe, conn).policy == policy.name
    if applies:
        return True, "applies to the workload"
    if policy.namespace is not None and policy.namespace != conn.workload_namespace:
        return (
            False,
            f"scoped to namespace {policy.namespace!r}, the workload is in {conn.workload_namespace!r}",
        )
    if policy.workloads and conn.workload_name not in policy.workloads:
        return False, f"scoped to workloads {list(policy.workloads)}, not {conn.workload_name!r}"
    return (
        False,
        f"selector {policy.selector} does not match the workload's labels {dict(conn.workload_labels)}",
    )


def _rule_verdict(index: int, rule: Rule, attrs: ConnectionAttrs | RequestAttrs, at: str) -> RuleVerdict:
    if _matches(rule, attrs):
        return RuleVerdict(index, True)
    parts = (
        ("from", Rule(sources=rule.sources)),
        ("to", Rule(operations=rule.operations)),
        ("when", Rule(conditions=rule.conditions)),
    )
    failed = tuple(name for name, part in parts if not _matches(part, attrs))
    note = None
    if at == "node" and rule.has_l7:
        note = "uses L7 fields a node cannot see (methods, paths, hosts, request headers): evaluated at a waypoint"
    return RuleVerdict(index, False, failed or ("the combination",), note)


def explain(policies: PolicySet, attrs: ConnectionAttrs | RequestAttrs) -> Explanation:
    """Decide as the node (ConnectionAttrs) or the waypoint (RequestAttrs) would, and say why."""
    at = "waypoint" if isinstance(attrs, RequestAttrs) else "node"
    conn = attrs.connection if isinstance(attrs, RequestAttrs) else attrs
    decision = (
        authorize_request(policies, attrs)
        if isinstance(attrs, RequestAttrs)
        else authorize_connection(policies, attrs)
    )
    verdicts = []
    for located in policies.authorizations:
        p = located.value
        applies, why = _scope(p, conn)
        rules = tuple(_rule_verdict(i, r, attrs, at) for i, r in enumerate(p.rules, 1)) if applies else ()
        if applies and not p.rules:
            why += "; it has no rules, so it matches nothing"
        verdicts.append(PolicyVerdict(p.name, p.action, str(located.origin), applies, why, rules))
    return Explanation(decision, at, tuple(verdicts))


def uses_source_ip(policy: AuthorizationPolicy) -> bool:
    """Does the policy look at the client's address (`ip_blocks`, `not_ip_blocks`, `when source.ip`)?"""
    return any(
        any(src.ip_blocks or src.not_ip_blocks for src in rule.sources or ())
        or any(c.key == "source.ip" for c in rule.conditions or ())
        for rule in policy.rules
    )


def source_ip_dependence(policies: PolicySet, ex: Explanation) -> tuple[str, ...]:
    """Names of the policies applying here whose answer can change with the source address."""
    applying = {p.name for p in ex.policies if p.applies}
    return tuple(
        located.value.name
        for located in policies.authorizations
        if located.value.name in applying and uses_source_ip(located.value)
    )


def render(ex: Explanation) -> str:
    d = ex.decision
    deciding = next((p for p in ex.policies if p.name == d.policy), None)
    head = "ALLOW" if d.allowed else "DENY"
    lines = [
        f"{head}: {d.reason}" + (f" [{deciding.source}]" if deciding else "") + f" (as the {ex.at} decides)"
    ]
    if d.audited:
        lines.append(f"audited by: {', '.join(d.audited)}")
    for p in ex.policies:
        mark = "*" if p.name == d.policy else ("+" if p.matched else "-")
        lines.append(f"{mark} {p.action:5} {p.name} [{p.source}]: {p.scope_reason}")
        for r in p.rules:
            if r.matched:
                lines.append(f"    rule {r.index}: matches")
            else:
                lines.append(f"    rule {r.index}: no match: {', '.join(r.failed)} did not match")
            if r.note:
                lines.append(f"      ({r.note})")
    if not ex.policies:
        lines.append("(no authorization policies loaded: everything is allowed)")
    return "\n".join(lines)
