"""Every shipped example config passes `meshd config check` (and so do the policy files it uses)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from meshd.identity.ca import LocalCA
from tests.support.paths import REPO
from tests.support.procs import meshd_cli

HOMELAB = REPO / "configs" / "homelab"
EXAMPLES = sorted(p for p in (REPO / "configs").rglob("*.toml") if "policy" not in p.parent.name)


def test_there_are_examples_of_every_kind() -> None:
    names = {p.relative_to(REPO / "configs").as_posix() for p in EXAMPLES}
    assert {"meshd.toml", "beta.toml", "waypoint.toml"} <= names
    assert {"homelab/nas.toml", "homelab/pi.toml", "homelab/vm.toml", "homelab/waypoint.toml"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_example_passes_config_check(example: Path, ca: LocalCA, tmp_path: Path) -> None:
    text = example.read_text()
    overrides = [f"identity.ca_dir={tmp_path / 'ca'}"] if "ca_dir" in text else []
    if "[ca]" in text:
        overrides.append(f"ca.dir={tmp_path / 'ca'}")
    out = meshd_cli("config", "check", "-c", str(example), *overrides)
    if "state_dir" in text:  # an enrolled host before `meshd enroll`: that, and only that, is missing
        problems = [line for line in out.stderr.splitlines() if not line.startswith("warning: ")]
        assert out.returncode == 2 and len(problems) == 1, out.stderr
        assert "identity.state_dir: " in problems[0] and "(enroll this host: `meshd enroll" in problems[0]
        return
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_homelab_readme_installs_a_file_into_etc_meshd_and_it_finds_its_policy(
    ca: LocalCA, tmp_path: Path
) -> None:
    """The homelab folder copied elsewhere (as the .deb ships it), then installed the way its README
    says into an /etc/meshd of a fake root: the relative policy path resolves there."""
    readme = (HOMELAB / "README.md").read_text()
    for line in (
        "sudo install -m 0644 nas.toml /etc/meshd/meshd.toml",
        "sudo install -d /etc/meshd/policy.d && sudo install -m 0644 policy.d/*.toml /etc/meshd/policy.d/",
    ):
        assert line in readme
    shutil.copytree(REPO / "configs", tmp_path / "doc" / "configs", symlinks=True)
    folder = tmp_path / "doc" / "configs" / "homelab"
    etc = tmp_path / "etc" / "meshd"
    etc.mkdir(parents=True)
    (etc / "policy.d").mkdir()
    shutil.copy(folder / "nas.toml", etc / "meshd.toml")
    for policy in sorted((folder / "policy.d").glob("*.toml")):
        shutil.copy(policy, etc / "policy.d" / policy.name)
    assert len(list((etc / "policy.d").glob("*.toml"))) >= 3
    cfg = etc / "meshd.toml"
    ca_dir = f"{tmp_path / 'ca'}"
    out = meshd_cli("config", "check", "-c", str(cfg), f"identity.ca_dir={ca_dir}", f"ca.dir={ca_dir}")
    assert out.returncode == 0, out.stderr
    shown = json.loads(meshd_cli("config", "show", "-c", str(cfg), f"identity.ca_dir={ca_dir}").stdout)
    assert shown["policy"]["dir"] == str(etc / "policy.d")
    explain = meshd_cli(
        "policy", "explain", "-c", str(cfg),
        "--from", "home.arpa/ns/guest/sa/x", "--to", "db.data:5432", "--source-ip", "192.168.1.99",
    )  # fmt: skip
    assert explain.returncode == 3, explain.stderr  # 3: denied (only hass and grafana reach the db)
    assert f"{etc / 'policy.d' / '10-database.toml'}:3" in explain.stdout, explain.stdout


def test_homelab_configs_name_no_path_outside_their_folder_but_absolute_ones() -> None:
    for example in sorted(HOMELAB.glob("*.toml")):
        for line in example.read_text().splitlines():
            assert "../" not in line.split("#", 1)[0], f"{example.name}: {line}"


def test_policy_examples_load_cleanly_at_the_waypoint() -> None:
    from meshd.policy.load import load_policy_dir

    policy, warnings = load_policy_dir(REPO / "configs" / "policy-examples", role="waypoint")
    assert warnings == [] and len(policy) >= 6
