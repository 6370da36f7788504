"""Policy test kit: build a PolicySet from TOML text (or from drawn tables), and connections / requests to decide.

Each table row builds its policy from TOML text, so the tables exercise the same path as a policy file.
`frm`, `to` and `when` build one rule; `allow(...)`/`deny(...)` wrap rules in a policy for default/*.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st

from meshd.config.schema import build, load_document
from meshd.errors import ConfigError
from meshd.identity.spiffe import SpiffeId
from meshd.policy.evaluate import ConnectionAttrs, PolicySet, RequestAttrs
from meshd.policy.model import Located, Origin, PolicyFile

CLIENT = "home.arpa/ns/default/sa/client"
Rule = dict[str, Any]


def policies(text: str) -> PolicySet:
    doc = load_document(PolicyFile, text, "test.toml", Path("."))
    return PolicySet(
        [Located(a, Origin("test.toml", i)) for i, a in enumerate(doc.authorizations)],
        [Located(p, Origin("test.toml", i)) for i, p in enumerate(doc.peer_authentications)],
    )


def inline(value: Any) -> str:
    """A Python value as inline TOML."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {inline(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(inline(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


def frm(**fields: Any) -> Rule:
    return {"from": [fields]}


def to(**fields: Any) -> Rule:
    return {"to": [fields]}


def when(key: str, values: list[str] | None = None, not_values: list[str] | None = None) -> Rule:
    cond: dict[str, Any] = {"key": key}
    if values is not None:
        cond["values"] = values
    if not_values is not None:
        cond["not_values"] = not_values
    return {"when": [cond]}


def both(*rules: Rule) -> Rule:
    """One rule whose `when` lists the conditions of all the given rules (AND'd)."""
    return {"when": [c for r in rules for c in r["when"]]}


def policy(
    action: str,
    *rules: Rule,
    name: str = "p",
    scope: str = 'namespace = "default"',
    workloads: Sequence[str] = (),
    dry_run: bool = False,
) -> str:
    """One [[authorization]] table as TOML text: `scope` lines, then `workloads` and `dry_run` if given."""
    lines = ["[[authorization]]", f'name = "{name}"', f'action = "{action}"', scope]
    if workloads:
        lines.append(f"workloads = {inline(list(workloads))}")
    if dry_run:
        lines.append("dry_run = true")
    if rules:
        lines.append(f"rules = {inline(list(rules))}")
    return "\n".join(lines) + "\n"


allow = functools.partial(policy, "ALLOW")  # allow(*rules, name=..., ...): an ALLOW policy
deny = functools.partial(policy, "DENY")


def conn(
    source: str | None = CLIENT,
    source_ip: str = "127.0.0.1",
    destination_ip: str = "127.0.0.1",
    port: int = 7000,
    ns: str = "default",
    name: str = "echo",
    labels: Mapping[str, str] | None = None,
    network: str = "default",
) -> ConnectionAttrs:
    return ConnectionAttrs(
        source=None if source is None else SpiffeId.parse_principal(source),
        source_ip=source_ip,
        destination_ip=destination_ip,
        destination_port=port,
        workload_namespace=ns,
        workload_name=name,
        workload_labels=labels or {},
        source_network=network,
    )


def request(
    method: str = "GET",
    path: str = "/",
    host: str = "echo.default",
    headers: Mapping[str, str] | None = None,
    **conn_kw: Any,
) -> RequestAttrs:
    return RequestAttrs(conn(**conn_kw), method, path, host, headers or {})


def policy_set(docs: list[dict[str, Any]], *, dry_run: bool | None = None) -> PolicySet:
    """The valid ones of `docs` (drawn [[authorization]] tables; names made unique) as a PolicySet,
    optionally with every dry_run flag forced."""
    located = []
    for i, raw in enumerate(docs):
        raw = {**raw, "name": f"{raw['name']}{i}"}
        try:
            doc = build(PolicyFile, {"authorization": [raw]}, "h.toml", Path("."))
        except ConfigError:
            continue
        for a in doc.authorizations:
            if dry_run is not None:
                a = dataclasses.replace(a, dry_run=dry_run and a.action != "AUDIT")
            located.append(Located(a, Origin("h.toml", i)))
    return PolicySet(located)


def cases(rows: list[tuple[Any, ...]]) -> list[Any]:
    return [pytest.param(*row[1:], id=row[0]) for row in rows]


