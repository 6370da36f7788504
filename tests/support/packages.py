"""Build meshd's single-file zipapp (`make pyz` does the same with shiv) for the tests that run it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO


def build_pyz(out: Path, timeout: float = 600) -> Path:
    """dist-style meshd.pyz at `out`, from this checkout; fails with shiv's own error."""
    shiv = shutil.which("shiv") or str(Path(sys.executable).with_name("shiv"))
    assert Path(shiv).exists(), "shiv is missing: pip install -e '.[test]'"
    built = subprocess.run(
        [shiv, "--compressed", "-c", "meshd", "-p", "/usr/bin/env python3", "-o", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    return out
