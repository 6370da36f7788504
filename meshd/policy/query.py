"""One `policy explain` question, answered against a config and a policy set: which workloads serve the
destination, and what the policy decides for each (meshd.policy.explain). Pure: the CLI asks it with
files it loads, the admin API (`GET /policy/explain`) with the running daemon's config and policy."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshd.config.model import Config, WorkloadConfig
from meshd.identity.spiffe import InvalidSpiffeId, SpiffeId
from meshd.policy.evaluate import ConnectionAttrs, PolicySet, RequestAttrs
from meshd.policy.explain import Explanation, explain, render


class QueryError(ValueError):
    """The question is malformed or names nothing here; `param` is the option at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class NotServedHere(QueryError):
    """The question is well formed, but no workload of this config serves its destination."""


@dataclass(frozen=True)
class ExplainQuery:
    source: str  # a SPIFFE ID / Istio principal, or "plaintext"
    to: str  # SERVICE[.NAMESPACE]:PORT, or WORKLOAD[.NAMESPACE]:PORT
    source_ip: str = "127.0.0.1"
    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_params(cls, params: Mapping[str, list[str]]) -> ExplainQuery:
        """From URL query parameters (`from`, `to`, `source_ip`, `method`, `path`, `host`, `header=K=V`...)."""

        def one(name: str) -> str | None:
            values = params.get(name)
            return values[0] if values else None

        source, to = one("from"), one("to")
        if not source or not to:
            raise QueryError("both from= and to= are needed", "from" if not source else "to")
        return cls(
            source=source,
            to=to,
            source_ip=one("source_ip") or "127.0.0.1",
            method=one("method"),
            path=one("path"),
            host=one("host"),
            headers=parse_headers(params.get("header", [])),
        )


@dataclass(frozen=True)
class Answer:
    workload: WorkloadConfig
    port: int
    explanation: Explanation
    waypoint: str | None = None  # the waypoint that decides HTTP requests to this destination (and where)

    def to_json(self) -> dict[str, Any]:
        text = render(self.explanation)
        if self.waypoint is not None:
            text += (
                f"\nnote: traffic to this service goes through waypoint {self.waypoint}, which decides its L7"
                " rules with the waypoint's own policy; the above is this node's view (ask the waypoint:"
                " meshd policy explain --admin HOST:PORT of its admin API)"
            )
        return {
            "workload": f"{self.workload.name}.{self.workload.namespace}",
            "address": f"{self.workload.address}:{self.port}",
            "text": text,
            "waypoint": self.waypoint,
            **self.explanation.to_json(),
        }


def parse_headers(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in items:
        k, sep, v = h.partition("=")
        if not sep:
            raise QueryError(f"{h!r} is not K=V", "header")
        out[k.strip().lower()] = v
    return out


def destinations(cfg: Config, to: str) -> tuple[list[WorkloadConfig], int]:
    """The workloads of this config that serve `to`, and the (target) port policy sees."""
    target, sep, port_text = to.rpartition(":")
    if not sep or not port_text.isdigit():
        raise QueryError(f"{to!r} is not SERVICE:PORT (e.g. echo.default:7000)", "to")
    port = int(port_text)
    name, _, ns = target.partition(".")
    ns = ns or "default"
    key = f"{name}.{ns}"
    svc = next((s for s in cfg.services if s.key == key), None)
    target_port = next((p.target for p in svc.ports if p.port == port), port) if svc else port
    serving = [
        w
        for w in cfg.workloads
        if w.namespace == ns and (key in w.services or name in w.services) and target_port in w.ports
    ]
    named = [w for w in cfg.workloads if (w.name, w.namespace) == (name, ns) and port in w.ports]
    found = serving or named
    if not found:
        hosted = ", ".join(f"{w.name}.{w.namespace}:{list(w.ports)}" for w in cfg.workloads) or "none"
        raise NotServedHere(
            f"no workload in this config serves {key} port {port} (workloads here: {hosted}); "
            "policy is enforced where the workload runs: ask that node",
            "to",
        )
    return found, (target_port if serving else port)


def answer(
    cfg: Config, policies: PolicySet, q: ExplainQuery, waypoint_of: Callable[[str], str | None] | None = None
) -> list[Answer]:
    """What `policies` decide for `q` at every workload of `cfg` that serves its destination.

    `waypoint_of(service key)` describes the waypoint bound to a service, or None (default: the config's
    own `waypoint =`; a running node passes its merged catalog's answer, namespace defaults included,
    with where the waypoint runs)."""
    try:
        src = None if q.source == "plaintext" else SpiffeId.parse_principal(q.source)
    except InvalidSpiffeId as exc:
        raise QueryError(str(exc), "from") from None
    l7 = any(x is not None for x in (q.method, q.path, q.host)) or bool(q.headers)
    workloads, port = destinations(cfg, q.to)
    target = q.to.rpartition(":")[0]
    name, _, ns = target.partition(".")
    key = f"{name}.{ns or 'default'}"
    if waypoint_of is None:
        svc = next((s for s in cfg.services if s.key == key), None)
        bound = repr(svc.waypoint) if svc is not None and svc.waypoint not in (None, "none") else None
    else:
        bound = waypoint_of(key)
    out = []
    for w in workloads:
        conn = ConnectionAttrs(
            source=src,
            source_ip=q.source_ip,
            destination_ip=w.address,
            destination_port=port,
            workload_namespace=w.namespace,
            workload_name=w.name,
            workload_labels=w.labels,
        )
        attrs: ConnectionAttrs | RequestAttrs = conn
        if l7:
            method = (q.method or "GET").upper()
            attrs = RequestAttrs(conn, method, q.path or "/", q.host or q.to, dict(q.headers))
        out.append(Answer(w, port, explain(policies, attrs), bound))
    return out
