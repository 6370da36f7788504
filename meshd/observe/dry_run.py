"""Dry-run authorization policies: count what each would have decided, and say it in the access log.

A dry-run policy never changes a decision (meshd.policy.evaluate); this is where its verdicts become
`meshd_policy_dry_run_total{policy,result}` and the access log's `dry_run` field.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from meshd.observe.metrics import Metrics
from meshd.policy.evaluate import Decision, DryRunResult

log = logging.getLogger("meshd.policy")


def merge(results: Iterable[DryRunResult]) -> tuple[DryRunResult, ...]:
    """One verdict per policy over several evaluations of one request (a waypoint asks once per workload
    of the service, and the request must be allowed for each): a policy that would deny for one denies."""
    out: dict[str, DryRunResult] = {}
    for r in results:
        if r.policy not in out or (out[r.policy].allowed and not r.allowed):
            out[r.policy] = r
    return tuple(out.values())


def record(metrics: Metrics, decision: Decision, results: Sequence[DryRunResult] | None = None) -> str | None:
    """Count the decision's dry-run verdicts; return the access-log field (`policy=result,...`), or None
    when no dry-run policy applied. A verdict that differs from the decision is also logged."""
    results = decision.dry_run if results is None else results
    if not results:
        return None
    for r in results:
        metrics.policy_dry_run.labels(r.policy, r.result).inc()
        if r.allowed != decision.allowed:
            log.info(
                "dry-run policy %s would %s what was %s: %s",
                r.policy,
                r.result,
                "allowed" if decision.allowed else "denied",
                r.reason,
                extra={"policy": r.policy, "dry_run_result": r.result, "enforced": decision.reason},
            )
    return ",".join(f"{r.policy}={r.result}" for r in results)
