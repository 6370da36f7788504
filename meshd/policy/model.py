"""Policy files as frozen, typed objects, mirroring Istio's AuthorizationPolicy and PeerAuthentication.

The TOML shape flattens Istio's YAML (`from = [{ principals = [...] }]` instead of
`from: [{source: {principals: [...]}}]`) but keeps its names and semantics, so Istio's docs apply.
Every value a user writes is validated here (by `check()`), so evaluation never meets a bad pattern.
Field metadata: `toml` = key name, `doc` = description (docs/policy.md documents each key).

Pure: no I/O. Turning these objects into fast matchers is `meshd.policy.evaluate`'s job.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Generic, Literal, TypeVar

from meshd.config.schema import Issue
from meshd.identity.spiffe import InvalidSpiffeId, SpiffeId
from meshd.plugins.settings import RetrySettings

T = TypeVar("T")
Action = Literal["ALLOW", "DENY", "AUDIT"]
MtlsMode = Literal["STRICT", "PERMISSIVE"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
_PATTERN_TEXT = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces
_PRINCIPAL_TEXT = re.compile(r"^[A-Za-z0-9._/-]+$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9a-zA-Z-]+$")  # an HTTP token (RFC 9110)
_WHEN_HEADER = re.compile(r"^request\.headers\[(.*)\]$")
_SERVICE_ACCOUNT = re.compile(r"^([a-z0-9]([a-z0-9._-]*[a-z0-9])?/)?[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")

# Until networks exist (the gateway issue), every workload and node is in this one network.
DEFAULT_NETWORK = "default"

# `when` keys meshd understands, and whether they need L7 (a waypoint) to be evaluated.
WHEN_KEYS: dict[str, bool] = {
    "source.ip": False,
    "source.namespace": False,
    "source.principal": False,
    "source.network": False,
    "remote.ip": False,
    "destination.ip": False,
    "destination.port": False,
    "request.headers[<name>]": True,
    "request.auth.principal": True,
}
L7_TO_FIELDS = ("methods", "not_methods", "paths", "not_paths", "hosts", "not_hosts")
# Request principals come from a JWT: a request attribute, so L7 like the fields of `to` above.
L7_FROM_FIELDS = ("request_principals", "not_request_principals")


def doc(text: str, **kw: object) -> dict[str, object]:
    return {"doc": text, **kw}


# ---- where a policy was written (for /config_dump and messages) ---------------------------------


@dataclass(frozen=True, slots=True)
class Origin:
    file: str
    line: int | None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file


@dataclass(frozen=True, slots=True)
class Located(Generic[T]):
    """A policy object tagged with the file and line it came from."""

    value: T
    origin: Origin


# ---- value checks shared by check() and the evaluator's compiler --------------------------------


def check_pattern(value: str) -> str | None:
    """Why `value` is not an Istio string match (exact, `prefix*`, `*suffix`, `*`), or None if it is."""
    if not value:
        return "an empty string matches nothing"
    if not _PATTERN_TEXT.match(value):
        return f"{value!r} has spaces or non-ASCII characters"
    if value == "*":
        return None
    if "*" in value[1:-1] or (value.startswith("*") and value.endswith("*")):
        return f"{value!r}: '*' may only be the whole value, its first character or its last"
    return None


def canonical_principal(value: str) -> str:
    """A principal pattern in Istio's spelling `td/ns/NS/sa/SA`; raise ValueError if malformed.

    Exact principals are parsed (both spellings); `prefix*` / `*suffix` patterns lose a leading
    `spiffe://` so they compare against the same canonical form.
    """
    problem = check_pattern(value)
    if problem:
        raise ValueError(problem)
    if value == "*":
        return value
    if "*" not in value:
        try:
            return SpiffeId.parse_principal(value).principal
        except InvalidSpiffeId as exc:
            raise ValueError(str(exc)) from None
    body = value.removeprefix("spiffe://")
    if body == "*":
        return body
    if not _PRINCIPAL_TEXT.match(body.strip("*")):
        raise ValueError(f"{value!r} has characters a principal cannot contain")
    return body


class BadIpBlock(ValueError):
    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def parse_ip_block(value: str) -> IPNetwork:
    """`10.0.0.0/8`, `fd00::/8` or a single address; raise BadIpBlock (a ValueError with a hint) otherwise."""
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        try:
            fixed = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise BadIpBlock(
                f"{value!r} is not an IP address or CIDR block ({exc})", 'e.g. "192.168.1.0/24"'
            ) from None
        raise BadIpBlock(f"{value!r} has host bits set", f'did you mean "{fixed}"?') from None


def parse_when_key(key: str) -> tuple[str, str | None]:
    """`request.headers[X-User]` -> ("request.headers", "x-user"); `source.ip` -> ("source.ip", None)."""
    m = _WHEN_HEADER.match(key)
    if m:
        name = m.group(1)
        if not _HEADER_NAME.match(name):
            raise ValueError(f"{key!r}: {name!r} is not an HTTP header name")
        return "request.headers", name.lower()
    if key in WHEN_KEYS:
        return key, None
    raise ValueError(f"unsupported when key {key!r}")


def _patterns(values: tuple[str, ...], key: str) -> list[Issue]:
    return [
        Issue((key, i), f"{key}: {problem}", "write an exact value, prefix*, *suffix or *")
        for i, v in enumerate(values)
        if (problem := check_pattern(v))
    ]


def _principals(values: tuple[str, ...], key: str) -> list[Issue]:
    issues = []
    for i, v in enumerate(values):
        try:
            canonical_principal(v)
        except ValueError as exc:
            issues.append(Issue((key, i), f"{key}: {exc}", 'write e.g. "home.arpa/ns/default/sa/client"'))
    return issues


def _ip_blocks(values: tuple[str, ...], key: str) -> list[Issue]:
    issues = []
    for i, v in enumerate(values):
        try:
            parse_ip_block(v)
        except BadIpBlock as exc:
            issues.append(Issue((key, i), f"{key}: {exc}", exc.hint))
    return issues


def _service_accounts(values: tuple[str, ...], key: str) -> list[Issue]:
    return [
        Issue(
            (key, i),
            f"{key}: {v!r} is not NAMESPACE/SERVICE_ACCOUNT or SERVICE_ACCOUNT (no wildcards, as in Istio)",
            'write e.g. "default/client"',
        )
        for i, v in enumerate(values)
        if not _SERVICE_ACCOUNT.match(v)
    ]


def split_service_account(value: str, namespace: str | None) -> tuple[str, str]:
    """`ns/sa` -> (ns, sa); a bare `sa` is in `namespace` (the policy's, as Istio reads it)."""
    ns, sep, sa = value.partition("/")
    if sep:
        return ns, sa
    if namespace is None:
        raise ValueError(f"service account {value!r} has no namespace and the policy is mesh-wide")
    return namespace, value


def _ports(values: tuple[int, ...], key: str) -> list[Issue]:
    return [
        Issue((key, i), f"{key}: port {p} is outside 1-65535")
        for i, p in enumerate(values)
        if not 0 < p < 65536
    ]


def _check_name(value: str, key: str) -> list[Issue]:
    if not _NAME.match(value):
        return [Issue((key,), f"{key} {value!r} must be lowercase letters, digits, '.', '-', '_'")]
    return []


# ---- authorization ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Who connects (Istio `from.source`). Fields AND'd; values within a field OR'd.

    An entry that sets no field matches any source (Istio's docs: an unset source allows any).
    """

    principals: tuple[str, ...] = field(
        default=(), metadata=doc("peer identities, td/ns/NS/sa/SA or spiffe://")
    )
    not_principals: tuple[str, ...] = field(default=(), metadata=doc("peer identities that must not match"))
    service_accounts: tuple[str, ...] = field(
        default=(),
        metadata=doc("peer service accounts, NS/SA or SA (the policy's namespace); any trust domain"),
    )
    not_service_accounts: tuple[str, ...] = field(
        default=(), metadata=doc("peer service accounts that must not match")
    )
    namespaces: tuple[str, ...] = field(default=(), metadata=doc("peer namespaces (from the mTLS identity)"))
    not_namespaces: tuple[str, ...] = field(default=(), metadata=doc("peer namespaces that must not match"))
    ip_blocks: tuple[str, ...] = field(default=(), metadata=doc("source IPs or CIDR blocks"))
    not_ip_blocks: tuple[str, ...] = field(
        default=(), metadata=doc("source IPs or CIDR blocks that must not match")
    )
    remote_ip_blocks: tuple[str, ...] = field(
        default=(), metadata=doc("the remote (peer) address: meshd trusts no proxy hops, so the connection's")
    )
    not_remote_ip_blocks: tuple[str, ...] = field(
        default=(), metadata=doc("remote addresses that must not match")
    )
    request_principals: tuple[str, ...] = field(
        default=(),
        metadata=doc("JWT principals ISS/SUB (L7; meshd has no JWT authentication: never present)"),
    )
    not_request_principals: tuple[str, ...] = field(
        default=(), metadata=doc("JWT principals that must not match (L7)")
    )

    @property
    def has_l7(self) -> bool:
        return any(getattr(self, f) for f in L7_FROM_FIELDS)

    def check(self) -> list[Issue]:
        issues = _principals(self.principals, "principals") + _principals(
            self.not_principals, "not_principals"
        )
        issues += _patterns(self.namespaces, "namespaces") + _patterns(self.not_namespaces, "not_namespaces")
        issues += _ip_blocks(self.ip_blocks, "ip_blocks") + _ip_blocks(self.not_ip_blocks, "not_ip_blocks")
        issues += _ip_blocks(self.remote_ip_blocks, "remote_ip_blocks")
        issues += _ip_blocks(self.not_remote_ip_blocks, "not_remote_ip_blocks")
        issues += _patterns(self.request_principals, "request_principals")
        issues += _patterns(self.not_request_principals, "not_request_principals")
        issues += _service_accounts(self.service_accounts, "service_accounts")
        issues += _service_accounts(self.not_service_accounts, "not_service_accounts")
        if (self.service_accounts or self.not_service_accounts) and (
            self.principals or self.not_principals or self.namespaces or self.not_namespaces
        ):
            key = "service_accounts" if self.service_accounts else "not_service_accounts"
            issues.append(
                Issue(
                    (key,),
                    "service_accounts cannot be set with principals or namespaces in one `from` entry (as in Istio)",
                    "use one or the other, or put them in separate `from` entries (OR'd)",
                )
            )
        return issues


@dataclass(frozen=True)
class Operation:
    """What is asked for (Istio `to.operation`). Ports are L4; methods, paths and hosts need a waypoint."""

    ports: tuple[int, ...] = field(default=(), metadata=doc("destination ports"))
    not_ports: tuple[int, ...] = field(default=(), metadata=doc("destination ports that must not match"))
    methods: tuple[str, ...] = field(default=(), metadata=doc("HTTP methods (L7)"))
    not_methods: tuple[str, ...] = field(default=(), metadata=doc("HTTP methods that must not match (L7)"))
    paths: tuple[str, ...] = field(default=(), metadata=doc("HTTP paths, query string excluded (L7)"))
    not_paths: tuple[str, ...] = field(default=(), metadata=doc("HTTP paths that must not match (L7)"))
    hosts: tuple[str, ...] = field(default=(), metadata=doc("HTTP Host / :authority, case-insensitive (L7)"))
    not_hosts: tuple[str, ...] = field(default=(), metadata=doc("hosts that must not match (L7)"))

    @property
    def has_l7(self) -> bool:
        return any(getattr(self, f) for f in L7_TO_FIELDS)

    def check(self) -> list[Issue]:
        issues = _ports(self.ports, "ports") + _ports(self.not_ports, "not_ports")
        for key in ("methods", "not_methods", "hosts", "not_hosts"):
            issues += _patterns(getattr(self, key), key)
        for key in ("paths", "not_paths"):
            for i, p in enumerate(getattr(self, key)):
                if "{" in p:
                    issues.append(Issue((key, i), f"{key}: path templates ({{*}}, {{**}}) are not supported"))
                elif problem := check_pattern(p):
                    issues.append(
                        Issue((key, i), f"{key}: {problem}", "write an exact path, /prefix*, *suffix or *")
                    )
                elif not p.startswith(("/", "*")):
                    issues.append(
                        Issue((key, i), f"{key}: {p!r} must start with '/' or '*'", f'write "/{p}"')
                    )
        if not any(getattr(self, f) for f in self.__dataclass_fields__):
            issues.append(Issue((), "a `to` entry sets no field", "remove `to` to match any operation"))
        return issues


@dataclass(frozen=True)
class Condition:
    """An extra attribute test (Istio `when`): the key's value must match `values` and not `not_values`."""

    key: str = field(metadata=doc("source.ip, source.namespace, source.principal, destination.ip, ..."))
    values: tuple[str, ...] = field(default=(), metadata=doc("values that match (OR'd)"))
    not_values: tuple[str, ...] = field(default=(), metadata=doc("values that must not match"))

    @property
    def is_l7(self) -> bool:
        return self.key.startswith("request.")

    def check(self) -> list[Issue]:
        try:
            kind, _ = parse_when_key(self.key)
        except ValueError as exc:
            return [Issue(("key",), str(exc), f"supported: {', '.join(WHEN_KEYS)}")]
        issues: list[Issue] = []
        if not self.values and not self.not_values:
            issues.append(
                Issue((), f"when {self.key!r} sets neither values nor not_values", 'add values = ["..."]')
            )
        for key in ("values", "not_values"):
            values: tuple[str, ...] = getattr(self, key)
            if kind in ("source.ip", "destination.ip", "remote.ip"):
                issues += _ip_blocks(values, key)
            elif kind == "source.principal":
                issues += _principals(values, key)
            elif kind == "destination.port":
                issues += [
                    Issue((key, i), f"{key}: {v!r} is not a port 1-65535", 'write ports as strings: ["7000"]')
                    for i, v in enumerate(values)
                    if not (v.isdigit() and 0 < int(v) < 65536)
                ]
            else:
                issues += _patterns(values, key)
        return issues


@dataclass(frozen=True)
class Rule:
    """`from`, `to` and `when` are AND'd; entries within `from` (or `to`) are OR'd; `when` entries AND'd."""

    sources: tuple[Source, ...] | None = field(
        default=None, metadata=doc("who; omitted = anyone", toml="from")
    )
    operations: tuple[Operation, ...] | None = field(
        default=None, metadata=doc("what; omitted = anything", toml="to")
    )
    conditions: tuple[Condition, ...] | None = field(default=None, metadata=doc("extra tests", toml="when"))

    @property
    def has_l7(self) -> bool:
        return (
            any(op.has_l7 for op in self.operations or ())
            or any(c.is_l7 for c in self.conditions or ())
            or any(s.has_l7 for s in self.sources or ())
        )

    def check(self) -> list[Issue]:
        # `from = []` is accepted and means any source, as an omitted `from` does (see Source).
        return [
            Issue((key,), f"{key} = [] is empty", f"remove {key} to match anything, or add an entry")
            for key, value in (("to", self.operations), ("when", self.conditions))
            if value is not None and not value
        ]


@dataclass(frozen=True)
class AuthorizationPolicy:
    name: str = field(metadata=doc("unique across the policy folder; shown in decisions and logs"))
    namespace: str | None = field(
        default=None, metadata=doc("workloads of this namespace; omitted = mesh-wide")
    )
    workloads: tuple[str, ...] = field(
        default=(), metadata=doc("only these workload names (needs namespace)")
    )
    selector: dict[str, str] = field(
        default_factory=dict, metadata=doc("workload labels that must all match")
    )
    action: Action = field(default="ALLOW", metadata=doc("ALLOW, DENY or AUDIT (log only)"))
    rules: tuple[Rule, ...] = field(default=(), metadata=doc("OR'd; none = the policy matches nothing"))
    dry_run: bool = field(
        default=False, metadata=doc("evaluated and reported (metric, access log, explain), never enforced")
    )

    def check(self) -> list[Issue]:
        issues = _check_scope(self.name, self.namespace, self.workloads)
        if self.dry_run and self.action == "AUDIT":
            issues.append(
                Issue(
                    ("dry_run",),
                    "dry_run is for ALLOW and DENY policies: an AUDIT policy never enforces anything",
                    "remove dry_run",
                )
            )
        if self.namespace is None:  # a bare service account names the policy's namespace: there is none
            for j, rule in enumerate(self.rules):
                for k, src in enumerate(rule.sources or ()):
                    for key in ("service_accounts", "not_service_accounts"):
                        for n, v in enumerate(getattr(src, key)):
                            if "/" not in v:
                                issues.append(
                                    Issue(
                                        ("rules", j, "from", k, key, n),
                                        f"{key}: {v!r} has no namespace, and a mesh-wide policy has none to lend it",
                                        f'write "NAMESPACE/{v}"',
                                    )
                                )
        return issues


def _check_scope(name: str, namespace: str | None, workloads: tuple[str, ...]) -> list[Issue]:
    issues = _check_name(name, "name")
    if namespace is not None:
        issues += _check_name(namespace, "namespace")
    elif workloads:
        issues.append(
            Issue(
                ("workloads",),
                "workloads needs a namespace",
                'workload names are per namespace: add namespace = "default"',
            )
        )
    for i, w in enumerate(workloads):
        issues += [Issue(("workloads", i), issue.message) for issue in _check_name(w, "workload")]
    return issues


# ---- peer authentication ------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerAuthentication:
    name: str = field(metadata=doc("unique across the policy folder"))
    mode: MtlsMode = field(metadata=doc("STRICT (mTLS only) or PERMISSIVE (plaintext accepted too)"))
    namespace: str | None = field(
        default=None, metadata=doc("workloads of this namespace; omitted = mesh-wide")
    )
    workloads: tuple[str, ...] = field(
        default=(), metadata=doc("only these workload names (needs namespace)")
    )

    def check(self) -> list[Issue]:
        return _check_scope(self.name, self.namespace, self.workloads)


# ---- waypoint routes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StringMatch:
    """Exactly one of exact, prefix or regex (Python `re`, full match, compiled at load)."""

    exact: str | None = field(default=None, metadata=doc("the whole value"))
    prefix: str | None = field(default=None, metadata=doc("the start of the value"))
    regex: str | None = field(default=None, metadata=doc("a regular expression the whole value matches"))

    def check(self) -> list[Issue]:
        set_ = [k for k in ("exact", "prefix", "regex") if getattr(self, k) is not None]
        if len(set_) != 1:
            return [
                Issue(
                    (), f"a match sets {' and '.join(set_) or 'nothing'}", "set one of exact, prefix, regex"
                )
            ]
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                return [Issue(("regex",), f"regex {self.regex!r} does not compile: {exc}")]
        return []


@dataclass(frozen=True)
class RouteMatch:
    """Every field set must match (AND); a route's `match` entries are OR'd."""

    path: StringMatch | None = field(default=None, metadata=doc("the path, query string excluded"))
    methods: tuple[str, ...] = field(default=(), metadata=doc("HTTP methods (any of)"))
    headers: dict[str, StringMatch] = field(default_factory=dict, metadata=doc("header name -> match"))
    query: dict[str, StringMatch] = field(default_factory=dict, metadata=doc("query parameter -> match"))

    def check(self) -> list[Issue]:
        issues: list[Issue] = []
        p = self.path
        for value in (p.exact, p.prefix) if p is not None else ():
            if value is not None and not value.startswith("/"):
                issues.append(Issue(("path",), f"path {value!r} must start with '/'", f'write "/{value}"'))
        for i, m in enumerate(self.methods):
            if not m or m != m.upper() or not _HEADER_NAME.match(m):
                issues.append(Issue(("methods", i), f"method {m!r} must be an upper-case token", "e.g. GET"))
        for name in self.headers:
            if not _HEADER_NAME.match(name):
                issues.append(Issue(("headers", name), f"{name!r} is not an HTTP header name"))
        return issues


@dataclass(frozen=True)
class RouteBackend:
    service: str | None = field(default=None, metadata=doc("name.namespace; default the route's service"))
    subset: dict[str, str] = field(default_factory=dict, metadata=doc("workload labels the endpoints carry"))
    weight: int = field(default=1, metadata=doc("relative share of requests"))
    port: int | None = field(default=None, metadata=doc("service port; default the request's"))

    def check(self) -> list[Issue]:
        issues = [] if 0 <= self.weight <= 1_000_000 else [Issue(("weight",), "weight must be 0-1000000")]
        if self.port is not None:
            issues += _ports((self.port,), "port")
        return issues


@dataclass(frozen=True)
class CircuitBreaker:
    max_pending_requests: int = field(default=1024, metadata=doc("requests waiting for a connection"))
    max_connections: int = field(default=1024, metadata=doc("connections to one backend"))

    def check(self) -> list[Issue]:
        return [
            Issue((k,), f"{k} must be at least 1")
            for k in ("max_pending_requests", "max_connections")
            if getattr(self, k) < 1
        ]


@dataclass(frozen=True)
class OutlierDetection:
    consecutive_errors: int = field(default=5, metadata=doc("5xx / connect failures in a row that eject"))
    base_ejection_time: timedelta = field(default=timedelta(seconds=30), metadata=doc("first ejection"))
    max_ejection_time: timedelta = field(default=timedelta(minutes=5), metadata=doc("longest ejection"))

    def check(self) -> list[Issue]:
        if self.consecutive_errors < 1:
            return [Issue(("consecutive_errors",), "consecutive_errors must be at least 1")]
        return []


@dataclass(frozen=True)
class FilterRef:
    """`{ name = "ratelimit", settings = { ... } }`. `settings` is read by the filter's own schema at load."""

    name: str = field(metadata=doc("a filter offered by a plugin (`meshd plugins` lists them)"))
    settings: Any = field(default=None, metadata=doc("the filter's settings, validated when policy loads"))


@dataclass(frozen=True)
class Route:
    name: str = field(metadata=doc("unique across the policy folder"))
    service: str | None = field(default=None, metadata=doc("the service (name.namespace) it applies to"))
    hosts: tuple[str, ...] = field(
        default=(), metadata=doc("Host / :authority patterns (exact, *.suffix, *)")
    )
    match: tuple[RouteMatch, ...] = field(default=(), metadata=doc("OR'd; none = every request"))
    backends: tuple[RouteBackend, ...] = field(default=(), metadata=doc("weighted; none = the service"))
    timeout: timedelta | None = field(default=None, metadata=doc("for the upstream's answer, all tries"))
    retries: RetrySettings | None = field(default=None, metadata=doc("retry policy (as the retries filter)"))
    filters: tuple[FilterRef, ...] = field(default=(), metadata=doc("plugin filters, in order"))
    load_balancer: Literal["round_robin", "least_request"] = field(
        default="round_robin", metadata=doc("how an endpoint is picked")
    )
    circuit_breaker: CircuitBreaker | None = field(default=None, metadata=doc("limits per backend"))
    outlier_detection: OutlierDetection | None = field(
        default=None, metadata=doc("ejecting failing endpoints")
    )

    def check(self) -> list[Issue]:
        issues = _check_name(self.name, "name")
        issues += _patterns(self.hosts, "hosts")
        for i, b in enumerate(self.backends):
            if b.service is None and self.service is None:
                issues.append(
                    Issue(
                        ("backends", i),
                        "backend without service, and the route has none",
                        'add service = "name.namespace"',
                    )
                )
        if self.backends and not any(b.weight for b in self.backends):
            issues.append(Issue(("backends",), "every backend has weight 0", "give one a weight above 0"))
        if self.timeout is not None and self.timeout.total_seconds() <= 0:
            issues.append(Issue(("timeout",), "timeout must be longer than 0"))
        if not self.backends and self.service is None:
            issues.append(
                Issue(
                    (),
                    f"route {self.name!r} names no service and no backends",
                    'add service = "name.namespace"',
                )
            )
        return issues


# ---- a file -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyFile:
    """One file of the policy folder. Add new kinds (e.g. waypoint routes) as fields here."""

    authorizations: tuple[AuthorizationPolicy, ...] = field(
        default=(), metadata=doc("[[authorization]] tables", toml="authorization")
    )
    peer_authentications: tuple[PeerAuthentication, ...] = field(
        default=(), metadata=doc("[[peer_authentication]] tables", toml="peer_authentication")
    )
    routes: tuple[Route, ...] = field(default=(), metadata=doc("[[route]] tables (waypoint)", toml="route"))
