"""One `policy explain` question, answered against a config and a policy set: which workloads serve the
destination, and what the policy decides for each (meshd.policy.explain). Pure: the CLI asks it with
files it loads, the admin API (`GET /policy/explain`) with the running daemon's config and policy."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshd.config.model import Config, WorkloadConfig
from meshd.discovery.catalog import Catalog
from meshd.identity.spiffe import InvalidSpiffeId, SpiffeId
from meshd.policy.evaluate import ConnectionAttrs, PolicySet, RequestAttrs
from meshd.policy.explain import Explanation, explain, render, source_ip_dependence

# Evaluated for when no source address is given (the answer says when that matters).
DEFAULT_SOURCE_IP = "127.0.0.1"


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
    source_ip: str | None = None  # None: not given (DEFAULT_SOURCE_IP is evaluated, and flagged)
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
            source_ip=one("source_ip"),
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
    # No source address given, and these applying policies look at it: the answer may differ.
    depends_on_source_ip: tuple[str, ...] = ()
    waypoint: str | None = None  # the waypoint that decides HTTP requests to this destination (and where)

    @property
    def text(self) -> str:
        text = render(self.explanation)
        if self.depends_on_source_ip:
            names = self.depends_on_source_ip
            which = f"policy {names[0]} looks" if len(names) == 1 else f"policies {', '.join(names)} look"
            text += (
                f"\nnote: the answer depends on the source address ({which} at it); it was evaluated for "
                f"{DEFAULT_SOURCE_IP}: give the client's address (--source-ip, source_ip=)"
            )
        if self.waypoint is not None:
            text += (
                f"\nnote: traffic to this service goes through waypoint {self.waypoint}, which decides its L7"
                " rules with the waypoint's own policy; the above is this node's view (ask the waypoint:"
                " meshd policy explain --admin HOST:PORT of its admin API)"
            )
        return text

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
            "text": self.text,
            "waypoint": self.waypoint,
            **self.explanation.to_json(),
            "depends_on_source_ip": list(self.depends_on_source_ip),
        }


def parse_headers(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in items:
        k, sep, v = h.partition("=")
        if not sep:
            raise QueryError(f"{h!r} is not K=V", "header")
        out[k.strip().lower()] = v
    return out


def _target(to: str) -> tuple[str, str, int]:
    """SERVICE[.NAMESPACE]:PORT -> (name, namespace, port)."""
    target, sep, port_text = to.rpartition(":")
    if not sep or not port_text.isdigit():
        raise QueryError(f"{to!r} is not SERVICE:PORT (e.g. echo.default:7000)", "to")
    name, _, ns = target.partition(".")
    return name, ns or "default", int(port_text)


def destinations(cfg: Config, to: str, catalog: Catalog | None = None) -> tuple[list[WorkloadConfig], int]:
    """The workloads of this config that serve `to`, and the (target) port policy sees. With the
    merged catalog, a NotServedHere names the nodes (and waypoint) to ask instead."""
    name, ns, port = _target(to)
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
            f"no workload in this config serves {key} port {port} (node {cfg.node_name!r}, workloads: {hosted}); "
            f"policy is enforced where the workload runs: {where_to_ask(catalog, key, port)}",
            "to",
        )
    return found, (target_port if serving else port)


def where_to_ask(catalog: Catalog | None, key: str, port: int) -> str:
    """Which node(s) hold the answer, from the merged catalog (the running daemon's)."""
    if catalog is None:
        return (
            "ask the node that runs it (or ask this node's running meshd with --admin HOST:PORT: "
            "its catalog names that node)"
        )
    nodes: dict[str, str] = {}
    for ep in catalog.endpoints(key, port):
        found = catalog.node(ep.workload.node)
        nodes[ep.workload.node] = f"{ep.workload.node} (HBONE {ep.dial})" if found else ep.workload.node
    svc = catalog.services.get(key)
    if not nodes:
        known = "is not in this node's catalog" if svc is None else f"has no endpoint for port {port}"
        return f"{key} {known} (yet): no node to ask"
    text = f"ask node {', '.join(nodes[n] for n in sorted(nodes))}: run `meshd policy explain` there"
    if svc is not None and svc.waypoint is not None:
        text += f"; L7 policy (methods, paths, hosts, headers) is enforced by waypoint {svc.waypoint!r}"
    return text


def answer(
    cfg: Config,
    policies: PolicySet,
    q: ExplainQuery,
    catalog: Catalog | None = None,
    waypoint_of: Callable[[str], str | None] | None = None,
) -> list[Answer]:
    """What `policies` decide for `q` at every workload of `cfg` that serves its destination.

    `catalog` (a running daemon's merged catalog) lets a destination not served here name the node to
    ask. `waypoint_of(service key)` describes the waypoint bound to a service, or None (default: the
    config's own `waypoint =`; a running node passes its merged catalog's answer, namespace defaults
    included, with where the waypoint runs)."""
    try:
        src = None if q.source == "plaintext" else SpiffeId.parse_principal(q.source)
    except InvalidSpiffeId as exc:
        raise QueryError(str(exc), "from") from None
    l7 = any(x is not None for x in (q.method, q.path, q.host)) or bool(q.headers)
    workloads, port = destinations(cfg, q.to, catalog)
    name, ns, _ = _target(q.to)
    key = f"{name}.{ns}"
    if waypoint_of is None:
        svc = next((s for s in cfg.services if s.key == key), None)
        bound = repr(svc.waypoint) if svc is not None and svc.waypoint not in (None, "none") else None
    else:
        bound = waypoint_of(key)
    out = []
    for w in workloads:
        conn = ConnectionAttrs(
            source=src,
            source_ip=q.source_ip or DEFAULT_SOURCE_IP,
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
        ex = explain(policies, attrs)
        depends = source_ip_dependence(policies, ex) if q.source_ip is None else ()
        out.append(Answer(w, port, ex, depends, bound))
    return out
