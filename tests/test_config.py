"""Config loading: defaults, types, and every mistake reported at its line."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from meshd.config.load import load_config
from meshd.config.schema import to_plain
from meshd.config.toml_lines import KeyLines
from meshd.errors import ConfigError
from meshd.units import Address
from tests.support.configs import load_text, problems_in
from tests.support.paths import REPO

BASE = """\
trust_domain = "home.arpa"
node_name = "alpha"
[identity]
ca_dir = "./ca"
"""


def test_defaults_fill_everything_a_homelab_user_need_not_set(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, BASE)
    assert cfg.role == "node"
    assert cfg.listen.hbone == Address("0.0.0.0", 15008)
    assert cfg.listen.admin == Address("127.0.0.1", 15000)
    assert cfg.listen.metrics == Address("0.0.0.0", 15020)
    assert cfg.listen.readiness == Address("0.0.0.0", 15021)
    assert cfg.identity.ca_dir == tmp_path / "ca"  # relative to the config file
    assert cfg.identity.cert_ttl == timedelta(hours=24)
    assert cfg.discovery.mdns is True
    assert cfg.drain_timeout == timedelta(seconds=10)


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, BASE)
    with pytest.raises(AttributeError):
        cfg.role = "waypoint"  # type: ignore[misc]


def test_shipped_examples_load() -> None:
    for name in ("meshd.toml", "beta.toml", "waypoint.toml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.trust_domain == "home.arpa"
    assert load_config(REPO / "configs" / "waypoint.toml").role == "waypoint"


# (what is wrong, the file, the line the report must name, a fragment of the message)
MISTAKES = [
    ("toml syntax", BASE + "[listen\n", 5, "TOML syntax"),
    ("unknown top-level key", "rol = 'node'\n" + BASE, 1, "did you mean 'role'"),
    ("unknown nested key", BASE + "[listen]\nadmn = '127.0.0.1:1'\n", 6, "did you mean 'admin'"),
    ("bad enum", 'role = "wayp"\n' + BASE, 1, "did you mean 'waypoint'"),
    ("quoted number", BASE + "[[workload]]\nname='a'\nports=['7000']\n", 7, "remove the quotes"),
    ("port out of range", BASE + "[[workload]]\nname='a'\nports=[1,\n  70000]\n", 8, "outside 1-65535"),
    ("bad address", BASE + "[listen]\nhbone = '127.0.0.1'\n", 6, "HOST:PORT"),
    ("bad duration", "drain_timeout = '10 seconds'\n" + BASE, 1, "not a duration"),
    ("not an IP", BASE + "[[workload]]\nname='a'\nports=[1]\naddress='my-host'\n", 8, "not an IP address"),
    ("missing required key", BASE + "[[upstream]]\nservice='echo'\nport=7000\n", 5, "missing key 'listen'"),
    ("wrong type for table", "listen = 5\n" + BASE, 1, "must be a table"),
    ("bool as string", BASE + "[discovery]\nmdns = 'yes'\n", 6, "true or false"),
    (
        "duplicate workload",
        BASE + "[[workload]]\nname='a'\nports=[1]\n[[workload]]\nname='a'\nports=[2]\n",
        9,
        "duplicate workload",
    ),
    (
        "upstream names unknown workload",
        BASE + "[[upstream]]\nservice='e'\nport=1\nlisten='127.0.0.1:1'\nworkload='ghost'\n",
        9,
        "not declared",
    ),
    ("admin not loopback", BASE + "[listen]\nadmin = '0.0.0.0:15000'\n", 6, "not loopback"),
    (
        "bad upstream protocol",
        BASE + "[[upstream]]\nservice='e'\nport=1\nlisten='127.0.0.1:1'\nprotocol='quic'\n",
        9,
        "is not one of 'tcp', 'udp'",
    ),
    ("udp idle timeout too short", BASE + "[udp]\nidle_timeout = '0s'\n", 6, "under 1 s"),
    ("udp limit zero", BASE + "[udp]\nqueue_packets = 0\n", 6, "at least 1"),
    (
        "two udp upstreams on one address",
        BASE + "[[upstream]]\nservice='e'\nport=1\nlisten='127.0.0.1:1'\nprotocol='udp'\n"
        "[[upstream]]\nservice='f'\nport=1\nlisten='127.0.0.1:1'\nprotocol='udp'\n",
        13,
        "duplicate listen address '127.0.0.1:1/udp'",
    ),
    ("bad name", BASE.replace('"alpha"', '"Alpha Box"'), 2, "node_name"),
    (
        "second array element",
        BASE + "[[service]]\nname='a'\nports=[{port=1}]\n[[service]]\nname='b'\n"
        "ports=[{port=1}, {port='x'}]\n",
        10,
        "must be an integer",
    ),
]


@pytest.mark.parametrize(("kind", "text", "line", "fragment"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake_is_reported_at_its_line(
    tmp_path: Path, kind: str, text: str, line: int, fragment: str
) -> None:
    found = problems_in(tmp_path, text)
    assert any(p.startswith(f"F:{line}: ") and fragment in p for p in found), found


def test_identity_source_must_be_chosen(tmp_path: Path) -> None:
    found = problems_in(tmp_path, 'trust_domain = "home.arpa"\n[identity]\ncert_ttl="1h"\n')
    assert found == [
        "F:2: set exactly one of identity.ca_dir, identity.cert_dir and identity.state_dir (for one host: `meshd ca init --dir ./ca "
        '--trust-domain home.arpa`, then ca_dir = "./ca")'
    ]


def test_every_problem_is_reported_not_just_the_first(tmp_path: Path) -> None:
    found = problems_in(tmp_path, "rol = 1\n" + BASE + "[listen]\nadmn = 1\nhbone = 'x'\n")
    assert [p.split(":")[1] for p in found] == ["1", "7", "8"]


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert "config file not found" in str(info.value)


@pytest.mark.parametrize(
    ("override", "check"),
    [
        ("role=waypoint", lambda c: c.role == "waypoint"),
        ("listen.hbone=0.0.0.0:25008", lambda c: c.listen.hbone == Address("0.0.0.0", 25008)),
        ("discovery.mdns=false", lambda c: c.discovery.mdns is False),
        ("discovery.peers=127.0.0.3:15008,127.0.0.4:15008", lambda c: len(c.discovery.peers) == 2),
        ("drain_timeout=3s", lambda c: c.drain_timeout == timedelta(seconds=3)),
        ("identity.cert_ttl=1h", lambda c: c.identity.cert_ttl == timedelta(hours=1)),
        ("log.format=json", lambda c: c.log.format == "json"),
    ],
)
def test_key_value_overrides_are_typed_as_the_key(tmp_path: Path, override: str, check: object) -> None:
    assert check(load_text(tmp_path, BASE, override))  # type: ignore[operator]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("lisen.hbone=1.2.3.4:5", "did you mean 'listen.hbone'"),
        ("role=wp", "is not one of"),
        ("discovery.mdns=perhaps", "not a valid true or false"),
        ("drain_timeout=soon", "not a duration"),
        ("novalue", "is not KEY=VALUE"),
    ],
)
def test_bad_override_names_the_problem(tmp_path: Path, override: str, fragment: str) -> None:
    found = problems_in(tmp_path, BASE, override)
    assert len(found) == 1 and found[0].startswith("command line: ") and fragment in found[0], found


def test_to_plain_round_trips_the_shape(tmp_path: Path) -> None:
    plain = to_plain(load_text(tmp_path, BASE))
    assert plain["listen"]["hbone"] == "0.0.0.0:15008"
    assert plain["drain_timeout"] == "10s"
    assert plain["workload"] == []


def test_key_lines_follow_arrays_of_tables_and_inline_arrays() -> None:
    lines = KeyLines(
        '[[a]]\nx = 1\n[[a]]\nx = """\nmulti\n"""\ny = [\n  { p = 1 },\n  { p = 2 },\n]\n[[a.b]]\nz = 1\n'
    )
    assert lines.line_of(("a", 0, "x")) == 2
    assert lines.line_of(("a", 1, "x")) == 4
    assert lines.line_of(("a", 1, "y", 1)) == 9
    assert lines.line_of(("a", 1, "b", 0, "z")) == 12
    assert lines.line_of(("a", 1, "nothing")) == 3


def test_an_address_mistake_gets_one_hint_not_two(tmp_path: Path) -> None:
    (found,) = problems_in(tmp_path, BASE + "[listen]\nhbone = 'nonsense'\n")
    assert found == "F:6: listen.hbone: 'nonsense' is not an address (write HOST:PORT, e.g. 127.0.0.1:15008)"
    (found,) = problems_in(tmp_path, BASE + "[listen]\nhbone = '1.2.3.4:x'\n")
    assert found.count("write") == 1, found


def test_a_tcp_and_a_udp_upstream_may_share_an_address(tmp_path: Path) -> None:
    """DNS listens on 53 for both."""
    cfg = load_text(
        tmp_path,
        BASE + "[[upstream]]\nservice='dns'\nport=53\nlisten='127.0.0.1:5353'\n"
        "[[upstream]]\nservice='dns'\nport=53\nlisten='127.0.0.1:5353'\nprotocol='udp'\n"
        "[[service]]\nname='dns'\nports=[{port=53, protocol='udp'}]\n",
    )
    assert [u.protocol for u in cfg.upstreams] == ["tcp", "udp"]
    assert cfg.udp.idle_timeout == timedelta(seconds=30)


def test_a_client_workload_needs_no_ports(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, BASE + '[[workload]]\nname = "client"\n')
    assert cfg.workloads[0].ports == ()


def test_plaintext_listens_beside_hbone_unless_set(tmp_path: Path) -> None:
    assert load_text(tmp_path, BASE).listen.plaintext == Address("0.0.0.0", 15006)
    moved = load_text(tmp_path, BASE + "[listen]\nhbone = '127.0.0.2:15108'\n")
    assert moved.listen.plaintext == Address("127.0.0.2", 15106)
    assert load_text(tmp_path, BASE, "listen.hbone=10.0.0.1:25008").listen.plaintext == Address(
        "10.0.0.1", 25006
    )
    explicit = load_text(
        tmp_path, BASE + "[listen]\nhbone = '127.0.0.2:15108'\nplaintext = '127.0.0.2:16000'\n"
    )
    assert explicit.listen.plaintext == Address("127.0.0.2", 16000)
