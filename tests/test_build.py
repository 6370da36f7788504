"""Which build runs (pure Python, or the compiled core), and the compile script's fallback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from meshd.build import COMPILED_MODULES
from tests.support.paths import REPO


def test_version_names_the_build_that_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meshd", "version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    if os.environ.get("MESHD_EXPECT_COMPILED") == "1":  # make test-compiled
        assert f"compiled core, {len(COMPILED_MODULES)} of {len(COMPILED_MODULES)} modules" in out, out
    else:
        assert "(pure Python)" in out, out


def test_compile_core_without_a_compiler_leaves_the_tree_pure(tmp_path: Path) -> None:
    shutil.copytree(REPO / "meshd", tmp_path / "meshd", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compile_core.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": str(tmp_path / "no-such-bin"), "CC": "no-such-cc"},
    )
    assert result.returncode == 0, result.stderr
    assert "not compiling, the pure-Python build stays: no C compiler" in result.stdout
    assert not list(tmp_path.glob("meshd/**/*.so"))


def test_compile_core_refuses_a_tree_without_meshd(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compile_core.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "holds no meshd package" in result.stderr