# ---- Hypothesis strategies: valid values (some combinations still fail validation; callers skip them)

principals = st.sampled_from(
    [CLIENT, f"spiffe://{CLIENT}", "home.arpa/ns/*", "*/sa/client", "*", "td/ns/a/sa/b"]
)
names = st.sampled_from(["default", "prod", "d*", "*t", "*"])
accounts = st.sampled_from(["default/client", "prod/web", "client", "web"])
cidrs = st.sampled_from(["127.0.0.0/8", "10.0.0.1", "fd00::/8", "::1", "0.0.0.0/0"])
ports = st.integers(min_value=1, max_value=65535)
strs = st.sampled_from(["GET", "POST", "/api/*", "*", "/", "*.png", "echo.default"])
keys = st.sampled_from(
    [
        "source.ip",
        "destination.ip",
        "destination.port",
        "source.principal",
        "source.namespace",
        "request.headers[x-user]",
        "remote.ip",
        "source.network",
        "request.auth.principal",
    ]
)
when_values = st.sampled_from(["7000", "127.0.0.1", CLIENT, "default", "*", "alice", "x"])


def _opt(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(s, max_size=2)


sources = st.fixed_dictionaries(
    {},
    optional={
        "principals": _opt(principals),
        "not_principals": _opt(principals),
        "namespaces": _opt(names),
        "not_namespaces": _opt(names),
        "ip_blocks": _opt(cidrs),
        "not_ip_blocks": _opt(cidrs),
        "remote_ip_blocks": _opt(cidrs),
        "not_remote_ip_blocks": _opt(cidrs),
        "request_principals": _opt(names),
        "not_request_principals": _opt(names),
    },
) | st.fixed_dictionaries(  # service accounts cannot share an entry with principals or namespaces
    {},
    optional={
        "service_accounts": _opt(accounts),
        "not_service_accounts": _opt(accounts),
        "ip_blocks": _opt(cidrs),
        "request_principals": _opt(names),
    },
)
operations = st.fixed_dictionaries(
    {},
    optional={
        "ports": _opt(ports),
        "not_ports": _opt(ports),
        "methods": _opt(strs),
        "not_methods": _opt(strs),
        "paths": _opt(strs),
        "not_paths": _opt(strs),
        "hosts": _opt(strs),
        "not_hosts": _opt(strs),
    },
)
conditions = st.fixed_dictionaries(
    {"key": keys, "values": st.lists(when_values, min_size=1, max_size=2)},
    optional={"not_values": _opt(when_values)},
)
rules = st.fixed_dictionaries(
    {},
    optional={
        "from": st.lists(sources, max_size=2),
        "to": st.lists(operations, min_size=1, max_size=2),
        "when": st.lists(conditions, min_size=1, max_size=2),
    },
)
authz = st.fixed_dictionaries(
    {"name": st.sampled_from(["a", "b", "c"]), "action": st.sampled_from(["ALLOW", "DENY", "AUDIT"])},
    optional={
        "namespace": st.sampled_from(["default", "prod"]),
        "workloads": _opt(st.sampled_from(["echo", "web"])),
        "selector": st.dictionaries(st.sampled_from(["version"]), st.sampled_from(["v1", "v2"])),
        "rules": st.lists(rules, max_size=3),
        "dry_run": st.booleans(),
    },
)
conns = st.builds(
    conn,
    source=st.sampled_from([None, CLIENT, "home.arpa/ns/prod/sa/web"]),
    source_ip=st.sampled_from(["127.0.0.1", "10.0.0.1", "fd00::1", "::ffff:10.0.0.1", "not-an-ip"]),
    destination_ip=st.sampled_from(["127.0.0.1", "::1", "garbage"]),
    port=ports,
    ns=st.sampled_from(["default", "prod"]),
    name=st.sampled_from(["echo", "web"]),
    labels=st.dictionaries(st.sampled_from(["version"]), st.sampled_from(["v1", "v2"])),
)


def requests(
    connections: st.SearchStrategy[ConnectionAttrs],
    *,
    paths: st.SearchStrategy[str],
    hosts: st.SearchStrategy[str],
    headers: st.SearchStrategy[dict[str, str]],
) -> st.SearchStrategy[RequestAttrs]:
    """Requests (any method of `strs`) on connections drawn from `connections`."""
    return st.builds(RequestAttrs, connections, strs, paths, hosts, headers)
