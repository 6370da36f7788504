"""Reading the policy folder: `*.toml` files -> one immutable PolicySet, or every problem at once.

All files are read and checked before anything is returned, so a reload either applies the whole
folder or nothing (the caller keeps the previous PolicySet on ConfigError). Problems and warnings
have the `FILE:LINE: what (hint)` shape of config errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from meshd.config.schema import KeyPath, build, parse_toml
from meshd.config.toml_lines import KeyLines
from meshd.errors import ConfigError, Problem
from meshd.plugins.manager import RegisteredFilter, filter_types, make_plugin_manager
from meshd.policy.evaluate import PolicySet, l7_fields
from meshd.policy.model import (
    AuthorizationPolicy,
    Located,
    Origin,
    PeerAuthentication,
    PolicyFile,
    Route,
    Rule,
    canonical_principal,
)
from meshd.policy.routes import RouteFile, load_routes, split_filter_settings

Role = Literal["node", "waypoint", "gateway"]


@dataclass(frozen=True, slots=True)
class _File:
    name: str
    doc: PolicyFile
    lines: KeyLines
    filter_settings: Mapping[tuple[int, int], Any]  # route[i].filters[j].settings, raw

    def origin(self, *path: str | int) -> Origin:
        return Origin(self.name, self.lines.line_of(path))

    def line(self, path: KeyPath) -> int | None:
        return self.lines.line_of(path)


def policy_files(directory: Path) -> list[Path]:
    """The files a folder contributes, in the order they are read: `*.toml` by name, dotfiles skipped."""
    return sorted((p for p in directory.glob("*.toml") if not p.name.startswith(".")), key=lambda p: p.name)


def load_policy_dir(
    directory: Path | None,
    *,
    role: Role,
    filter_types: Mapping[str, RegisteredFilter] | None = None,
    trust_domain: str | None = None,
) -> tuple[PolicySet, list[Problem]]:
    """Load every policy file; return (policies, warnings) or raise ConfigError listing all problems.

    `directory=None` (no `policy.dir` configured) gives an empty PolicySet: everything allowed, PERMISSIVE.
    Routes' filters come from `filter_types` (default: built when a route names a filter, from
    `make_plugin_manager()`); their settings are validated and the filters built here. With
    `trust_domain`, a principal of another trust domain is warned about (no peer can present it).
    """
    if directory is None:
        return PolicySet(), []
    if not directory.exists():
        raise ConfigError(
            [
                Problem(
                    str(directory),
                    None,
                    "policy folder not found",
                    "create it (it may stay empty) or unset policy.dir",
                )
            ]
        )
    if not directory.is_dir():
        raise ConfigError(
            [Problem(str(directory), None, "policy.dir is not a folder", "point it at a folder of *.toml")]
        )

    problems: list[Problem] = []
    files: list[_File] = []
    for path in policy_files(directory):
        name = str(path)
        try:
            text = path.read_text(encoding="utf-8")
            raw, filter_settings = split_filter_settings(parse_toml(text, name))
            doc = build(PolicyFile, raw, name, path.parent, lines := KeyLines(text))
        except ConfigError as exc:
            problems += exc.problems
            continue
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(name, None, f"cannot read policy file: {exc}"))
            continue
        files.append(_File(name, doc, lines, filter_settings))

    authorizations = [
        Located(a, f.origin("authorization", i)) for f in files for i, a in enumerate(f.doc.authorizations)
    ]
    peer_auths = [
        Located(p, f.origin("peer_authentication", i))
        for f in files
        for i, p in enumerate(f.doc.peer_authentications)
    ]
    problems += _duplicate_names("authorization", authorizations, directory)
    problems += _duplicate_names("peer_authentication", peer_auths, directory)
    problems += _mtls_conflicts(peer_auths)
    route_files = [RouteFile(f.name, f.doc.routes, f.filter_settings, f.lines, directory) for f in files]
    routes, route_problems = load_routes(route_files, lambda: _filter_types(filter_types))
    problems += _duplicate_names("route", [r.located for r in routes], directory) + route_problems
    if problems:
        raise ConfigError(problems)

    warnings: list[Problem] = []
    for f in files:
        for i, policy in enumerate(f.doc.authorizations):
            warnings += _warnings(f, i, policy, role)
            if trust_domain is not None:
                warnings += _foreign_principals(f, i, policy, trust_domain)
    warnings.sort(key=lambda w: (w.file, w.line or 0))  # files are already in name order
    return PolicySet(authorizations, peer_auths, routes), warnings


def _filter_types(given: Mapping[str, RegisteredFilter] | None) -> Mapping[str, RegisteredFilter]:
    return given if given is not None else filter_types(make_plugin_manager())


def _duplicate_names(
    kind: str,
    items: list[Located[AuthorizationPolicy]] | list[Located[PeerAuthentication]] | list[Located[Route]],
    directory: Path,
) -> list[Problem]:
    first: dict[str, Origin] = {}
    out = []
    for item in items:
        name = item.value.name
        if name in first:
            hint = f"first defined at {first[name]}; names must be unique across {directory}"
            out.append(Problem(item.origin.file, item.origin.line, f"duplicate {kind} name {name!r}", hint))
        else:
            first[name] = item.origin
    return out


def _mtls_conflicts(items: list[Located[PeerAuthentication]]) -> list[Problem]:
    seen: dict[tuple[str | None, str | None], Located[PeerAuthentication]] = {}
    out = []
    for item in items:
        pa = item.value
        for w in pa.workloads or (None,):
            key = (pa.namespace, w)
            other = seen.setdefault(key, item)
            if other is item:
                continue
            scope = (
                "mesh-wide"
                if pa.namespace is None
                else f"namespace {pa.namespace}"
                if w is None
                else f"{pa.namespace}/{w}"
            )
            out.append(
                Problem(
                    item.origin.file,
                    item.origin.line,
                    f"peer_authentication {pa.name!r} and {other.value.name!r} ({other.origin}) both set the {scope} mTLS mode",
                    "keep one; a more specific scope (namespace, then workloads) overrides a wider one",
                )
            )
    return out


def _entry_text(obj: object, keys: tuple[str, ...]) -> str:
    return " and ".join(f"{k} {list(v)}" for k in keys if (v := getattr(obj, k)))


def l4_summary(rule: Rule) -> str:
    """What a rule still matches at a node once its L7 fields are dropped, in words."""
    parts = []
    sources = [_entry_text(s, _L4_SOURCE_KEYS) for s in rule.sources or ()]
    if sources and all(sources):  # an entry left empty matches any source, and entries are OR'd
        parts.append("from " + " or ".join(sources))
    ops = [_entry_text(op, ("ports", "not_ports")) for op in rule.operations or ()]
    if ops and all(ops):
        parts.append("to " + " or ".join(ops))
    parts += [
        f"when {c.key}"
        + (f" in {list(c.values)}" if c.values else "")
        + (f" not in {list(c.not_values)}" if c.not_values else "")
        for c in rule.conditions or ()
        if not c.is_l7
    ]
    return "every connection " + (", ".join(parts) if parts else "to the workloads it applies to")


def ztunnel_skips(rule: Rule) -> bool:
    """Would ztunnel never match this DENY rule? istiod drops L7 fields, and ztunnel skips an entry left
    empty (an L7 `when` always becomes one), so the clause, and the rule, cannot match."""
    return (
        (
            any(not _entry_text(s, _L4_SOURCE_KEYS) and s.has_l7 for s in rule.sources or ())
            and all(not _entry_text(s, _L4_SOURCE_KEYS) for s in rule.sources or ())
        )
        or (
            any(op.has_l7 for op in rule.operations or ())
            and all(not _entry_text(op, ("ports", "not_ports")) for op in rule.operations or ())
        )
        or any(c.is_l7 for c in rule.conditions or ())
    )


_L4_SOURCE_KEYS = (
    "principals",
    "not_principals",
    "service_accounts",
    "not_service_accounts",
    "namespaces",
    "not_namespaces",
    "ip_blocks",
    "not_ip_blocks",
    "remote_ip_blocks",
    "not_remote_ip_blocks",
)


def _trust_domain_of(principal: str) -> str | None:
    """The trust domain a principal (pattern) names, None when a wildcard covers it."""
    td = canonical_principal(principal).partition("/")[0]
    return None if "*" in td or not td else td


def _foreign_principals(f: _File, i: int, policy: AuthorizationPolicy, trust_domain: str) -> list[Problem]:
    """Principals of another trust domain: the HBONE server admits only its own, so such a principal
    never matches (an ALLOW that admits nobody, a DENY that denies nobody): most likely a typo."""
    out: list[Problem] = []
    for j, rule in enumerate(policy.rules):
        where = ("authorization", i, "rules", j)
        found: list[tuple[tuple[str | int, ...], str]] = [
            ((*where, "from", k, key, n), v)
            for k, src in enumerate(rule.sources or ())
            for key in ("principals", "not_principals")
            for n, v in enumerate(getattr(src, key))
        ]
        found += [
            ((*where, "when", k, key, n), v)
            for k, c in enumerate(rule.conditions or ())
            if c.key == "source.principal"
            for key in ("values", "not_values")
            for n, v in enumerate(getattr(c, key))
        ]
        for path, value in found:
            td = _trust_domain_of(value)
            if td is None or td == trust_domain:
                continue
            body = canonical_principal(value).partition("/")[2]
            out.append(
                Problem(
                    f.name,
                    f.line(path),
                    f"rule {j + 1} of {policy.action} policy {policy.name!r}: principal {value!r} is in trust "
                    f"domain {td!r}, not this mesh's {trust_domain!r}: no peer can present it, so it never matches",
                    f'write "{trust_domain}/{body}"',
                )
            )
    return out


def _warnings(f: _File, i: int, policy: AuthorizationPolicy, role: Role) -> list[Problem]:
    out: list[Problem] = []
    base: tuple[str | int, ...] = ("authorization", i)
    if not policy.rules and policy.action != "ALLOW":
        out.append(
            Problem(
                f.name,
                f.line(base),
                f"{policy.action} policy {policy.name!r} has no rules, so it matches nothing (as in Istio)",
                "to match every connection write rules = [{}]",
            )
        )
    for j, rule in enumerate(policy.rules):
        where = (*base, "rules", j)
        label = f"rule {j + 1} of {policy.action} policy {policy.name!r}"
        for k, op in enumerate(rule.operations or ()):
            for key in ("methods", "not_methods"):
                for m, method in enumerate(getattr(op, key)):
                    if method != method.upper():
                        out.append(
                            Problem(
                                f.name,
                                f.line((*where, "to", k, key, m)),
                                f"{label}: method {method!r} is not upper case; methods are case-sensitive",
                                f"write {method.upper()!r}",
                            )
                        )
        l7 = l7_fields(rule)
        if role != "node" or not l7:
            continue
        uses = ", ".join(l7)
        if policy.action == "DENY":
            message = (
                f"{label} uses L7 fields ({uses}) a node cannot see: it is enforced without them, so it "
                f"denies {l4_summary(rule)}{' (dry run: reported, not enforced)' if policy.dry_run else ''}"
            )
            if ztunnel_skips(rule):
                message += " (ztunnel would skip this rule and deny nothing: meshd fails closed on purpose)"
        else:
            message = f"{label} uses L7 fields ({uses}) a node cannot see: it never matches here"
        out.append(Problem(f.name, f.line(where), message, "L7 rules take effect at a waypoint"))
    return out
