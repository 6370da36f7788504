"""`meshd policy import`: Istio AuthorizationPolicy YAML -> meshd TOML.

The YAML below is typed in from the examples of the istio.io AuthorizationPolicy reference page
(docs/reference/config/security/authorization-policy); each converted policy is loaded by meshd and
decides as that page says it does. What meshd cannot express is refused, all or nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.config.schema import load_document
from meshd.errors import ConfigError
from meshd.policy.evaluate import PolicySet, authorize_connection, authorize_request
from meshd.policy.istio_import import Options, convert
from meshd.policy.load import load_policy_dir
from meshd.policy.model import PolicyFile
from tests.support.policy import conn, request
from tests.support.procs import meshd_cli

SLEEP = "cluster.local/ns/default/sa/sleep"

# The page's first example, without its `when` on request.auth.claims[iss] (meshd has no JWT; that
# part is refused below, REF_HTTPBIN_ALLOW_JWT).
REF_HTTPBIN_ALLOW = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["test"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    - operation:
        methods: ["POST"]
        paths: ["/data"]
"""
REF_HTTPBIN_ALLOW_JWT = (
    REF_HTTPBIN_ALLOW
    + """\
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
"""
)
REF_DENY_DEV_POST = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  action: DENY
  rules:
  - from:
    - source:
        namespaces: ["dev"]
    to:
    - operation:
        methods: ["POST"]
"""
REF_DENY_POST_8080 = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  action: DENY
  rules:
  - to:
    - operation:
        methods: ["POST"]
        ports: ["8080"]
"""
REF_AUDIT = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  namespace: ns1
  name: anyname
spec:
  selector:
    matchLabels:
      app: myapi
  action: AUDIT
  rules:
  - to:
    - operation:
        methods: ["GET"]
        paths: ["/user/profile/*"]
"""
REF_ALLOW_NOTHING_FOO = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
 name: allow-nothing
 namespace: foo
spec:
  {}
"""
REF_ALLOW_ALL_FOO = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
 name: allow-all
 namespace: foo
spec:
 rules:
 - {}
"""
REF_ALLOW_NOTHING_BAR_SELECTOR = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: bar
spec:
  selector:
    matchLabels:
      app: httpbin
"""
REF_ALLOW_NOTHING_ROOT_V1 = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
 name: allow-nothing
 namespace: istio-system
spec:
 selector:
   matchLabels:
     version: v1
"""
REF_DRY_RUN = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: dry-run-example
  annotations:
    "istio.io/dry-run": "true"
spec:
  selector:
    matchLabels:
      app: httpbin
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/headers"]
"""
REF_EXT_AUTHZ = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ext-authz
  namespace: istio-system
spec:
  selector:
    matchLabels:
      app: istio-ingressgateway
  action: CUSTOM
  provider:
    name: "my-custom-authz"
  rules:
  - to:
    - operation:
        paths: ["/admin/*"]
