"""Istio AuthorizationPolicy YAML -> meshd policy TOML (`meshd policy import`). Pure: text in, text out.

Rule 1: all or nothing. A file converts only if every policy in it converts whole; anything meshd cannot
express is refused with FILE:LINE and why, and nothing is written. Dropping a field, a rule or a policy
silently would change what the folder allows (a dropped ALLOW can open a workload to everyone).
Rule 2: the TOML written is checked by meshd's own policy schema before it is returned, so what
`import` prints loads.

Scope: `metadata.namespace` becomes `namespace` (the root namespace, `istio-system` unless told
otherwise, means mesh-wide, as in Istio); `selector.matchLabels` becomes `selector` (the labels of
meshd's workload config); `targetRefs` (Gateway, Service, ServiceEntry) have no meshd equivalent and
are refused. The `istio.io/dry-run` annotation becomes `dry_run`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meshd.config.schema import build
from meshd.errors import ConfigError, Problem
from meshd.policy.model import PolicyFile, parse_when_key

DRY_RUN_ANNOTATION = "istio.io/dry-run"
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
ISTIO_DEFAULT_TRUST_DOMAIN = "cluster.local"

_SOURCE_KEYS = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "requestPrincipals": "request_principals",
    "notRequestPrincipals": "not_request_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "ipBlocks": "ip_blocks",
    "notIpBlocks": "not_ip_blocks",
    "remoteIpBlocks": "remote_ip_blocks",
    "notRemoteIpBlocks": "not_remote_ip_blocks",
    "serviceAccounts": "service_accounts",
    "notServiceAccounts": "not_service_accounts",
}
_OPERATION_KEYS = {
    "hosts": "hosts",
    "notHosts": "not_hosts",
    "ports": "ports",
    "notPorts": "not_ports",
    "methods": "methods",
    "notMethods": "not_methods",
    "paths": "paths",
    "notPaths": "not_paths",
}
# Go's strconv.ParseBool, which istiod uses for the dry-run annotation.
_GO_BOOLS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}


@dataclass(frozen=True)
class _Y:
    """A YAML value with the line it starts on (1-based): dict[str, _Y] | list[_Y] | a scalar."""

    value: Any
    line: int


class _Refused(Exception):
    """This policy cannot be converted: `line` and why (the caller adds the file and the policy)."""

    def __init__(self, line: int, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class Options:
    root_namespace: str = "istio-system"  # a policy there is mesh-wide
    default_namespace: str = "default"  # for a policy without metadata.namespace (kubectl's default)
    trust_domain: str | None = None  # rewrite principals of cluster.local into this trust domain


@dataclass
class _Converted:
    table: dict[str, Any]
    notes: list[str]
    line: int
    key: tuple[str, str]  # (namespace as written, name): Kubernetes' identity of the resource


@dataclass(frozen=True)
class ImportResult:
    toml: str
    count: int  # policies converted
    notes: tuple[str, ...] = field(default=())


def _tree(node: yaml.Node, loader: yaml.SafeLoader) -> _Y:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, _Y] = {}
        for k, v in node.value:
            out[str(loader.construct_object(k))] = _tree(v, loader)
        return _Y(out, line)
    if isinstance(node, yaml.SequenceNode):
        return _Y([_tree(v, loader) for v in node.value], line)
    return _Y(loader.construct_object(node), line)


def _documents(text: str, file: str) -> list[_Y]:
    loader = yaml.SafeLoader("")
    try:
        return [_tree(node, loader) for node in yaml.compose_all(text, Loader=yaml.SafeLoader) if node]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem(file, line, f"YAML syntax: {problem}")]) from None


def _mapping(y: _Y | None, what: str) -> dict[str, _Y]:
    if y is None or y.value is None:
        return {}
    if not isinstance(y.value, dict):
        raise _Refused(y.line, f"{what} must be a mapping")
    return y.value


def _list(y: _Y | None, what: str) -> list[_Y]:
    if y is None or y.value is None:
        return []
    if not isinstance(y.value, list):
        raise _Refused(y.line, f"{what} must be a list")
    return y.value


def _strings(y: _Y, what: str) -> list[str]:
    out = []
    for item in _list(y, what):
        if isinstance(item.value, bool) or not isinstance(item.value, str | int):
            raise _Refused(item.line, f"{what}: {item.value!r} is not a string")
        out.append(str(item.value))
    return out


def _unknown(fields: Mapping[str, _Y], known: Mapping[str, object] | set[str], what: str) -> None:
    for key, y in fields.items():
        if key not in known:
            raise _Refused(y.line, f"{what}.{key} is not an AuthorizationPolicy field meshd knows")


def _principal(value: str, opts: Options) -> str:
    if opts.trust_domain is None:
        return value
    body = value.removeprefix("spiffe://")
    td, sep, rest = body.partition("/")
    if sep and td == ISTIO_DEFAULT_TRUST_DOMAIN:
        return f"{opts.trust_domain}/{rest}"
    return value


def _source(y: _Y, opts: Options) -> dict[str, Any]:
    fields = _mapping(y, "from[].source")
    for key in ("trustDomains", "notTrustDomains"):
        if key in fields:
            raise _Refused(
                fields[key].line,
                f"from.source.{key} has no meshd equivalent (a node admits peers of its own trust domain only)",
                "match principals (td/ns/NS/sa/SA patterns) instead",
            )
    _unknown(fields, _SOURCE_KEYS, "from.source")
    out: dict[str, Any] = {}
    for key, y_val in fields.items():
        values = _strings(y_val, f"from.source.{key}")
        if key in ("principals", "notPrincipals"):
            values = [_principal(v, opts) for v in values]
        out[_SOURCE_KEYS[key]] = values
    return out


def _operation(y: _Y) -> dict[str, Any]:
    fields = _mapping(y, "to[].operation")
    _unknown(fields, _OPERATION_KEYS, "to.operation")
    out: dict[str, Any] = {}
    for key, y_val in fields.items():
        values = _strings(y_val, f"to.operation.{key}")
        if key in ("ports", "notPorts"):
            if bad := [v for v in values if not v.isdigit()]:
                raise _Refused(y_val.line, f"to.operation.{key}: {bad[0]!r} is not a port number")
            out[_OPERATION_KEYS[key]] = [int(v) for v in values]
            continue
        if key in ("paths", "notPaths") and any("{" in v for v in values):
            raise _Refused(
                y_val.line,
                f"to.operation.{key}: path templates ({{*}}, {{**}}) are not supported by meshd",
                "write prefix* / *suffix patterns instead",
            )
        out[_OPERATION_KEYS[key]] = values
    return out


def _condition(y: _Y, opts: Options) -> dict[str, Any]:
    fields = _mapping(y, "when[]")
    _unknown(fields, {"key", "values", "notValues"}, "when")
    key_y = fields.get("key")
    if key_y is None or not isinstance(key_y.value, str):
        raise _Refused(y.line, "a when condition needs a key")
    key = key_y.value
    if key.startswith("request.auth.") and key != "request.auth.principal":
        raise _Refused(
            key_y.line,
            f"when key {key!r} needs request authentication (JWT), which meshd does not have",
            "request.auth.principal (never present) is the only request.auth key meshd reads",
        )
    try:
        parse_when_key(key)
    except ValueError as exc:
        raise _Refused(key_y.line, f"when: {exc}", "meshd's when keys are listed in docs/policy.md") from None
    out: dict[str, Any] = {"key": key}
    for src, dst in (("values", "values"), ("notValues", "not_values")):
        if src in fields:
            values = _strings(fields[src], f"when.{src}")
            if key == "source.principal":
                values = [_principal(v, opts) for v in values]
            out[dst] = values
    return out


def _rule(y: _Y, opts: Options) -> dict[str, Any]:
    fields = _mapping(y, "rules[]")
    _unknown(fields, {"from", "to", "when"}, "rules[]")
    rule: dict[str, Any] = {}
    if "from" in fields:
        sources = []
        for entry in _list(fields["from"], "from"):
            inner = _mapping(entry, "from[]")
            _unknown(inner, {"source"}, "from[]")
            sources.append(_source(inner["source"], opts) if "source" in inner else {})
        rule["from"] = sources
    if "to" in fields:
        operations = []
        for entry in _list(fields["to"], "to"):
            inner = _mapping(entry, "to[]")
            _unknown(inner, {"operation"}, "to[]")
            if "operation" not in inner:
                raise _Refused(entry.line, "a `to` entry without operation (Istio rejects it too)")
            operations.append(_operation(inner["operation"]))
        rule["to"] = operations
    if "when" in fields:
        rule["when"] = [_condition(c, opts) for c in _list(fields["when"], "when")]
    return rule


def _target_text(ref: Mapping[str, _Y]) -> str:
    """`Service web` for a targetRef, for the refusal."""
    return " ".join(str(ref[k].value) if k in ref else "?" for k in ("kind", "name"))


def _policy(doc: _Y, opts: Options) -> _Converted:
    top = _mapping(doc, "the document")
    meta = _mapping(top.get("metadata"), "metadata")
    spec = _mapping(top.get("spec"), "spec")
    name_y = meta.get("name")
    if name_y is None or not isinstance(name_y.value, str):
        raise _Refused(doc.line, "metadata.name is missing")
    namespace_y = meta.get("namespace")
    written_ns = str(namespace_y.value) if namespace_y is not None else None
    notes: list[str] = []
    table: dict[str, Any] = {"name": name_y.value}
    ns = written_ns if written_ns is not None else opts.default_namespace
    if written_ns is None:
        notes.append(f"no metadata.namespace: namespace {ns!r} assumed (as kubectl would)")
    if ns != opts.root_namespace:
        table["namespace"] = ns
    else:
        notes.append(f"in the root namespace {ns!r}: mesh-wide")
    annotations = _mapping(meta.get("annotations"), "metadata.annotations")
    if DRY_RUN_ANNOTATION in annotations:
        raw = str(annotations[DRY_RUN_ANNOTATION].value)
        if raw not in _GO_BOOLS:
            raise _Refused(
                annotations[DRY_RUN_ANNOTATION].line,
                f"annotation {DRY_RUN_ANNOTATION}: {raw!r} is not true or false",
            )
        if _GO_BOOLS[raw]:
            table["dry_run"] = True
    for key in ("targetRef", "targetRefs"):
        if key in spec:
            refs = [spec[key]] if key == "targetRef" else _list(spec[key], key)
            kinds = ", ".join(_target_text(_mapping(r, key)) for r in refs)
            raise _Refused(
                spec[key].line,
                f"spec.{key} ({kinds}) attaches the policy to a Gateway, Service or ServiceEntry: meshd "
                "scopes policies to workloads",
                "write namespace/workloads/selector for the workloads behind it by hand",
            )
    action_y = spec.get("action")
    action = str(action_y.value) if action_y is not None else "ALLOW"
    if action == "CUSTOM":
        raise _Refused(
            action_y.line if action_y else doc.line,
            "action CUSTOM (external authorization) has no meshd equivalent",
        )
    if "provider" in spec:
        raise _Refused(
            spec["provider"].line, "spec.provider (CUSTOM external authorization) is not supported"
        )
    if action not in ("ALLOW", "DENY", "AUDIT"):
        raise _Refused(
            action_y.line if action_y else doc.line, f"action {action!r} is not ALLOW, DENY or AUDIT"
        )
    if action != "ALLOW":
        table["action"] = action
    if action == "AUDIT" and table.pop("dry_run", False):
        notes.append("dry-run AUDIT: an AUDIT policy never enforces anything, so dry_run is dropped")
    selector = _mapping(spec.get("selector"), "spec.selector")
    _unknown(selector, {"matchLabels"}, "spec.selector")
    labels = _mapping(selector.get("matchLabels"), "spec.selector.matchLabels")
    if labels:
        table["selector"] = {k: str(v.value) for k, v in labels.items()}
        notes.append("selector: matches the `labels` of workloads in meshd's config")
    _unknown(spec, {"selector", "action", "rules", "targetRef", "targetRefs", "provider"}, "spec")
    if "rules" in spec:
        rules = [_rule(r, opts) for r in _list(spec["rules"], "spec.rules")]
        if rules:
            table["rules"] = rules
    if not table.get("rules"):
        notes.append("no rules: matches nothing" + (" (ALLOW: allow-nothing)" if action == "ALLOW" else ""))
    return _Converted(table, notes, doc.line, (ns, name_y.value))


def _policies(doc: _Y) -> list[_Y]:
    """A document, or the items of a `kind: List` / `AuthorizationPolicyList` (kubectl get -o yaml)."""
    top = _mapping(doc, "the document")
    kind = top.get("kind")
    if kind is not None and isinstance(kind.value, str) and kind.value.endswith("List"):
        return [i for item in _list(top.get("items"), "items") for i in _policies(item)]
    return [doc]


def _name_of(doc: _Y) -> str | None:
    try:
        name = _mapping(_mapping(doc, "").get("metadata"), "").get("name")
    except _Refused:
        return None
    return str(name.value) if name is not None else None


def _check_kind(doc: _Y) -> None:
    top = _mapping(doc, "the document")
    kind = top.get("kind")
    api = top.get("apiVersion")
    if kind is None or kind.value != "AuthorizationPolicy":
        raise _Refused(
            kind.line if kind else doc.line,
            f"kind {kind.value if kind else None!r} is not an AuthorizationPolicy (only those convert)",
        )
    if api is None or not str(api.value).startswith("security.istio.io/"):
        raise _Refused(
            api.line if api else doc.line,
            f"apiVersion {api.value if api else None!r} is not security.istio.io/*",
        )


def convert(text: str, file: str, opts: Options = Options()) -> ImportResult:
    """Every AuthorizationPolicy of a YAML stream as one meshd TOML file; raise ConfigError listing
    every policy that cannot be converted (and write nothing)."""
    problems: list[Problem] = []
    converted: list[_Converted] = []
    for doc in _documents(text, file):
        try:
            items = _policies(doc)
        except _Refused as exc:
            problems.append(Problem(file, exc.line, exc.message, exc.hint))
            continue
        for item in items:
            try:
                _check_kind(item)
                converted.append(_policy(item, opts))
            except _Refused as exc:
                name = _name_of(item)
                label = f"policy {name!r}: " if name is not None else ""
                problems.append(Problem(file, exc.line, label + exc.message, exc.hint))
    problems += _duplicates(converted, file)
    if not problems:
        problems += _validate(converted, file)
    if problems:
        raise ConfigError(problems)
    return ImportResult(
        _render(converted, file), len(converted), tuple(n for c in converted for n in c.notes)
    )


def _duplicates(converted: list[_Converted], file: str) -> list[Problem]:
    """The same namespace/name twice is one Kubernetes resource written twice; the same name in two
    namespaces is two policies, and meshd names are unique per folder: those get NAME.NAMESPACE."""
    out: list[Problem] = []
    seen: dict[tuple[str, str], int] = {}
    for c in converted:
        if c.key in seen:
            out.append(
                Problem(
                    file,
                    c.line,
                    f"{c.key[0]}/{c.key[1]} is defined again (first at line {seen[c.key]}): in Kubernetes the "
                    "later one replaces the earlier",
                    "keep one of them",
                )
            )
        seen.setdefault(c.key, c.line)
    names: dict[str, int] = {}
    for c in converted:
        names[c.table["name"]] = names.get(c.table["name"], 0) + 1
    for c in converted:
        if names[c.table["name"]] > 1:
            c.table["name"] = f"{c.key[1]}.{c.key[0]}"
            c.notes.append(
                f"renamed {c.key[1]!r} -> {c.table['name']!r}: meshd policy names are unique per folder"
            )
    return out


def _validate(converted: list[_Converted], file: str) -> list[Problem]:
    """meshd's own schema checks (patterns, CIDRs, principals, ...), reported at the YAML document."""
    out: list[Problem] = []
    for c in converted:
        try:
            build(PolicyFile, {"authorization": [c.table]}, file, Path("."))
        except ConfigError as exc:
            out += [
                Problem(file, c.line, f"policy {c.table['name']!r}: {p.message}", p.hint)
                for p in exc.problems
            ]
    return out


# ---- TOML out -------------------------------------------------------------------------------------


def _inline(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string for the text policies hold
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_key(k)} = {_inline(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")  # a bug: the converter builds only the above


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _render(converted: list[_Converted], file: str) -> str:
    out = [f"# Converted from {file} by `meshd policy import`.\n"]
    emit: Callable[[str], None] = out.append
    for c in converted:
        emit(f"\n# {c.key[0]}/{c.key[1]} ({file}:{c.line})\n")
        for note in c.notes:
            emit(f"# note: {note}\n")
        emit("[[authorization]]\n")
        for key, value in c.table.items():
            if key == "rules":
                emit("rules = [\n" + "".join(f"  {_inline(r)},\n" for r in value) + "]\n")
            else:
                emit(f"{key} = {_inline(value)}\n")
    return "".join(out)
