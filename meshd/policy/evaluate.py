"""Authorization and mTLS-mode decisions over an immutable, precompiled PolicySet.

Rule 1: no I/O, no clocks, no logging. Callers log the Decision; tests call these functions directly.
Rule 2: nothing is parsed per connection. Patterns, CIDRs, principals and `when` keys are turned into
predicates when the PolicySet is built; a connection only runs them.

Theory of operation (Istio's, so its docs apply):
  1. any DENY policy that applies to the workload and matches -> deny
  2. no ALLOW policy applies to the workload                  -> allow
  3. an ALLOW policy matches                                   -> allow
  4. otherwise                                                 -> deny
AUDIT policies never change the decision; the ones that match are listed in `Decision.audited`.
A policy matches when one of its rules matches; a policy without rules matches nothing.
Within a rule, `from`, `to` and `when` are AND'd; entries of `from` (and of `to`) OR'd.

A node sees only L4 (identity, IPs, port). There, a rule that needs L7 (methods, paths, hosts,
`request.*` conditions) never matches in an ALLOW or AUDIT policy, and is enforced without its
L7 parts in a DENY policy (stricter). Both variants of every rule are compiled up front.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from meshd.config.schema import to_plain
from meshd.identity.spiffe import SpiffeId
from meshd.policy.model import (
    Action,
    AuthorizationPolicy,
    Condition,
    IPNetwork,
    Located,
    Operation,
    PeerAuthentication,
    Route,
    Rule,
    Source,
    canonical_principal,
    parse_ip_block,
    parse_when_key,
)

if TYPE_CHECKING:
    from meshd.policy.routes import LoadedRoute

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class ConnectionAttrs:
    """What the node knows at L4 about an inbound connection."""

    source: SpiffeId | None  # None: plaintext (no identity)
    source_ip: str
    destination_ip: str
    destination_port: int
    workload_namespace: str
    workload_name: str
    workload_labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class RequestAttrs:
    """What a waypoint knows about an HTTP request. Header names must be lower case (as HTTP/2 sends them)."""

    connection: ConnectionAttrs
    method: str
    path: str
    host: str
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str | None  # the deciding policy; None: default allow, or no ALLOW policy matched
    reason: str
    audited: tuple[str, ...] = ()


# ---- compiled matchers --------------------------------------------------------------------------


@dataclass(slots=True)
class _Ctx:
    """One evaluation's attributes, parsed once. L7 fields are None at a node."""

    principal: str | None
    namespace: str | None
    source_ip_text: str  # parsed only if a predicate needs it (see _ip)
    destination_ip_text: str
    port: int
    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: Mapping[str, str] | None = None


Pred = Callable[[_Ctx], bool]