"""


def imported(yaml_text: str, tmp_path: Path, **opts: str) -> PolicySet:
    """Convert, write the TOML into a policy folder and load it as a node would (warnings allowed)."""
    toml = convert(yaml_text, "in.yaml", Options(**opts)).toml
    folder = tmp_path / "policy.d"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "imported.toml").write_text(toml)
    return load_policy_dir(folder, role="waypoint")[0]


def test_allow_sleep_or_test_namespace_for_get_info_and_post_data(tmp_path: Path) -> None:
    ps = imported(REF_HTTPBIN_ALLOW, tmp_path)
    foo = {"ns": "foo", "name": "httpbin"}
    assert authorize_request(ps, request("GET", "/info/x", source=SLEEP, **foo)).allowed
    assert authorize_request(
        ps, request("POST", "/data", source="cluster.local/ns/test/sa/any", **foo)
    ).allowed
    assert not authorize_request(
        ps, request("POST", "/info", source=SLEEP, **foo)
    ).allowed  # "Any other requests will be denied"
    assert not authorize_request(
        ps, request("GET", "/info", source="cluster.local/ns/prod/sa/x", **foo)
    ).allowed


def test_deny_post_from_dev(tmp_path: Path) -> None:
    ps = imported(REF_DENY_DEV_POST, tmp_path)
    dev, prod = "cluster.local/ns/dev/sa/x", "cluster.local/ns/prod/sa/x"
    assert not authorize_request(ps, request("POST", source=dev, ns="foo")).allowed
    assert authorize_request(ps, request("GET", source=dev, ns="foo")).allowed
    assert authorize_request(ps, request("POST", source=prod, ns="foo")).allowed
    assert authorize_request(ps, request("POST", source=dev, ns="bar")).allowed  # other namespace


def test_deny_post_on_8080_denies_all_tcp_on_8080(tmp_path: Path) -> None:
    """The page: "For a DENY rule, missing attributes are treated as matches. This means all TCP
    traffic on port 8080 would be denied" -- meshd's node does exactly that (fail closed)."""
    ps = imported(REF_DENY_POST_8080, tmp_path)
    assert not authorize_request(ps, request("POST", port=8080, ns="foo")).allowed
    assert authorize_request(ps, request("GET", port=8080, ns="foo")).allowed
    assert not authorize_connection(ps, conn(port=8080, ns="foo")).allowed
    assert authorize_connection(ps, conn(port=9090, ns="foo")).allowed


def test_audit_get_user_profile(tmp_path: Path) -> None:
    ps = imported(REF_AUDIT, tmp_path)
    myapi = {"ns": "ns1", "labels": {"app": "myapi"}}
    assert authorize_request(ps, request("GET", "/user/profile/me", **myapi)).audited == ("anyname",)
    assert authorize_request(ps, request("POST", "/user/profile/me", **myapi)).audited == ()
    assert authorize_request(ps, request("GET", "/user/profile/me", ns="ns1")).audited == ()  # selector


def test_allow_nothing_and_allow_all(tmp_path: Path) -> None:
    assert not authorize_connection(imported(REF_ALLOW_NOTHING_FOO, tmp_path / "a"), conn(ns="foo")).allowed
    assert authorize_connection(imported(REF_ALLOW_ALL_FOO, tmp_path / "b"), conn(None, ns="foo")).allowed


def test_allow_nothing_for_selected_workloads(tmp_path: Path) -> None:
    ps = imported(REF_ALLOW_NOTHING_BAR_SELECTOR, tmp_path)
    assert not authorize_connection(ps, conn(ns="bar", labels={"app": "httpbin"})).allowed
    assert authorize_connection(ps, conn(ns="bar", labels={"app": "other"})).allowed
    assert authorize_connection(ps, conn(ns="foo", labels={"app": "httpbin"})).allowed


def test_root_namespace_policy_is_mesh_wide(tmp_path: Path) -> None:
    ps = imported(REF_ALLOW_NOTHING_ROOT_V1, tmp_path)
    (located,) = ps.authorizations
    assert located.value.namespace is None
    for ns in ("foo", "bar"):
        assert not authorize_connection(ps, conn(ns=ns, labels={"version": "v1"})).allowed
        assert authorize_connection(ps, conn(ns=ns, labels={"version": "v2"})).allowed


def test_dry_run_annotation(tmp_path: Path) -> None:
    ps = imported(REF_DRY_RUN, tmp_path)
    d = authorize_request(ps, request(path="/headers", labels={"app": "httpbin"}))
    assert d.allowed and [(r.policy, r.result) for r in d.dry_run] == [("dry-run-example", "deny")]


