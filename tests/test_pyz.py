"""The single-file build: dist/meshd.pyz runs meshd with a bare Python, no venv, nothing installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.packages import build_pyz


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pyz_builds_and_runs_without_a_venv(tmp_path: Path) -> None:
    pyz = build_pyz(tmp_path / "meshd.pyz", timeout=300)
    # The interpreter the venv was made from, started isolated: no venv, no site-packages of ours.
    bare_python = getattr(sys, "_base_executable", sys.executable)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SHIV_ROOT": str(tmp_path / "shiv")}
    check = subprocess.run(
        [bare_python, "-I", "-c", "import meshd"], capture_output=True, env=env, timeout=60
    )
    assert check.returncode != 0, "the bare interpreter must not see meshd, or this test proves nothing"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [bare_python, "-I", str(pyz), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            cwd=tmp_path,
        )

    out = run("version")
    assert out.returncode == 0 and out.stdout.startswith("meshd "), out.stderr
    subprocess.run(
        [bare_python, "-I", str(pyz), "ca", "init", "--dir", "ca", "--trust-domain", "home.arpa"],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    (tmp_path / "meshd.toml").write_text('node_name = "pyz"\n[identity]\nca_dir = "ca"\n')
    out = run("config", "check", "-c", "meshd.toml")
    assert out.returncode == 0, out.stderr
    (tmp_path / "bad.toml").write_text("rol = 1\n")
    out = run("config", "check", "-c", "bad.toml")
    assert out.returncode == 2 and "bad.toml:1: unknown key 'rol'" in out.stderr
    assert os.access(pyz, os.X_OK)
