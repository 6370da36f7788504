"""The distribution is `meshd-ambient` ("meshd" on PyPI is an unrelated project); command, import name and
entry-point group stay `meshd`. pip must never resolve the name `meshd` from an index."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib

from tests.support.paths import REPO

DIST = "meshd-ambient"


def _names(requirements: list[str]) -> list[str]:
    return [re.split(r"[\s\[<>=!~;(]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements]


def test_project_is_meshd_ambient_with_the_meshd_command_and_an_spdx_license() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == DIST
    assert project["scripts"] == {"meshd": "meshd.cli:main"}
    assert project["license"] == "Apache-2.0"  # an SPDX string: no setuptools deprecation warning
    dist = importlib.metadata.distribution(DIST)
    assert "meshd" in (dist.read_text("top_level.txt") or "meshd").split()
    assert any(ep.name == "meshd" and ep.group == "console_scripts" for ep in dist.entry_points)


def test_example_plugins_depend_on_meshd_ambient_never_on_meshd() -> None:
    plugins = sorted((REPO / "examples" / "plugins").glob("*/pyproject.toml"))
    assert plugins
    for pyproject in plugins:
        deps = tomllib.loads(pyproject.read_text())["project"].get("dependencies", [])
        names = _names(deps)
        assert "meshd" not in names, f"{pyproject}: depends on PyPI's unrelated 'meshd'"
        assert DIST in names, f"{pyproject}: should depend on {DIST}"


def test_example_plugin_dependencies_are_satisfied_by_the_installed_meshd_without_an_index() -> None:
    """With no index and no find-links, pip can satisfy the plugin's dependencies only from what is installed."""
    pyproject = REPO / "examples" / "plugins" / "meshd-hello" / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--no-index", *deps],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Would install" not in out.stdout, out.stdout