@pytest.mark.parametrize(
    ("yaml_text", "line", "words"),
    [
        (REF_HTTPBIN_ALLOW_JWT, 22, "needs request authentication (JWT), which meshd does not have"),
        (REF_EXT_AUTHZ, 10, "action CUSTOM (external authorization) has no meshd equivalent"),
        (
            REF_DENY_DEV_POST.replace("namespaces:", "trustDomains:"),
            11,
            "trustDomains has no meshd equivalent",
        ),
        (
            REF_DENY_DEV_POST.replace(
                "spec:\n", 'spec:\n  targetRefs:\n  - kind: Service\n    group: ""\n    name: web\n'
            ),
            8,
            "spec.targetRefs (Service web) attaches the policy",
        ),
        (REF_DENY_POST_8080.replace('["8080"]', '["http"]'), 12, "'http' is not a port number"),
        (REF_DENY_DEV_POST.replace('methods: ["POST"]', 'paths: ["/a/{*}"]'), 14, "path templates"),
        (REF_DENY_DEV_POST.replace('["dev"]', '["a*b"]'), 1, "'*' may only be"),  # meshd's own check
        (
            REF_DENY_DEV_POST.replace("kind: AuthorizationPolicy", "kind: PeerAuthentication"),
            2,
            "is not an AuthorizationPolicy",
        ),
        ("a: [\n", 2, "YAML syntax"),
    ],
)
def test_what_cannot_be_converted_is_refused_with_file_and_line(
    yaml_text: str, line: int, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        convert(yaml_text, "in.yaml")
    (p,) = info.value.problems
    assert (p.file, p.line) == ("in.yaml", line), p.format()
    assert words in p.format()


def test_many_documents_all_or_nothing_and_names_made_unique(tmp_path: Path) -> None:
    every = "---\n".join(
        [REF_DENY_DEV_POST, REF_AUDIT, REF_ALLOW_NOTHING_FOO, REF_ALLOW_NOTHING_BAR_SELECTOR, REF_DRY_RUN]
    )
    result = convert(every, "in.yaml")
    assert result.count == 5
    assert 'name = "allow-nothing.foo"' in result.toml and 'name = "allow-nothing.bar"' in result.toml
    # the same namespace/name twice is one resource written twice: refused
    with pytest.raises(ConfigError) as info:
        convert(REF_DENY_DEV_POST + "---\n" + REF_DENY_POST_8080, "in.yaml")
    assert "foo/httpbin is defined again (first at line 1)" in info.value.problems[0].message
    # one policy meshd cannot express: nothing is converted, and every refusal is listed
    with pytest.raises(ConfigError) as info:
        convert(every + "---\n" + REF_EXT_AUTHZ + "---\n" + REF_HTTPBIN_ALLOW_JWT, "in.yaml")
    assert [p.message.split(":")[0] for p in info.value.problems] == [
        "policy 'ext-authz'",
        "policy 'httpbin'",
    ]


def test_kubectl_list_and_trust_domain_rewrite(tmp_path: Path) -> None:
    items = "\n".join("  " + line for line in REF_HTTPBIN_ALLOW.splitlines())
    listed = f"apiVersion: v1\nkind: List\nitems:\n-\n{items}\n"
    ps = imported(listed, tmp_path, trust_domain="home.arpa")
    rule = ps.authorizations[0].value.rules[0]
    assert rule.sources is not None and rule.sources[0].principals == ("home.arpa/ns/default/sa/sleep",)


def test_cli_writes_a_file_meshd_loads_and_refuses_with_exit_2(tmp_path: Path) -> None:
    src = tmp_path / "policies.yaml"
    src.write_text(REF_DENY_DEV_POST + "---\n" + REF_ALLOW_NOTHING_BAR_SELECTOR)
    out = tmp_path / "policy.d" / "10-imported.toml"
    out.parent.mkdir()
    done = meshd_cli("policy", "import", str(src), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "2 authorization policies written to" in done.stderr
    policies, _ = load_policy_dir(out.parent, role="node")
    assert [a.value.name for a in policies.authorizations] == ["httpbin", "allow-nothing"]
    piped = meshd_cli("policy", "import", "-", stdin=REF_AUDIT)
    assert piped.returncode == 0 and '[[authorization]]\nname = "anyname"' in piped.stdout
    src.write_text(REF_EXT_AUTHZ)
    refused = meshd_cli("policy", "import", str(src), "-o", str(tmp_path / "no.toml"))
    assert refused.returncode == 2 and not (tmp_path / "no.toml").exists()
    assert f"{src}:10: policy 'ext-authz': action CUSTOM" in refused.stderr
    assert "nothing converted (1 problem(s))" in refused.stderr


# ---- Hypothesis: whatever YAML comes in, import answers with TOML that loads, or refuses ------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1, 70000),
    st.sampled_from(["", "*", "GET", "/api/*", "dev", "10.0.0.0/8", "default/sa", "8080", "x{*}", "a b"]),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
_source = st.dictionaries(
    st.sampled_from(
        [
            *"principals",
            "notPrincipals",
            "namespaces",
            "ipBlocks",
            "serviceAccounts",
            "requestPrincipals",
            "trustDomains",
            "bogus",
        ]
    ),
    _values,
    max_size=3,
)
_operation = st.dictionaries(
    st.sampled_from(["hosts", "ports", "notPorts", "methods", "paths"]), _values, max_size=3
)
_condition = st.dictionaries(
    st.sampled_from(["key", "values", "notValues"]),
    st.one_of(_values, st.sampled_from(["source.ip", "request.auth.claims[x]", "remote.ip"])),
    max_size=3,
)
_rule = st.fixed_dictionaries(
    {},
    optional={
        "from": st.lists(st.one_of(st.fixed_dictionaries({"source": _source}), _values), max_size=2),
        "to": st.lists(st.fixed_dictionaries({"operation": _operation}), max_size=2),
        "when": st.lists(_condition, max_size=2),
    },
)
_metadata = st.fixed_dictionaries(
    {"name": st.sampled_from(["a", "b", "c", "d", "Bad Name", 7])},
    optional={
        "namespace": st.sampled_from(["foo", "bar", "istio-system"]),
        "annotations": st.dictionaries(st.just("istio.io/dry-run"), st.sampled_from(["true", "no", True])),
    },
)
_rules = st.lists(_rule, max_size=3)
_spec = st.fixed_dictionaries(
    {},
    optional={
        "action": st.sampled_from(["ALLOW", "DENY", "AUDIT", "CUSTOM", 1]),
        "rules": st.one_of(_rules, _rules, _rules, _values),
        "selector": st.one_of(
            st.fixed_dictionaries({"matchLabels": st.dictionaries(st.sampled_from(["app"]), _scalars)}),
            _values,
        ),
        "targetRefs": st.lists(
            st.fixed_dictionaries({"kind": st.just("Service"), "name": st.just("x")}), max_size=1
        ),
    },
)
# Mostly well-formed shells (so the insides get exercised), sometimes anything at all.
_document = st.fixed_dictionaries(
    {
        "apiVersion": st.sampled_from(["security.istio.io/v1"] * 8 + ["v1", 3]),
        "kind": st.sampled_from(["AuthorizationPolicy"] * 8 + ["Service", "List"]),
        "metadata": st.one_of(_metadata, _metadata, _metadata, _values),
        "spec": st.one_of(_spec, _spec, _spec, _values),
    },
    optional={"items": st.lists(_values, max_size=2)},
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(docs=st.lists(_document, min_size=1, max_size=2))
def test_random_yaml_converts_to_loadable_toml_or_is_refused(docs: list[dict[str, Any]]) -> None:
    text = yaml.safe_dump_all(docs)
    try:
        result = convert(text, "in.yaml")
    except ConfigError as exc:
        assert exc.problems and all(p.file == "in.yaml" for p in exc.problems)
        return
    load_document(PolicyFile, result.toml, "out.toml", Path("."))
