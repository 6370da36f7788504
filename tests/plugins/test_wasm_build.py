"""The checked-in test modules are what their sources build to (tests/wasm/build.py --check, npm).

Needs npm and the registry (the pinned SDK); .ci/run installs npm where it is missing. The npm cache
(~/.cache/meshd-wasm-build) makes later runs quick.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BUILD = Path(__file__).resolve().parents[1] / "wasm" / "build.py"


@pytest.mark.slow
def test_built_modules_match_their_sources() -> None:
    assert shutil.which("npm"), "npm is missing: apt-get install npm (.ci/run does)"
    done = subprocess.run(
        [sys.executable, str(BUILD), "--check"], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
