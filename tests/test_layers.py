"""The layer contract `make lint` checks: the tree as it is keeps it, and one upward import breaks it.

`lint-imports` runs on a copy of the package, so the test can add an import without touching the
sources; PYTHONPATH puts the copy first, ahead of the editable install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_tree_keeps_the_layers_and_an_upward_import_breaks_them(tmp_path: Path) -> None:
    shutil.copytree(REPO / "meshd", tmp_path / "meshd", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    kept = lint_imports(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "1 kept, 0 broken" in kept.stdout

    # The HBONE core (a mesh service) reaching up into a role: what the contract exists to stop.
    errors = tmp_path / "meshd/hbone/errors.py"
    errors.write_text(errors.read_text() + "\nfrom meshd.node.outbound import Outbound  # noqa\n")
    broken = lint_imports(tmp_path)
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout
    assert "meshd.hbone.errors -> meshd.node.outbound" in broken.stdout, broken.stdout
