"""What a configuration reload changes, decided before anything is touched. Pure.

A reload parses and validates the new config and policy first; only if both are valid does meshd
apply them, all at once. Some keys cannot change under a running daemon without dropping traffic
or identity (listener addresses, role, trust domain, node name, where certificates come from):
a reload leaves those as they are and says that they take effect after a restart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime

from meshd.config.model import Config, UpstreamConfig
from meshd.identity.spiffe import SpiffeId

RESTART_KEYS = (
    "role",
    "trust_domain",
    "node_name",
    "listen",
    "identity",
    "discovery",
    "capture",
    "dns",
    "tracing",
    "network",
)


@dataclass(frozen=True)
class ReloadOutcome:
    """One reload attempt, as `meshd status`, /config_dump and the admin page show it."""

    at: float  # unix time
    trigger: str  # "SIGHUP", "file change", ...
    applied: bool
    problems: tuple[str, ...] = ()  # why it was refused: `FILE:LINE: what (what to do)` each
    external: bool = False  # refused for a cause outside the files (CA, a taken port): worth a retry

    def to_json(self) -> dict[str, object]:
        return {
            "at": datetime.fromtimestamp(self.at, UTC).isoformat(timespec="seconds"),
            "trigger": self.trigger,
            "result": "applied" if self.applied else "refused",
            "problems": list(self.problems),
        }


@dataclass(frozen=True)
class ReloadPlan:
    config: Config  # the config to run with: the new one, restart-only keys kept as they were
    restart_needed: tuple[str, ...]  # keys whose new value waits for a restart
    upstreams_added: tuple[UpstreamConfig, ...]
    upstreams_removed: tuple[UpstreamConfig, ...]
    identities_added: tuple[SpiffeId, ...]

    @property
    def changes_upstreams(self) -> bool:
        return bool(self.upstreams_added or self.upstreams_removed)


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    restart = tuple(k for k in RESTART_KEYS if getattr(old, k) != getattr(new, k))
    config = dataclasses.replace(new, **{k: getattr(old, k) for k in restart})
    old_ups, new_ups = set(old.upstreams), set(config.upstreams)
    old_ids = {SpiffeId(old.trust_domain, w.namespace, w.sa) for w in old.workloads}
    new_ids = [SpiffeId(config.trust_domain, w.namespace, w.sa) for w in config.workloads]
    return ReloadPlan(
        config=config,
        restart_needed=restart,
        upstreams_added=tuple(u for u in config.upstreams if u not in old_ups),
        upstreams_removed=tuple(u for u in old.upstreams if u not in new_ups),
        identities_added=tuple(dict.fromkeys(i for i in new_ids if i not in old_ids)),
    )
