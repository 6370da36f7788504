"""Why a connection or request is allowed or denied: the decision, the policy and rule that made
it (file:line), and for every other policy why it did not apply or did not match. Pure.

The explanation is the evaluation's own trace (`PolicySet.evaluate(attrs, trace=True)`): the same
routine and the same compiled predicates decide on the data path, so an explanation cannot disagree
with what the node or waypoint enforces. This module only turns that trace into JSON and text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from meshd.policy.evaluate import (
    ConnectionAttrs,
    Decision,
    Evaluation,
    PolicySet,
    PolicyTrace,
    RequestAttrs,
    RuleTrace,
)
from meshd.policy.model import AuthorizationPolicy

# The trace's shapes, under the names explain's JSON has always used.
PolicyVerdict = PolicyTrace
RuleVerdict = RuleTrace


@dataclass(frozen=True)
class Explanation:
    decision: Decision
    at: str  # "node" or "waypoint"
    policies: tuple[PolicyTrace, ...] = ()

    @classmethod
    def of(cls, ev: Evaluation) -> Explanation:
        return cls(ev.decision, ev.at, ev.policies)

    def to_json(self) -> dict[str, Any]:
        return {
            "allowed": self.decision.allowed,
            "policy": self.decision.policy,
            "reason": self.decision.reason,
            "audited": list(self.decision.audited),
            "dry_run": [
                {"policy": r.policy, "action": r.action, "result": r.result, "reason": r.reason}
                for r in self.decision.dry_run
            ],
            "evaluated_at": self.at,
            "policies": [dataclasses.asdict(p) for p in self.policies],
        }


def explain(policies: PolicySet, attrs: ConnectionAttrs | RequestAttrs) -> Explanation:
    """Decide as the node (ConnectionAttrs) or the waypoint (RequestAttrs) would, and say why."""
    return Explanation.of(policies.evaluate(attrs, trace=True))


def uses_source_ip(policy: AuthorizationPolicy) -> bool:
    """Does the policy look at the client's address (`ip_blocks`, `remote_ip_blocks`, their `not_`
    twins, `when source.ip` / `remote.ip`)?"""
    return any(
        any(
            src.ip_blocks or src.not_ip_blocks or src.remote_ip_blocks or src.not_remote_ip_blocks
            for src in rule.sources or ()
        )
        or any(c.key in ("source.ip", "remote.ip") for c in rule.conditions or ())
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


def _rule_lines(p: PolicyTrace) -> list[str]:
    lines = []
    for r in p.rules:
        if r.matched:
            lines.append(f"    rule {r.index}: matches")
        elif r.failed:
            lines.append(f"    rule {r.index}: no match: {', '.join(r.failed)} did not match")
        else:
            lines.append(f"    rule {r.index}: no match")
        if r.note:
            lines.append(f"      ({r.note})")
    return lines


def render(ex: Explanation) -> str:
    d = ex.decision
    deciding = next((p for p in ex.policies if p.name == d.policy and not p.dry_run), None)
    head = "ALLOW" if d.allowed else "DENY"
    lines = [
        f"{head}: {d.reason}" + (f" [{deciding.source}]" if deciding else "") + f" (as the {ex.at} decides)"
    ]
    if d.audited:
        lines.append(f"audited by: {', '.join(d.audited)}")
    enforced = [p for p in ex.policies if not p.dry_run]
    for p in enforced:
        mark = "*" if p is deciding else ("+" if p.matched else "-")
        lines.append(f"{mark} {p.action:5} {p.name} [{p.source}]: {p.scope_reason}")
        lines += _rule_lines(p)
    if not ex.policies:
        lines.append("(no authorization policies loaded: everything is allowed)")
    dry = [p for p in ex.policies if p.dry_run]
    if dry:
        results = {r.policy: r for r in d.dry_run}
        lines.append("dry run (evaluated, not enforced):")
        for p in dry:
            r = results.get(p.name)
            would = f"would {r.result}: {r.reason}" if r is not None else "does not apply here"
            lines.append(f"~ {p.action:5} {p.name} [{p.source}]: {p.scope_reason}; {would}")
            lines += _rule_lines(p)
    return "\n".join(lines)
