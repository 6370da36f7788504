"""`meshd policy explain` on the shipped homelab example: decisions, deciding policy, and why-nots."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from meshd.policy.query import where_to_ask
from tests.support.catalogs import merged, node, service, workload
from tests.support.paths import REPO
from tests.support.procs import Meshd, http_get, meshd_cli, wait_for

NAS = str(REPO / "configs" / "homelab" / "nas.toml")
PI = str(REPO / "configs" / "homelab" / "pi.toml")


def test_allowed_connection_names_the_policy_and_rule_with_file_and_line() -> None:
    out = meshd_cli(
        "policy", "explain", "-c", NAS, "--from", "home.arpa/ns/apps/sa/grafana", "--to", "db.data:5432"
    )
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[1]
    assert first.startswith("ALLOW: allowed by policy db-clients (rule 1) [")
    assert "10-database.toml:3]" in first and "(as the node decides)" in first
    assert "- DENY  lan-only" in out.stdout and "rule 1: no match: from did not match" in out.stdout


def test_denied_connection_exits_3_and_explains_every_policy() -> None:
    out = meshd_cli(
        "policy",
        "explain",
        "-c",
        NAS,
        "--from",
        "home.arpa/ns/guest/sa/x",
        "--to",
        "files.data:445",
        "--source-ip",
        "10.9.9.9",
        "--json",
    )
    assert out.returncode == 3
    (result,) = json.loads(out.stdout)
    assert result["workload"] == "files.data" and result["allowed"] is False
    assert result["policy"] == "lan-only"
    verdicts = {p["name"]: p for p in result["policies"]}
    assert verdicts["db-clients"]["applies"] is False
    assert "scoped to workloads ['db']" in verdicts["db-clients"]["scope_reason"]
    assert [r["matched"] for r in verdicts["storage-guard"]["rules"]] == [True, False]


def test_not_in_allow_list_is_denied_with_the_checked_policies() -> None:
    out = meshd_cli(
        "policy", "explain", "-c", NAS, "--from", "home.arpa/ns/apps/sa/other", "--to", "db.data:5432"
    )
    assert out.returncode == 3
    assert "DENY: no ALLOW policy matched (checked db-clients)" in out.stdout


def test_http_fields_evaluate_as_the_waypoint() -> None:
    base = ["policy", "explain", "-c", PI, "--from", "home.arpa/ns/apps/sa/ui", "--to", "hass.apps:8123"]
    ok = meshd_cli(
        *base,
        "--method",
        "GET",
        "--path",
        "/api/states",
        "--host",
        "hass.apps.mesh",
        "--header",
        "x-ha-client=mobile-ios",
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "allowed by policy hass-api (rule 1)" in ok.stdout and "(as the waypoint decides)" in ok.stdout
    no = meshd_cli(
        *base,
        "--method",
        "GET",
        "--path",
        "/api/config/core",
        "--host",
        "hass.apps.mesh",
        "--header",
        "x-ha-client=mobile-ios",
    )
    assert no.returncode == 3
    assert "rule 1: no match: to did not match" in no.stdout
    node = meshd_cli(*base)  # no HTTP fields: the node's view, where the L7 rule cannot match
    assert node.returncode == 3 and "evaluated at a waypoint" in node.stdout


def test_unknown_destination_and_bad_identity_are_clear_errors() -> None:
    out = meshd_cli("policy", "explain", "-c", NAS, "--from", "home.arpa/ns/a/sa/b", "--to", "nope.data:1")
    assert out.returncode == 1 and "no workload in this config serves nope.data port 1" in out.stderr
    out = meshd_cli("policy", "explain", "-c", NAS, "--from", "not-an-id", "--to", "db.data:5432")
    assert out.returncode == 2 and "--from" in out.stderr


def test_explain_against_a_running_daemon(loopback: str, example_daemon: Meshd) -> None:
    node = example_daemon
    # configs/meshd.toml (alpha) hosts only "client"; its policy folder allows client -> echo.
    out = meshd_cli(
        "policy",
        "explain",
        "--admin",
        f"{loopback}:15000",
        "--from",
        "home.arpa/ns/default/sa/client",
        "--to",
        "client.default:8000",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ALLOW: no ALLOW policy applies" in out.stdout
    assert "allow-client-to-echo" in out.stdout and "scoped to workloads ['echo'], not 'client'" in out.stdout

    # A broken policy file on disk: the daemon refuses the reload and keeps its policy; --admin answers
    # with what is in force (the files alone cannot be read), and its errors are the CLI's.
    policy_dir = Path(json.loads(http_get(node.admin_url + "/config_dump")[1])["config"]["policy"]["dir"])
    (policy_dir / "zz-broken.toml").write_text("[[authorization]]\nname = 3\n")
    node.signal(signal.SIGHUP)
    wait_for(lambda: "reload rejected" in node.log(), node)
    ask = ("policy", "explain", "--admin", f"{loopback}:15000", "--from", "home.arpa/ns/default/sa/client")
    again = meshd_cli(*ask, "--to", "client.default:8000")
    assert again.returncode == 0 and "ALLOW: no ALLOW policy applies" in again.stdout, again.stderr
    as_json = json.loads(meshd_cli(*ask, "--to", "client.default:8000", "--json").stdout)
    assert as_json[0]["workload"] == "client.default" and as_json[0]["allowed"] is True
    elsewhere = meshd_cli(*ask, "--to", "nope.data:1")
    assert (
        elsewhere.returncode == 1 and "no workload in this config serves nope.data port 1" in elsewhere.stderr
    )
    assert "nope.data is not in this node's catalog (yet): no node to ask" in elsewhere.stderr
    malformed = meshd_cli(*ask, "--to", "client.default")
    assert malformed.returncode == 2 and "--to" in malformed.stderr


def test_without_source_ip_the_answer_says_when_the_address_matters() -> None:
    base = ("policy", "explain", "-c", NAS, "--from", "home.arpa/ns/apps/sa/grafana", "--to", "db.data:5432")
    out = meshd_cli(*base)
    assert out.returncode == 0, out.stderr
    assert (
        "note: the answer depends on the source address (policy lan-only looks at it); "
        "it was evaluated for 127.0.0.1: give the client's address (--source-ip, source_ip=)"
    ) in out.stdout
    assert json.loads(meshd_cli(*base, "--json").stdout)[0]["depends_on_source_ip"] == ["lan-only"]
    given = meshd_cli(*base, "--source-ip", "10.9.9.9", "--json")
    assert given.returncode == 3 and json.loads(given.stdout)[0]["depends_on_source_ip"] == []


def test_not_served_here_names_the_node_and_waypoint_to_ask() -> None:
    web = service("web", 80, 8080, "http", waypoint="wp")
    alpha = node("alpha", "10.0.0.2:15008", services=())
    beta = node(
        "beta",
        "10.0.0.3:15008",
        workload("beta", "web", "10.0.0.3", 8080, services=("web.default",)),
        workload("beta", "echo", "10.0.0.3", 7000, services=()),
        services=(web, service("echo", 7000)),
    )
    catalog = merged(alpha, (beta, "10.0.0.3"))
    assert where_to_ask(catalog, "web.default", 80) == (
        "ask node beta (HBONE 10.0.0.3:15008): run `meshd policy explain` there; "
        "L7 policy (methods, paths, hosts, headers) is enforced by waypoint 'wp'"
    )
    assert (
        where_to_ask(catalog, "echo.default", 7000)
        == "echo.default has no endpoint for port 7000 (yet): no node to ask"
    )
    assert (
        where_to_ask(catalog, "nope.default", 1)
        == "nope.default is not in this node's catalog (yet): no node to ask"
    )
    assert "with --admin HOST:PORT" in where_to_ask(None, "web.default", 80)


def test_explain_with_a_waypoints_config(tmp_path: Path) -> None:
    """Offline, a waypoint's config knows only its own catalog: a service it declares and is bound to is
    explained as the waypoint decides (route and filters included); a peer's service says to ask the
    running waypoint."""
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "p.toml").write_text(
        '[[authorization]]\nname = "no-admin"\nnamespace = "default"\naction = "DENY"\n'
        '[[authorization.rules]]\nto = [{ paths = ["/admin*"] }]\n'
        '[[route]]\nname = "api"\nservice = "web.default"\nmatch = [{ path = { prefix = "/api" } }]\n'
        'timeout = "2s"\n'
    )
    cfg = tmp_path / "wp.toml"
    cfg.write_text(
        'role = "waypoint"\nnode_name = "wp"\ntrust_domain = "home.arpa"\n'
        f'[policy]\ndir = "{policy}"\n[discovery]\nmdns = false\n'
        '[[workload]]\nname = "web"\naddress = "127.0.0.9"\nports = [8080]\nservices = ["web"]\n'
        '[[service]]\nname = "web"\nwaypoint = "wp"\nports = [{ port = 80, target_port = 8080, protocol = "http" }]\n'
    )
    base = [
        "policy",
        "explain",
        "-c",
        str(cfg),
        "--from",
        "home.arpa/ns/default/sa/client",
        "--to",
        "web.default:80",
    ]
    ok = meshd_cli(*base, "--path", "/api/v1")
    assert ok.returncode == 0, ok.stderr
    assert (
        "(as the waypoint decides)" in ok.stdout
        and "route api [" in ok.stdout
        and "filters timeout" in ok.stdout
    )
    denied = meshd_cli(*base, "--path", "/admin/x")
    assert denied.returncode == 3 and "no-admin" in denied.stdout
    other = meshd_cli(*base[:-1], "db.data:5432")
    assert other.returncode == 1 and "not in this waypoint's catalog" in other.stderr
