"""`meshd status`, `meshd peers`, `meshd services` against a real running daemon."""

from __future__ import annotations

import json
from pathlib import Path

from meshd.identity.ca import LocalCA
from tests.support.configs import node_config
from tests.support.procs import Meshd, http_get, meshd_cli


def test_status_peers_services(loopback: str, example_daemon: Meshd) -> None:
    node = example_daemon
    admin = f"{loopback}:15000"

    out = meshd_cli("status", "--admin", admin)
    assert out.returncode == 0, out.stderr
    assert "role node" in out.stdout and "ready" in out.stdout
    assert "spiffe://home.arpa/ns/default/sa/client" in out.stdout and "expires in" in out.stdout

    out = meshd_cli("status", "--admin", admin, "--json")
    assert json.loads(out.stdout)["role"] == "node"

    # The example config's static peer (beta) is not running: it is listed, with its error.
    out = meshd_cli("peers", "--admin", admin)
    assert out.returncode == 0 and "127.0.0.3:15008" in out.stdout and "static" in out.stdout, out.stdout
    peers = json.loads(meshd_cli("peers", "--admin", admin, "--json").stdout)
    assert peers[0]["address"] == "127.0.0.3:15008" and peers[0]["last_error"]

    out = meshd_cli("services", "--admin", admin, "--json")
    assert json.loads(out.stdout)["local"].startswith("n")

    # The admin address can come from the config file too.
    out = meshd_cli("status", "-c", str(node.config), f"--admin={admin}")
    assert out.returncode == 0
    assert node.stop() == 0


def test_status_says_clearly_when_meshd_is_not_running(loopback: str) -> None:
    out = meshd_cli("status", "--admin", f"{loopback}:15000")
    assert out.returncode == 1
    assert "cannot reach meshd's admin API" in out.stderr and "is meshd running?" in out.stderr
    assert "Traceback" not in out.stderr


def test_services_show_ports_protocol_and_waypoint_and_counts_read_as_words(
    tmp_path: Path, ca: LocalCA, loopback: str, daemons: list[Meshd]
) -> None:
    cfg = node_config(
        tmp_path / "n.toml",
        "n1",
        tmp_path / "ca",
        body=(
            f'[[workload]]\nname = "web"\naddress = "{loopback}"\nports = [8080, 7000]\nservices = ["web", "raw"]\n'
            '[[service]]\nname = "web"\nwaypoint = "wp"\nports = [{ port = 80, target_port = 8080, protocol = "http" }]\n'
            '[[service]]\nname = "raw"\nports = [{ port = 7000 }]\n'
        ),
    )
    node = Meshd(cfg, loopback)
    daemons.append(node)
    node.start().wait_ready()
    admin = f"{loopback}:15000"
    out = meshd_cli("services", "--admin", admin)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["service", "ports", "waypoint", "endpoints", "workloads"]
    assert lines[1].split() == ["raw.default", "7000/tcp", "none", "1", "web.default@n1"]
    assert lines[2].split() == [
        "web.default",
        "80->8080/http",
        "wp",
        "(by",
        "service)",
        "1",
        "web.default@n1",
    ]
    status = meshd_cli("status", "--admin", admin).stdout
    assert "0 peers, 2 services, 1 workload;" in status, status
    assert meshd_cli("config", "check", "-c", str(cfg)).stdout.endswith(
        "OK (1 workload, 2 services, role node)\n"
    )
    page = http_get(f"http://{admin}/")[1].decode()
    assert ", ready</p>" in page and "True" not in page
