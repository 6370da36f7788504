"""What the node's proxies share, as one bundle (ztunnel's ProxyInputs): config, identities,
telemetry, and the two values a reload swaps: the merged catalog and the policy set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from meshd.config.model import Config
from meshd.discovery.catalog import Catalog
from meshd.identity.manager import IdentityManager
from meshd.identity.spiffe import SpiffeId
from meshd.observe.accesslog import ConnectionTelemetry
from meshd.observe.metrics import Metrics
from meshd.observe.tracing import Tracer
from meshd.policy.evaluate import PolicySet


@dataclass
class NodeState:
    config: Config
    identities: IdentityManager
    metrics: Metrics
    telemetry: ConnectionTelemetry
    catalog: Catalog  # immutable value; swapped whole on every change
    policy: PolicySet  # immutable value; swapped whole on every reload
    track_inflight: Callable[[int], None]
    tracer: Tracer = field(default_factory=Tracer.disabled)  # spans of connections and requests

    @property
    def node_identity(self) -> SpiffeId:
        return SpiffeId.node(self.config.trust_domain, self.config.node_name)
