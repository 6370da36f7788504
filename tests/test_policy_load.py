"""Loading the policy folder: every mistake reported with its file and line, all files at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshd.errors import ConfigError, Problem
from meshd.identity.spiffe import SpiffeId
from meshd.policy import ConnectionAttrs, authorize_connection, load_policy_dir, mtls_mode
from meshd.policy.load import Role
from tests.support.paths import REPO

GOOD = """\
[[authorization]]
name = "allow-client"
namespace = "default"
action = "ALLOW"
[[authorization.rules]]
from = [{ principals = ["home.arpa/ns/default/sa/client"] }]
to = [{ ports = [7000] }]
"""


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def problems_of(directory: Path, role: Role = "node") -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_policy_dir(directory, role=role)
    return list(info.value.problems)


A = '[[authorization]]\nname = "x"\n'  # lines 1-2 of most cases below


def rule(text: str) -> str:
    """A file whose line 3 is `rules = [{ TEXT }]`."""
    return A + f"rules = [{{ {text} }}]\n"


# (id, file text, line, words the message must contain)
MISTAKES = [
    ("toml syntax", 'name = "x"\n[[authorization]\n', 2, "TOML syntax"),
    ("unknown top-level key", "[[authorisation]]\nname = 'x'\n", 1, "did you mean 'authorization'"),
    ("unknown key", A + 'actoin = "DENY"\n', 3, "did you mean 'action'"),
    (
        "unknown key in from",
        A + '[[authorization.rules]]\nfrom = [{ principal = ["a"] }]\n',
        4,
        "'principal'",
    ),
    ("missing name", '[[authorization]]\naction = "DENY"\n', 1, "missing key 'name'"),
    ("bad action", A + 'action = "REJECT"\n', 3, "'REJECT' is not one of"),
    ("action case", A + 'action = "allow"\n', 3, "is not one of 'ALLOW'"),
    ("wrong type", A + 'workloads = "echo"\n', 3, "must be an array"),
    ("quoted port", rule('to = [{ ports = ["7000"] }]'), 3, "remove the quotes"),
    ("bad name", '[[authorization]]\nname = "Allow Client"\n', 2, "must be lowercase"),
    (
        "bad principal",
        A + '\n[[authorization.rules]]\nfrom = [{ principals = ["td/default/a"] }]\n',
        5,
        "not of the form",
    ),
    ("bad principal td", rule('from = [{ not_principals = ["Home/ns/a/sa/b"] }]'), 3, "trust domain"),
    ("star in the middle", rule('from = [{ namespaces = ["a*b"] }]'), 3, "'*' may only be"),
    ("empty string", rule('to = [{ hosts = [""] }]'), 3, "matches nothing"),
    ("bad cidr", rule('from = [{ ip_blocks = ["10.0.0.0/33"] }]'), 3, "not an IP address or CIDR"),
    ("cidr host bits", rule('from = [{ not_ip_blocks = ["10.0.0.1/8"] }]'), 3, 'did you mean "10.0.0.0/8"?'),
    ("bad port", A + "[[authorization.rules]]\nto = [{ ports = [70000] }]\n", 4, "outside 1-65535"),
    ("bad not_port", rule("to = [{ not_ports = [0] }]"), 3, "outside 1-65535"),
    ("path without slash", rule('to = [{ paths = ["api"] }]'), 3, "must start with '/'"),
    ("path template", rule('to = [{ paths = ["/a/{*}/b"] }]'), 3, "not supported"),
    (
        "bad when key",
        rule('when = [{ key = "request.auth.claims[iss]", values = ["x"] }]'),
        3,
        "unsupported when key",
    ),
    (
        "bad header name",
        rule('when = [{ key = "request.headers[x y]", values = ["a"] }]'),
        3,
        "not an HTTP header",
    ),
    ("when without values", rule('when = [{ key = "source.ip" }]'), 3, "neither values nor not_values"),
    (
        "when bad ip value",
        rule('when = [{ key = "source.ip", values = ["localhost"] }]'),
        3,
        "not an IP address",
    ),
    (
        "when bad port value",
        rule('when = [{ key = "destination.port", values = ["http"] }]'),
        3,
        "not a port",
    ),
    ("empty to entry", rule("to = [{}]"), 3, "sets no field"),
    ("empty to list", A + "[[authorization.rules]]\nto = []\n", 4, "to = [] is empty"),
    (
        "service account wildcard",
        A + 'namespace = "a"\nrules = [{ from = [{ service_accounts = ["default/*"] }] }]\n',
        4,
        "no wildcards",
    ),
    (
        "service account with principals",
        rule('from = [{ not_service_accounts = ["a/b"], namespaces = ["x"] }]'),
        3,
        "cannot be set with principals or namespaces",
    ),
    (
        "bare service account mesh-wide",
        A + "\nrules = [{ from = [{ service_accounts = ['client'] }] }]\n",
        4,
        "a mesh-wide policy has none",
    ),
    ("bad remote ip block", rule('from = [{ remote_ip_blocks = ["10.0.0.1/8"] }]'), 3, "host bits"),
    ("bad request principal", rule('from = [{ request_principals = ["a*b"] }]'), 3, "'*' may only be"),
    ("when remote.ip value", rule('when = [{ key = "remote.ip", values = ["x"] }]'), 3, "not an IP"),
    ("dry run audit", A + 'action = "AUDIT"\ndry_run = true\n', 4, "dry_run is for ALLOW and DENY"),
    ("workloads without namespace", A + 'workloads = ["echo"]\n', 3, "needs a namespace"),
    ("bad mtls mode", '[[peer_authentication]]\nname = "x"\nmode = "DISABLE"\n', 3, "is not one of"),
    ("peer auth missing mode", '\n[[peer_authentication]]\nname = "x"\n', 2, "missing key 'mode'"),
]


@pytest.mark.parametrize(("text", "line", "words"), [pytest.param(*m[1:], id=m[0]) for m in MISTAKES])
def test_mistake_reported_with_file_and_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    d = write(tmp_path / "p", {"10-good.toml": GOOD, "20-bad.toml": text})
    problems = problems_of(d)
    assert len(problems) == 1, problems
    (p,) = problems
    assert (p.file, p.line) == (str(d / "20-bad.toml"), line), p.format()
    assert words in p.format()
    assert p.format().startswith(f"{d / '20-bad.toml'}:{line}: ")


def test_problems_of_every_file_are_reported_together(tmp_path: Path) -> None:
    d = write(
        tmp_path / "p",
        {
            "a.toml": '[[authorization]]\nname = "a"\naction = "NOPE"\n\nrules = [{ to = [{ ports = [0] }] }]\n',
            "b.toml": "[[authorization]\n",
            "c.toml": GOOD,
            "d.toml": '[[peer_authentication]]\nname = "d"\nmode = "STRICT"\nworkloads = ["x"]\n',
        },
    )
    found = [(Path(p.file).name, p.line) for p in problems_of(d)]
    assert found == [("a.toml", 3), ("a.toml", 5), ("b.toml", 1), ("d.toml", 4)]


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    d = write(tmp_path / "p", {"10-a.toml": GOOD, "20-b.toml": "# again\n\n" + GOOD})
    (p,) = problems_of(d)
    assert (p.file, p.line) == (str(d / "20-b.toml"), 3)
    assert "duplicate authorization name 'allow-client'" in p.message
    assert p.hint is not None and f"{d / '10-a.toml'}:1" in p.hint


def test_authorization_and_peer_authentication_names_are_separate(tmp_path: Path) -> None:
    d = write(
        tmp_path / "p", {"a.toml": GOOD + '[[peer_authentication]]\nname = "allow-client"\nmode = "STRICT"\n'}
    )
    policies, _ = load_policy_dir(d, role="node")
    assert len(policies) == 2


def test_conflicting_peer_authentications(tmp_path: Path) -> None:
    pa = '[[peer_authentication]]\nname = "{name}"\nnamespace = "prod"\nworkloads = {w}\nmode = "STRICT"\n'
    d = write(
        tmp_path / "p",
        {
            "a.toml": pa.format(name="a", w='["db"]') + pa.format(name="ns", w="[]"),
            "b.toml": pa.format(name="b", w='["web", "db"]') + pa.format(name="ns2", w="[]"),
        },
    )
    problems = problems_of(d)
    assert [(Path(p.file).name, p.line) for p in problems] == [("b.toml", 1), ("b.toml", 6)]
    assert "prod/db" in problems[0].message and "'a'" in problems[0].message
    assert "namespace prod" in problems[1].message


def test_missing_folder_is_an_error_with_a_hint(tmp_path: Path) -> None:
    (p,) = problems_of(tmp_path / "nope")
    assert p.message == "policy folder not found" and p.hint


def test_file_instead_of_folder(tmp_path: Path) -> None:
    (tmp_path / "f.toml").write_text(GOOD)
    (p,) = problems_of(tmp_path / "f.toml")
    assert "not a folder" in p.message


def test_empty_folder_and_no_folder_load_empty(tmp_path: Path) -> None:
    for directory in (tmp_path, None):
        policies, warnings = load_policy_dir(directory, role="node")
        assert (len(policies), warnings) == (0, [])


def test_only_toml_files_in_name_order(tmp_path: Path) -> None:
    d = write(
        tmp_path / "p",
        {
            "20-b.toml": GOOD.replace("allow-client", "b"),
            "10-a.toml": GOOD.replace("allow-client", "a"),
            "README.md": "not policy",
            ".#10-a.toml": "editor lock file [[",
            "x.toml.bak": "[[",
        },
    )
    policies, _ = load_policy_dir(d, role="node")
    assert [(a.value.name, a.origin.file, a.origin.line) for a in policies.authorizations] == [
        ("a", str(d / "10-a.toml"), 1),
        ("b", str(d / "20-b.toml"), 1),
    ]


L7_POLICY = """\
[[authorization]]
name = "allow-get"
namespace = "default"
[[authorization.rules]]
to = [{ ports = [7000] }]
[[authorization.rules]]
to = [{ methods = ["GET"], paths = ["/api/*"] }]