class _StrMatch:
    """Istio string match: exact, `prefix*`, `*suffix`, `*` (present). A missing value never matches."""

    __slots__ = ("exact", "prefixes", "present", "suffixes")

    def __init__(self, patterns: Iterable[str]) -> None:
        pats = list(patterns)
        self.present = "*" in pats
        self.exact = frozenset(p for p in pats if "*" not in p)
        self.prefixes = tuple(p[:-1] for p in pats if p.endswith("*") and p != "*")
        self.suffixes = tuple(p[1:] for p in pats if p.startswith("*") and p != "*")

    def __call__(self, value: str | None) -> bool:
        if value is None:
            return False
        return (
            self.present
            or value in self.exact
            or (bool(self.prefixes) and value.startswith(self.prefixes))
            or (bool(self.suffixes) and value.endswith(self.suffixes))
        )


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> IPAddr | None:
    """Parse a peer address (cached: the same few peers connect again and again)."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return addr


def _in_blocks(nets: tuple[IPNetwork, ...], addr: IPAddr | None) -> bool:
    return addr is not None and any(addr in n for n in nets)


def _string_field(
    positive: tuple[str, ...],
    negative: tuple[str, ...],
    get: Callable[[_Ctx], str | None],
    fold: bool = False,
) -> list[Pred]:
    """Predicates for a field and its not_ twin; `fold` compares case-insensitively."""
    out: list[Pred] = []
    if fold:
        positive, negative = tuple(p.lower() for p in positive), tuple(p.lower() for p in negative)
        raw = get

        def get(c: _Ctx) -> str | None:
            v = raw(c)
            return None if v is None else v.lower()

    if positive:
        m = _StrMatch(positive)
        out.append(lambda c: m(get(c)))
    if negative:
        n = _StrMatch(negative)
        out.append(lambda c: not n(get(c)))
    return out


def _ip_field(
    positive: tuple[str, ...], negative: tuple[str, ...], get: Callable[[_Ctx], IPAddr | None]
) -> list[Pred]:
    out: list[Pred] = []
    if positive:
        nets = tuple(parse_ip_block(v) for v in positive)
        out.append(lambda c: _in_blocks(nets, get(c)))
    if negative:
        not_nets = tuple(parse_ip_block(v) for v in negative)
        out.append(lambda c: not _in_blocks(not_nets, get(c)))
    return out


def _port_field(positive: Iterable[int], negative: Iterable[int]) -> list[Pred]:
    out: list[Pred] = []
    ports, not_ports = frozenset(positive), frozenset(negative)
    if ports:
        out.append(lambda c: c.port in ports)
    if not_ports:
        out.append(lambda c: c.port not in not_ports)
    return out


def _principals(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(canonical_principal(v) for v in values)


def _compile_source(s: Source) -> tuple[Pred, ...]:
    return (
        *_string_field(_principals(s.principals), _principals(s.not_principals), lambda c: c.principal),
        *_string_field(s.namespaces, s.not_namespaces, lambda c: c.namespace),
        *_ip_field(s.ip_blocks, s.not_ip_blocks, lambda c: _ip(c.source_ip_text)),
    )


def _path_only(c: _Ctx) -> str | None:
    if c.path is None:
        return None
    return c.path.split("?", 1)[0].split("#", 1)[0]


def _compile_operation(op: Operation, l7: bool) -> tuple[Pred, ...]:
    preds = _port_field(op.ports, op.not_ports)
    if l7:
        preds += _string_field(op.methods, op.not_methods, lambda c: c.method)
        preds += _string_field(op.paths, op.not_paths, _path_only)
        preds += _string_field(op.hosts, op.not_hosts, lambda c: c.host, fold=True)
    return tuple(preds)


def _compile_condition(cond: Condition) -> tuple[Pred, ...]:
    kind, header = parse_when_key(cond.key)
    if kind == "request.headers":

        def get_header(c: _Ctx) -> str | None:
            return None if c.headers is None else c.headers.get(header or "")

        return tuple(_string_field(cond.values, cond.not_values, get_header))
    if kind == "source.ip":
        return tuple(_ip_field(cond.values, cond.not_values, lambda c: _ip(c.source_ip_text)))
    if kind == "destination.ip":
        return tuple(_ip_field(cond.values, cond.not_values, lambda c: _ip(c.destination_ip_text)))
    if kind == "destination.port":
        return tuple(_port_field((int(v) for v in cond.values), (int(v) for v in cond.not_values)))
    if kind == "source.principal":
        return tuple(
            _string_field(_principals(cond.values), _principals(cond.not_values), lambda c: c.principal)
        )
    if kind == "source.namespace":
        return tuple(_string_field(cond.values, cond.not_values, lambda c: c.namespace))
    raise AssertionError(f"when key {cond.key!r} passed validation but has no compiler")  # a bug in meshd


@dataclass(frozen=True, slots=True)
class _Rule:
    """None = unconstrained; otherwise OR over entries, each an AND of predicates."""

    sources: tuple[tuple[Pred, ...], ...] | None
    operations: tuple[tuple[Pred, ...], ...] | None
    conditions: tuple[Pred, ...]

    def matches(self, c: _Ctx) -> bool:
        if self.sources is not None and not any(all(p(c) for p in s) for s in self.sources):
            return False
        if self.operations is not None and not any(all(p(c) for p in o) for o in self.operations):
            return False
        return all(p(c) for p in self.conditions)


def _compile_rule(rule: Rule, l7: bool) -> _Rule:
    sources = None if rule.sources is None else tuple(_compile_source(s) for s in rule.sources)
    operations = (
        None if rule.operations is None else tuple(_compile_operation(o, l7) for o in rule.operations)
    )
    conditions: list[Pred] = []
    for cond in rule.conditions or ():
        if l7 or not cond.is_l7:
            conditions += _compile_condition(cond)
    return _Rule(sources, operations, tuple(conditions))


@dataclass(frozen=True, slots=True)
class _Policy:
    name: str
    action: Action
    workloads: frozenset[str]
    selector: tuple[tuple[str, str], ...]
    node_rules: tuple[_Rule | None, ...]  # None: the rule cannot match at a node
    waypoint_rules: tuple[_Rule, ...]

    def applies(self, name: str, labels: Mapping[str, str]) -> bool:
        """Namespace scope is settled by indexing; this checks workloads and selector."""
        if self.workloads and name not in self.workloads:
            return False
        return all(labels.get(k) == v for k, v in self.selector)

    def match(self, c: _Ctx, node: bool) -> int | None:
        """1-based number of the first matching rule, or None."""
        for i, rule in enumerate(self.node_rules if node else self.waypoint_rules, start=1):
            if rule is not None and rule.matches(c):
                return i
        return None


def _compile_policy(p: AuthorizationPolicy) -> _Policy:
    node_rules: list[_Rule | None] = []
    for rule in p.rules:
        if rule.has_l7 and p.action != "DENY":
            node_rules.append(None)
        else:
            node_rules.append(_compile_rule(rule, l7=False))
    return _Policy(
        name=p.name,
        action=p.action,
        workloads=frozenset(p.workloads),
        selector=tuple(sorted(p.selector.items())),
        node_rules=tuple(node_rules),
        waypoint_rules=tuple(_compile_rule(r, l7=True) for r in p.rules),
    )


_Scope = tuple[tuple[_Policy, ...], tuple[_Policy, ...], tuple[_Policy, ...]]  # DENY, AUDIT, ALLOW


def _split(policies: Sequence[_Policy]) -> _Scope:
    return (
        tuple(p for p in policies if p.action == "DENY"),
        tuple(p for p in policies if p.action == "AUDIT"),
        tuple(p for p in policies if p.action == "ALLOW"),
    )


# ---- the policy set -----------------------------------------------------------------------------


class PolicySet:
    """Every loaded policy, with its origin, compiled for evaluation. Immutable: a reload builds a new one."""

    __slots__ = (
        "_authorizations",
        "_loaded_routes",
        "_mesh",
        "_mtls",
        "_namespaces",
        "_peer_authentications",
        "_routes",
    )

    def __init__(
        self,
        authorizations: Sequence[Located[AuthorizationPolicy]] = (),
        peer_authentications: Sequence[Located[PeerAuthentication]] = (),
        routes: Sequence[LoadedRoute] = (),
    ) -> None:
        """Policies must already be valid (as `load_policy_dir` or `schema.build` returns them)."""
        self._authorizations = tuple(authorizations)
        self._peer_authentications = tuple(peer_authentications)
        self._loaded_routes = tuple(routes)  # with their filter instances; the waypoint compiles them
        self._routes = tuple(r.located for r in self._loaded_routes)
        # Mesh-wide policies first, then the namespace's; each group by name, so decisions are stable.
        ordered = sorted(self._authorizations, key=lambda a: (a.value.namespace is not None, a.value.name))
        mesh = [_compile_policy(a.value) for a in ordered if a.value.namespace is None]
        by_ns: dict[str, list[_Policy]] = {}
        for a in ordered:
            if a.value.namespace is not None:
                by_ns.setdefault(a.value.namespace, list(mesh)).append(_compile_policy(a.value))
        self._mesh: _Scope = _split(mesh)
        self._namespaces: dict[str, _Scope] = {ns: _split(ps) for ns, ps in by_ns.items()}
        self._mtls: dict[tuple[str | None, str | None], Literal["STRICT", "PERMISSIVE"]] = {}
        for pa in self._peer_authentications:
            ns = pa.value.namespace
            for w in pa.value.workloads or (None,):
                self._mtls.setdefault((ns, w), pa.value.mode)

    @property
    def authorizations(self) -> tuple[Located[AuthorizationPolicy], ...]:
        return self._authorizations

    @property
    def peer_authentications(self) -> tuple[Located[PeerAuthentication], ...]:
        return self._peer_authentications

    @property
    def routes(self) -> tuple[Located[Route], ...]:
        return self._routes

    @property
    def loaded_routes(self) -> tuple[LoadedRoute, ...]:
        """The routes with their built filters (meshd/waypoint/router.py compiles them)."""
        return self._loaded_routes

    def __len__(self) -> int:
        return len(self._authorizations) + len(self._peer_authentications) + len(self._routes)

    def config_dump(self) -> dict[str, Any]:
        """JSON-ready, in the TOML shape, each policy with `source` = FILE:LINE."""
        return {
            "authorization": [{**to_plain(a.value), "source": str(a.origin)} for a in self._authorizations],
            "peer_authentication": [
                {**to_plain(p.value), "source": str(p.origin)} for p in self._peer_authentications
            ],
            "route": [{**to_plain(r.value), "source": str(r.origin)} for r in self._routes],
        }

    def _scope(self, namespace: str) -> _Scope:
        return self._namespaces.get(namespace, self._mesh)

    def _decide(self, c: _Ctx, ns: str, name: str, labels: Mapping[str, str], node: bool) -> Decision:
        deny, audit, allow = self._scope(ns)
        audited = tuple(p.name for p in audit if p.applies(name, labels) and p.match(c, node) is not None)
        for p in deny:
            if p.applies(name, labels) and (i := p.match(c, node)) is not None:
                return Decision(False, p.name, f"denied by policy {p.name} (rule {i})", audited)
        applicable = [p for p in allow if p.applies(name, labels)]
        if not applicable:
            return Decision(True, None, "no ALLOW policy applies", audited)
        for p in applicable:
            if (i := p.match(c, node)) is not None:
                return Decision(True, p.name, f"allowed by policy {p.name} (rule {i})", audited)
        names = ", ".join(p.name for p in applicable)
        return Decision(False, None, f"no ALLOW policy matched (checked {names})", audited)


def _ctx(conn: ConnectionAttrs) -> _Ctx:
    src = conn.source
    return _Ctx(
        principal=None if src is None else src.principal,
        namespace=None if src is None else src.namespace,
        source_ip_text=conn.source_ip,
        destination_ip_text=conn.destination_ip,
        port=conn.destination_port,
    )


def authorize_connection(policies: PolicySet, conn: ConnectionAttrs) -> Decision:
    """Node (L4) semantics: L7 rules never match in ALLOW/AUDIT, and lose their L7 parts in DENY."""
    c = _ctx(conn)
    return policies._decide(c, conn.workload_namespace, conn.workload_name, conn.workload_labels, node=True)


def authorize_request(policies: PolicySet, req: RequestAttrs) -> Decision:
    """Waypoint (L7) semantics: every field is evaluated."""
    conn = req.connection
    c = _ctx(conn)
    c.method, c.path, c.host, c.headers = req.method, req.path, req.host, req.headers
    return policies._decide(c, conn.workload_namespace, conn.workload_name, conn.workload_labels, node=False)


def mtls_mode(
    policies: PolicySet, namespace: str, workload_name: str, configured: str | None
) -> Literal["STRICT", "PERMISSIVE"]:
    """The workload's own `mtls` setting, else the most specific peer_authentication, else PERMISSIVE."""
    if configured is not None:
        if configured == "STRICT":
            return "STRICT"
        if configured == "PERMISSIVE":
            return "PERMISSIVE"
        raise ValueError(f"mtls mode {configured!r} is not STRICT or PERMISSIVE")
    table = policies._mtls
    return (
        table.get((namespace, workload_name))
        or table.get((namespace, None))
        or table.get((None, None))
        or "PERMISSIVE"
    )
