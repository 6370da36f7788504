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
request principals, `request.*` conditions) never matches in an ALLOW or AUDIT policy, and is enforced
without its L7 parts in a DENY policy (fail closed: stricter than ztunnel, which skips such an entry).
Both variants of every rule are compiled up front.

Dry-run policies (`dry_run = true`) never change the decision: each one that applies is evaluated and
the decision it would have given, had it been enforced alongside the others, is reported in
`Decision.dry_run` (for the metric and the access log).

One routine decides and explains: `evaluate()` runs the same compiled predicates for the data path
(short-circuiting, no trace) and for `meshd policy explain` (every policy and rule, with a trace), so
an explanation cannot disagree with what is enforced.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from meshd.config.schema import to_plain
from meshd.identity.spiffe import SpiffeId
from meshd.policy.model import (
    DEFAULT_NETWORK,
    L7_FROM_FIELDS,
    L7_TO_FIELDS,
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
    split_service_account,
)

if TYPE_CHECKING:
    from meshd.policy.routes import LoadedRoute

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class ConnectionAttrs:
    """What the node knows at L4 about an inbound connection."""

    source: SpiffeId | None  # None: plaintext (no identity)
    source_ip: str  # the peer's address (also the remote address: meshd trusts no proxy hops)
    destination_ip: str
    destination_port: int
    workload_namespace: str
    workload_name: str
    workload_labels: Mapping[str, str]
    source_network: str = DEFAULT_NETWORK  # every peer is in "default" until networks exist


@dataclass(frozen=True, slots=True)
class RequestAttrs:
    """What a waypoint knows about an HTTP request. Header names must be lower case (as HTTP/2 sends them)."""

    connection: ConnectionAttrs
    method: str
    path: str
    host: str
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class DryRunResult:
    """What a dry-run policy would have decided, had it been enforced alongside the enforced ones."""

    policy: str
    action: str  # ALLOW or DENY
    allowed: bool
    reason: str

    @property
    def result(self) -> str:
        """The `result` label of meshd_policy_dry_run_total: "allow" or "deny"."""
        return "allow" if self.allowed else "deny"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str | None  # the deciding policy; None: default allow, or no ALLOW policy matched
    reason: str
    audited: tuple[str, ...] = ()
    dry_run: tuple[DryRunResult, ...] = ()


@dataclass(frozen=True)
class RuleTrace:
    """One rule as the evaluation saw it."""

    index: int  # 1-based, as decisions name them
    matched: bool
    failed: tuple[str, ...] = ()  # which of from / to / when did not match
    note: str | None = None  # how a node treats a rule with L7 fields


@dataclass(frozen=True)
class PolicyTrace:
    """One policy as the evaluation saw it: whether it applies to the workload (and why), and its rules."""

    name: str
    action: str
    source: str  # FILE:LINE
    applies: bool
    scope_reason: str
    rules: tuple[RuleTrace, ...] = ()
    dry_run: bool = False

    @property
    def matched(self) -> bool:
        return self.applies and any(r.matched for r in self.rules)


@dataclass(frozen=True)
class Evaluation:
    """A decision and, when asked for, the trace that produced it (every policy, in file order)."""

    decision: Decision
    at: Literal["node", "waypoint"]
    policies: tuple[PolicyTrace, ...] = field(default=())


# ---- compiled matchers --------------------------------------------------------------------------


@dataclass(slots=True)
class _Ctx:
    """One evaluation's attributes, parsed once. L7 fields are None at a node."""

    principal: str | None
    identity: SpiffeId | None
    namespace: str | None
    source_ip_text: str  # parsed only if a predicate needs it (see _ip)
    destination_ip_text: str
    port: int
    network: str
    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: Mapping[str, str] | None = None
    request_principal: str | None = None  # from a JWT: meshd has no request authentication, never set


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