[[authorization]]
name = "deny-post"
action = "DENY"
rules = [
  { to = [{ ports = [7000] }] },
  { when = [{ key = "request.headers[x-evil]", values = ["*"] }] },
]

[[authorization]]
name = "audit-nothing"
action = "AUDIT"
"""


def test_warnings_for_l7_fields_at_a_node(tmp_path: Path) -> None:
    d = write(tmp_path / "p", {"l7.toml": L7_POLICY})
    _, warnings = load_policy_dir(d, role="node")
    lines = [(w.line, w.message) for w in warnings]
    assert [line for line, _ in lines] == [6, 14, 17]
    assert "rule 2 of ALLOW policy 'allow-get' uses L7 fields (methods, paths)" in lines[0][1]
    assert "never matches here" in lines[0][1]
    assert "rule 2 of DENY policy 'deny-post' uses L7 fields (when request.headers[x-evil])" in lines[1][1]
    assert "enforced without them" in lines[1][1]
    assert "AUDIT policy 'audit-nothing' has no rules, so it matches nothing" in lines[2][1]
    assert all(w.file == str(d / "l7.toml") for w in warnings)


def test_no_l7_warnings_at_a_waypoint(tmp_path: Path) -> None:
    d = write(tmp_path / "p", {"l7.toml": L7_POLICY})
    _, warnings = load_policy_dir(d, role="waypoint")
    assert [w.line for w in warnings] == [17]


def test_lowercase_method_warns(tmp_path: Path) -> None:
    d = write(
        tmp_path / "p",
        {"m.toml": '[[authorization]]\nname = "m"\n\nrules = [{ to = [{ methods = ["get"] }] }]\n'},
    )
    _, warnings = load_policy_dir(d, role="waypoint")
    (w,) = warnings
    assert (w.line, w.hint) == (4, "write 'GET'")


FOREIGN = """\
[[authorization]]
name = "allow-typo"
action = "ALLOW"
[[authorization.rules]]
from = [{ principals = ["home.arpa/ns/default/sa/ok", "spiffe://cluster.local/ns/default/sa/web"] }]
[[authorization.rules]]
from = [{ not_principals = ["*/ns/default/sa/any", "cluster.local/ns/x/*"] }]
when = [{ key = "source.principal", values = ["other.td/ns/a/sa/b"] }]
"""


def test_principal_of_another_trust_domain_warns_with_file_line(tmp_path: Path) -> None:
    d = write(tmp_path / "p", {"f.toml": FOREIGN})
    _, warnings = load_policy_dir(d, role="node", trust_domain="home.arpa")
    got = [(w.line, w.message, w.hint) for w in warnings]
    assert [line for line, _, _ in got] == [5, 7, 8]
    assert (
        "principal 'spiffe://cluster.local/ns/default/sa/web' is in trust domain 'cluster.local', "
        in got[0][1]
    )
    assert "not this mesh's 'home.arpa': no peer can present it, so it never matches" in got[0][1]
    assert got[0][2] == 'write "home.arpa/ns/default/sa/web"'
    assert "'cluster.local/ns/x/*'" in got[1][1] and "'other.td/ns/a/sa/b'" in got[2][1]
    # Without a trust domain to compare with (or with the matching one) nothing is said.
    assert load_policy_dir(d, role="node")[1] == []
    assert (
        load_policy_dir(write(tmp_path / "q", {"g.toml": GOOD}), role="node", trust_domain="home.arpa")[1]
        == []
    )


def test_example_policy_folder_loads_cleanly_and_works() -> None:
    roles: tuple[Role, ...] = ("node", "waypoint")
    for role in roles:
        policies, warnings = load_policy_dir(REPO / "configs" / "policy.d", role=role)
        assert warnings == []
    assert mtls_mode(policies, "default", "echo", None) == "PERMISSIVE"

    def decide(source: str | None, port: int = 7000, name: str = "echo") -> bool:
        conn = ConnectionAttrs(
            source=None if source is None else SpiffeId.parse_principal(source),
            source_ip="127.0.0.1",
            destination_ip="127.0.0.1",
            destination_port=port,
            workload_namespace="default",
            workload_name=name,
            workload_labels={},
        )
        return authorize_connection(policies, conn).allowed

    assert decide("home.arpa/ns/default/sa/client")
    assert decide("spiffe://home.arpa/ns/default/sa/client")
    assert not decide("home.arpa/ns/default/sa/other")
    assert not decide(None)
    assert not decide("home.arpa/ns/default/sa/client", port=7001)
    assert decide(None, name="web")  # no policy applies to other workloads


def test_examples_in_docs_load(tmp_path: Path) -> None:
    """Every complete TOML example in docs/policy.md is a valid policy file."""
    text = (REPO / "docs" / "policy.md").read_text()
    examples = [b for b in re.findall(r"```toml\n(.*?)```", text, re.S) if b.lstrip().startswith("[[")]
    assert len(examples) >= 6
    for i, example in enumerate(examples):
        load_policy_dir(write(tmp_path / str(i), {"example.toml": example}), role="waypoint")
