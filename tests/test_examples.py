"""Every shipped example config passes `meshd config check` (and so do the policy files it uses)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshd.identity.ca import LocalCA
from tests.conftest import REPO

EXAMPLES = sorted(p for p in (REPO / "configs").rglob("*.toml") if "policy" not in p.parent.name)


def test_there_are_examples_of_every_kind() -> None:
    names = {p.relative_to(REPO / "configs").as_posix() for p in EXAMPLES}
    assert {"meshd.toml", "beta.toml", "waypoint.toml"} <= names
    assert {"homelab/nas.toml", "homelab/pi.toml", "homelab/vm.toml"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_example_passes_config_check(example: Path, ca: LocalCA, tmp_path: Path) -> None:
    uses_local_ca = "ca_dir" in example.read_text()
    overrides = [f"identity.ca_dir={tmp_path / 'ca'}"] if uses_local_ca else []
    out = subprocess.run(
        [sys.executable, "-m", "meshd", "config", "check", "-c", str(example), *overrides],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_policy_examples_load_cleanly_at_the_waypoint() -> None:
    from meshd.policy.load import load_policy_dir

    policy, warnings = load_policy_dir(REPO / "configs" / "policy-examples", role="waypoint")
    assert warnings == [] and len(policy) >= 6
