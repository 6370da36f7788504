"""Reload planning: what applies at once, what waits for a restart."""

from __future__ import annotations

from pathlib import Path

from meshd.config.load import load_config
from meshd.config.model import Config
from meshd.identity.spiffe import SpiffeId
from meshd.reload import plan_reload

BASE = """\
trust_domain = "home.arpa"
node_name = "alpha"
[identity]
ca_dir = "ca"
[[workload]]
name = "client"
ports = [8000]
[[upstream]]
service = "echo"
port = 7000
listen = "127.0.0.1:17000"
"""


def cfg(tmp_path: Path, text: str, *overrides: str) -> Config:
    path = tmp_path / "meshd.toml"
    path.write_text(text)
    return load_config(path, overrides)


def test_nothing_changed(tmp_path: Path) -> None:
    old = cfg(tmp_path, BASE)
    plan = plan_reload(old, cfg(tmp_path, BASE))
    assert plan.config == old and plan.restart_needed == () and not plan.changes_upstreams
    assert plan.identities_added == ()


def test_listener_and_identity_changes_wait_for_a_restart(tmp_path: Path) -> None:
    old = cfg(tmp_path, BASE)
    new = cfg(tmp_path, BASE, "listen.hbone=127.0.0.9:15008", "node_name=beta", "log.level=debug")
    plan = plan_reload(old, new)
    assert set(plan.restart_needed) == {"listen", "node_name"}
    assert plan.config.listen == old.listen and plan.config.node_name == "alpha"
    assert plan.config.log.level == "debug"  # applied at once


def test_upstreams_and_workloads_are_diffed(tmp_path: Path) -> None:
    old = cfg(tmp_path, BASE)
    new = cfg(
        tmp_path,
        BASE.replace("127.0.0.1:17000", "127.0.0.1:17001")
        + '[[workload]]\nname = "db"\nports = [5432]\n[[upstream]]\nservice = "db"\nport = 5432\n'
        'listen = "127.0.0.1:15432"\n',
    )
    plan = plan_reload(old, new)
    assert [str(u.listen) for u in plan.upstreams_added] == ["127.0.0.1:17001", "127.0.0.1:15432"]
    assert [str(u.listen) for u in plan.upstreams_removed] == ["127.0.0.1:17000"]
    assert plan.identities_added == (SpiffeId("home.arpa", "default", "db"),)
