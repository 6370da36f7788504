"""Node.js, the independent HTTP/2 and TLS stack the interop tests drive: required (a machine without
`node` fails the test and says what to install; .ci/run installs it), and its clients' output (one JSON
object on stdout) checked and parsed in one place."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

SUPPORT = Path(__file__).resolve().parent


def node_binary() -> str:
    """The `node` executable; fails the test when it is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "Node.js (`node`) is not installed; the interop tests need it (Debian: apt-get install nodejs)"
        )
    return node


def script_command(script: str, *args: str) -> list[str]:
    """The command line running tests/support/`script` with `args`."""
    return [node_binary(), str(SUPPORT / script), *args]


def client_output(returncode: int, stdout: str, stderr: str, context: str = "") -> dict[str, Any]:
    """A Node.js client's JSON answer, once it exited 0 (else the assertion shows what it printed)."""
    assert returncode == 0, f"Node.js client failed:\n{stdout}{stderr}{context}"
    out: dict[str, Any] = json.loads(stdout)
    return out


def run_client(script: str, *args: str, timeout: float, context: str = "") -> dict[str, Any]:
    """Run a client in tests/support and return its JSON answer."""
    proc = subprocess.run(
        script_command(script, *args), capture_output=True, text=True, timeout=timeout, check=False
    )
    return client_output(proc.returncode, proc.stdout, proc.stderr, context)