def _service_account_field(
    positive: tuple[str, ...], negative: tuple[str, ...], namespace: str | None
) -> list[Pred]:
    """ztunnel's ServiceAccountMatch: namespace and account of the peer's identity, any trust domain;
    no identity (plaintext) never matches."""
    out: list[Pred] = []

    def accounts(values: tuple[str, ...]) -> frozenset[tuple[str, str]]:
        return frozenset(split_service_account(v, namespace) for v in values)

    def of(c: _Ctx) -> tuple[str, str] | None:
        return None if c.identity is None else (c.identity.namespace, c.identity.service_account)

    if positive:
        yes = accounts(positive)
        out.append(lambda c: of(c) in yes)
    if negative:
        no = accounts(negative)
        out.append(lambda c: of(c) not in no)
    return out


def _principals(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(canonical_principal(v) for v in values)


def _source_ip(c: _Ctx) -> IPAddr | None:
    return _ip(c.source_ip_text)


def _compile_source(s: Source, l7: bool, namespace: str | None) -> tuple[Pred, ...]:
    preds = [
        *_string_field(_principals(s.principals), _principals(s.not_principals), lambda c: c.principal),
        *_service_account_field(s.service_accounts, s.not_service_accounts, namespace),
        *_string_field(s.namespaces, s.not_namespaces, lambda c: c.namespace),
        *_ip_field(s.ip_blocks, s.not_ip_blocks, _source_ip),
        # The remote address is the peer's: meshd trusts no X-Forwarded-For / PROXY hops.
        *_ip_field(s.remote_ip_blocks, s.not_remote_ip_blocks, _source_ip),
    ]
    if l7:
        preds += _string_field(s.request_principals, s.not_request_principals, lambda c: c.request_principal)
    return tuple(preds)


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
    if kind in ("source.ip", "remote.ip"):
        return tuple(_ip_field(cond.values, cond.not_values, _source_ip))
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
    if kind == "source.network":
        return tuple(_string_field(cond.values, cond.not_values, lambda c: c.network))
    if kind == "request.auth.principal":
        return tuple(_string_field(cond.values, cond.not_values, lambda c: c.request_principal))
    raise AssertionError(f"when key {cond.key!r} passed validation but has no compiler")  # a bug in meshd


@dataclass(frozen=True, slots=True)
class _Rule:
    """None = unconstrained; otherwise OR over entries, each an AND of predicates."""

    sources: tuple[tuple[Pred, ...], ...] | None
    operations: tuple[tuple[Pred, ...], ...] | None
    conditions: tuple[Pred, ...]

    def matches(self, c: _Ctx, failed: list[str] | None = None) -> bool:
        """Does the rule match? With `failed`, every clause is evaluated and the ones that did not
        match are appended to it (the trace); without, the first miss answers."""
        ok = True
        if self.sources is not None and not any(all(p(c) for p in s) for s in self.sources):
            if failed is None:
                return False
            failed.append("from")
            ok = False
        if self.operations is not None and not any(all(p(c) for p in o) for o in self.operations):
            if failed is None:
                return False
            failed.append("to")
            ok = False
        if not all(p(c) for p in self.conditions):
            if failed is not None:
                failed.append("when")
            ok = False
        return ok


def _compile_rule(rule: Rule, l7: bool, namespace: str | None) -> _Rule:
    # `from = []` is read as an omitted `from`: any source.
    sources = None if not rule.sources else tuple(_compile_source(s, l7, namespace) for s in rule.sources)
    operations = (
        None if rule.operations is None else tuple(_compile_operation(o, l7) for o in rule.operations)
    )
    conditions: list[Pred] = []
    for cond in rule.conditions or ():
        if l7 or not cond.is_l7:
            conditions += _compile_condition(cond)
    return _Rule(sources, operations, tuple(conditions))


def l7_fields(rule: Rule) -> list[str]:
    """The L7 fields a rule uses, as written (`methods`, `request_principals`, `when request.headers[x]`)."""
    fields = [f for f in L7_FROM_FIELDS if any(getattr(s, f) for s in rule.sources or ())]
    fields += [f for f in L7_TO_FIELDS if any(getattr(op, f) for op in rule.operations or ())]
    fields += [f"when {c.key}" for c in rule.conditions or () if c.is_l7]
    return list(dict.fromkeys(fields))


def node_note(action: str, rule: Rule) -> str | None:
    """How a node treats a rule with L7 fields (None: the rule has none)."""
    fields = l7_fields(rule)
    if not fields:
        return None
    uses = f"uses L7 fields ({', '.join(fields)}) a node cannot see"
    if action == "DENY":
        return f"{uses}: enforced without them at a node (fails closed: denies more)"
    return f"{uses}: never matches at a node; evaluated at a waypoint"


@dataclass(frozen=True, slots=True)
class _Policy:
    name: str
    action: Action
    namespace: str | None
    source: str  # FILE:LINE
    order: int  # position in the folder (file order), for traces
    dry_run: bool
    workloads: frozenset[str]
    selector: tuple[tuple[str, str], ...]
    node_rules: tuple[_Rule | None, ...]  # None: the rule cannot match at a node
    waypoint_rules: tuple[_Rule, ...]
    node_notes: tuple[str | None, ...]

    def applies(self, name: str, labels: Mapping[str, str]) -> bool:
        """Namespace scope is settled by indexing; this checks workloads and selector."""
        if self.workloads and name not in self.workloads:
            return False
        return all(labels.get(k) == v for k, v in self.selector)

    def scope_reason(self, name: str, labels: Mapping[str, str]) -> str:
        if self.workloads and name not in self.workloads:
            return f"scoped to workloads {sorted(self.workloads)}, not {name!r}"
        if not all(labels.get(k) == v for k, v in self.selector):
            return f"selector {dict(self.selector)} does not match the workload's labels {dict(labels)}"
        return "applies to the workload"

    def match(self, c: _Ctx, node: bool, trace: list[RuleTrace] | None = None) -> int | None:
        """1-based number of the first matching rule, or None. With `trace`, every rule is evaluated
        and recorded; the answer is the same."""
        rules = self.node_rules if node else self.waypoint_rules
        if trace is None:  # the data path: the first match answers
            for i, rule in enumerate(rules, start=1):
                if rule is not None and rule.matches(c):
                    return i
            return None
        first: int | None = None
        for i, rule in enumerate(rules, start=1):
            note = self.node_notes[i - 1] if node else None
            if rule is None:
                trace.append(RuleTrace(i, False, (), note))
                continue
            failed: list[str] = []
            if rule.matches(c, failed):
                first = first or i
            trace.append(RuleTrace(i, not failed, tuple(failed), note))
        return first


def _compile_policy(p: AuthorizationPolicy, source: str, order: int) -> _Policy:
    node_rules: list[_Rule | None] = []
    for rule in p.rules:
        if rule.has_l7 and p.action != "DENY":
            node_rules.append(None)
        else:
            node_rules.append(_compile_rule(rule, l7=False, namespace=p.namespace))
    return _Policy(
        name=p.name,
        action=p.action,
        namespace=p.namespace,
        source=source,
        order=order,
        dry_run=p.dry_run,
        workloads=frozenset(p.workloads),
        selector=tuple(sorted(p.selector.items())),
        node_rules=tuple(node_rules),
        waypoint_rules=tuple(_compile_rule(r, l7=True, namespace=p.namespace) for r in p.rules),
        node_notes=tuple(node_note(p.action, r) for r in p.rules),
    )


@dataclass(frozen=True, slots=True)
class _Scope:
    """The policies that can apply in one namespace (mesh-wide ones first), by role in the decision."""

    deny: tuple[_Policy, ...]
    audit: tuple[_Policy, ...]
    allow: tuple[_Policy, ...]
    dry_run: tuple[_Policy, ...]
    every: tuple[_Policy, ...]


def _split(policies: Sequence[_Policy]) -> _Scope:
    enforced = [p for p in policies if not p.dry_run]
    return _Scope(
        tuple(p for p in enforced if p.action == "DENY"),
        tuple(p for p in enforced if p.action == "AUDIT"),
        tuple(p for p in enforced if p.action == "ALLOW"),
        tuple(p for p in policies if p.dry_run),
        tuple(policies),
    )


# ---- the policy set -----------------------------------------------------------------------------


class PolicySet:
    """Every loaded policy, with its origin, compiled for evaluation. Immutable: a reload builds a new one."""

    __slots__ = (
        "_all",
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
        compiled = {
            id(a): _compile_policy(a.value, str(a.origin), i) for i, a in enumerate(self._authorizations)
        }
        self._all = tuple(compiled[id(a)] for a in self._authorizations)
        # Mesh-wide policies first, then the namespace's; each group by name, so decisions are stable.
        ordered = sorted(self._authorizations, key=lambda a: (a.value.namespace is not None, a.value.name))
        mesh = [compiled[id(a)] for a in ordered if a.value.namespace is None]
        by_ns: dict[str, list[_Policy]] = {}
        for a in ordered:
            if a.value.namespace is not None:
                by_ns.setdefault(a.value.namespace, list(mesh)).append(compiled[id(a)])
        self._mesh = _split(mesh)
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

    def _decide(
        self,
        c: _Ctx,
        ns: str,
        name: str,
        labels: Mapping[str, str],
        node: bool,
        trace: dict[int, PolicyTrace] | None,
    ) -> Decision:
        """Istio's order (module docstring). With `trace`, every policy of the scope is evaluated in full
        and recorded by its folder position; the decision comes from the same matches either way."""
        scope = self._scope(ns)

        def hit(p: _Policy) -> int | None:
            applies = p.applies(name, labels)
            if trace is None:
                return p.match(c, node) if applies else None
            rules: list[RuleTrace] = []
            i = p.match(c, node, rules) if applies else None
            reason = p.scope_reason(name, labels)
            if applies and not p.waypoint_rules:
                reason += "; it has no rules, so it matches nothing"
            trace[p.order] = PolicyTrace(p.name, p.action, p.source, applies, reason, tuple(rules), p.dry_run)
            return i

        audited = tuple(p.name for p in scope.audit if hit(p) is not None)
        denied_by: tuple[_Policy, int] | None = None
        for p in scope.deny:
            if (i := hit(p)) is not None and denied_by is None:
                denied_by = (p, i)
                if trace is None:
                    break
        applicable = [p for p in scope.allow if p.applies(name, labels)]
        allowed_by: tuple[_Policy, int] | None = None
        for p in scope.allow:
            if denied_by is not None and trace is None:
                break
            if (i := hit(p)) is not None and allowed_by is None:
                allowed_by = (p, i)
                if trace is None:
                    break
        dry_runs: list[DryRunResult] = []
        for p in scope.dry_run:
            i = hit(p)
            if p.applies(name, labels):
                dry_runs.append(_dry_run(p, i, denied_by, applicable, allowed_by))
        dry = tuple(dry_runs)
        if denied_by is not None:
            p, i = denied_by
            return Decision(False, p.name, f"denied by policy {p.name} (rule {i})", audited, dry)
        if not applicable:
            return Decision(True, None, "no ALLOW policy applies", audited, dry)
        if allowed_by is not None:
            p, i = allowed_by
            return Decision(True, p.name, f"allowed by policy {p.name} (rule {i})", audited, dry)
        return Decision(False, None, _none_matched(applicable), audited, dry)

    def evaluate(self, attrs: ConnectionAttrs | RequestAttrs, *, trace: bool = False) -> Evaluation:
        """Decide as the node (ConnectionAttrs: L4) or the waypoint (RequestAttrs: every field) does;
        with `trace`, say why for every policy of the folder (`meshd policy explain`)."""
        if isinstance(attrs, RequestAttrs):
            conn = attrs.connection
            c = _ctx(conn)
            c.method, c.path, c.host, c.headers = attrs.method, attrs.path, attrs.host, attrs.headers
            node = False
        else:
            conn, c, node = attrs, _ctx(attrs), True
        at: Literal["node", "waypoint"] = "node" if node else "waypoint"
        ns, name, labels = conn.workload_namespace, conn.workload_name, conn.workload_labels
        if not trace:
            return Evaluation(self._decide(c, ns, name, labels, node, None), at)
        seen: dict[int, PolicyTrace] = {}
        decision = self._decide(c, ns, name, labels, node, seen)
        for p in self._all:
            if p.order not in seen:  # another namespace's: never evaluated here
                reason = f"scoped to namespace {p.namespace!r}, the workload is in {ns!r}"
                seen[p.order] = PolicyTrace(p.name, p.action, p.source, False, reason, (), p.dry_run)
        return Evaluation(decision, at, tuple(seen[k] for k in sorted(seen)))


def _none_matched(applicable: Sequence[_Policy]) -> str:
    return f"no ALLOW policy matched (checked {', '.join(p.name for p in applicable)})"


def _dry_run(
    p: _Policy,
    rule: int | None,
    denied_by: tuple[_Policy, int] | None,
    applicable: list[_Policy],
    allowed_by: tuple[_Policy, int] | None,
) -> DryRunResult:
    """The decision had dry-run policy `p` been enforced with the enforced ones (Istio's order)."""
    if denied_by is not None:
        q, i = denied_by
        return DryRunResult(p.name, p.action, False, f"denied by policy {q.name} (rule {i})")
    if p.action == "DENY":
        if rule is not None:
            return DryRunResult(p.name, p.action, False, f"denied by policy {p.name} (rule {rule})")
        if allowed_by is not None:
            q, i = allowed_by
            return DryRunResult(p.name, p.action, True, f"allowed by policy {q.name} (rule {i})")
        if applicable:
            return DryRunResult(p.name, p.action, False, _none_matched(applicable))
        return DryRunResult(p.name, p.action, True, "no ALLOW policy applies")
    # ALLOW: enforcing it makes an ALLOW policy apply to the workload.
    if allowed_by is not None:
        q, i = allowed_by
        return DryRunResult(p.name, p.action, True, f"allowed by policy {q.name} (rule {i})")
    if rule is not None:
        return DryRunResult(p.name, p.action, True, f"allowed by policy {p.name} (rule {rule})")
    return DryRunResult(p.name, p.action, False, _none_matched([*applicable, p]))


def _ctx(conn: ConnectionAttrs) -> _Ctx:
    src = conn.source
    return _Ctx(
        principal=None if src is None else src.principal,
        identity=src,
        namespace=None if src is None else src.namespace,
        source_ip_text=conn.source_ip,
        destination_ip_text=conn.destination_ip,
        port=conn.destination_port,
        network=conn.source_network,
    )


def authorize_connection(policies: PolicySet, conn: ConnectionAttrs) -> Decision:
    """Node (L4) semantics: L7 rules never match in ALLOW/AUDIT, and lose their L7 parts in DENY.
    The data path's call: `PolicySet.evaluate` without a trace, minus the Evaluation wrapper."""
    c = _ctx(conn)
    return policies._decide(c, conn.workload_namespace, conn.workload_name, conn.workload_labels, True, None)


def authorize_request(policies: PolicySet, req: RequestAttrs) -> Decision:
    """Waypoint (L7) semantics: every field is evaluated (as `PolicySet.evaluate`, without a trace)."""
    conn = req.connection
    c = _ctx(conn)
    c.method, c.path, c.host, c.headers = req.method, req.path, req.host, req.headers
    return policies._decide(c, conn.workload_namespace, conn.workload_name, conn.workload_labels, False, None)


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
