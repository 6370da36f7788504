"""The example third-party package, pip-installed, is loaded through its `meshd` entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshd.cli import main
from meshd.plugins.manager import filter_types, make_plugin_manager
from meshd.policy import load_policy_dir
from meshd.waypoint.router import compile_router
from tests.plugins.helpers import FakeUpstream, request
from tests.support.paths import REPO

EXAMPLE = REPO / "examples" / "plugins" / "meshd-hello"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(EXAMPLE)],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    sys.path.insert(0, str(target))
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("meshd_hello", None)


def test_entry_point_plugin_is_loaded(installed: Path) -> None:
    pm = make_plugin_manager()
    assert pm.get_plugin("hello") is not None
    types = filter_types(pm)
    assert types["hello"].plugin == "hello"
    assert [d.project_name for _, d in pm.list_plugin_distinfo()] == ["meshd-hello"]
    assert "hello" not in filter_types(make_plugin_manager(load_entry_points=False))


async def test_third_party_filter_works_in_a_route(installed: Path, tmp_path: Path) -> None:
    (tmp_path / "r.toml").write_text(
        '[[route]]\nname = "greet"\nservice = "echo.default"\n'
        'filters = [{ name = "hello", settings = { greeting = "hi there" } }]\n'
    )
    policies, _ = load_policy_dir(tmp_path, role="waypoint")
    choice = compile_router(policies).match(request(), "echo.default")
    assert choice is not None
    from meshd.plugins.filters import RequestInfo

    resp = await choice.route.chain.handle(request(), FakeUpstream(200), RequestInfo("greet"))
    assert resp.headers.get("x-hello") == "hi there"


def test_meshd_plugins_command(installed: Path) -> None:
    out = CliRunner().invoke(main, ["plugins"])
    assert out.exit_code == 0, out.output
    assert any(line.split()[:3] == ["hello", "meshd-hello", "0.1.0"] for line in out.output.splitlines())
    data = json.loads(CliRunner().invoke(main, ["plugins", "--json"]).output)
    hello = next(p for p in data if p["name"] == "hello")
    assert hello["source"] == "meshd-hello 0.1.0" and "hello" in hello["filters"]
    assert {p["name"] for p in data} >= {"meshd.retries", "meshd.ratelimit", "hello"}
