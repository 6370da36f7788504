"""A plugin installed while a waypoint runs: a route naming its filter is refused with "restart",
`meshd plugins --admin` shows what the daemon loaded, and after a restart the route loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from meshd.identity.ca import LocalCA
from tests.support.configs import node_config
from tests.support.paths import REPO
from tests.support.procs import Meshd, http_get, meshd_cli, wait_for

EXAMPLE = REPO / "examples" / "plugins" / "meshd-hello"
ROUTE = (
    '[[route]]\nname = "greet"\nservice = "echo.default"\n'
    'filters = [{ name = "hello", settings = { greeting = "hi" } }]\n'
)


def loaded(daemon: Meshd) -> set[str]:
    out = meshd_cli("plugins", "--admin", daemon.admin_url.removeprefix("http://"), "--json")
    assert out.returncode == 0, out.stderr
    return {p["name"] for p in json.loads(out.stdout)}


def test_a_plugin_installed_while_running_needs_a_restart_and_says_so(
    tmp_path: Path, ca: LocalCA, loopback: str, daemons: list[Meshd]
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    policy = tmp_path / "policy.d"
    cfg = node_config(tmp_path / "wp.toml", "wp", tmp_path / "ca", policy_dir=policy)
    waypoint = Meshd(cfg, loopback, overrides=["role=waypoint"], env={"PYTHONPATH": str(site)})
    daemons.append(waypoint)
    waypoint.start().wait_ready()
    assert "meshd.retries" in loaded(waypoint) and "hello" not in loaded(waypoint)

    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(EXAMPLE)],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    (policy / "10-greet.toml").write_text(ROUTE)
    waypoint.signal(signal.SIGHUP)
    wait_for(lambda: waypoint.metric("meshd_config_reloads_total", result="failure") == 1, waypoint)
    refused = json.loads(http_get(waypoint.admin_url + "/config_dump")[1])["reload"]["refused"]
    assert any("unknown filter 'hello'" in p for p in refused["problems"]), refused
    assert any(
        "'hello' (meshd-hello 0.1.0) come from plugins installed after meshd started" in p
        and "restart it" in p
        for p in refused["problems"]
    ), refused
    # installed now, but not loaded by the running daemon: the two listings differ
    installed = meshd_cli("plugins", "--json", env={"PYTHONPATH": str(site)})
    assert "hello" in {p["name"] for p in json.loads(installed.stdout)}, installed.stderr
    assert "hello" not in loaded(waypoint)

    assert waypoint.stop() == 0
    waypoint.start().wait_ready()
    assert "hello" in loaded(waypoint)
    dump = json.loads(http_get(waypoint.admin_url + "/config_dump")[1])
    assert "greet" in json.dumps(dump["policy"])
    assert waypoint.stop() == 0
