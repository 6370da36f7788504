"""Debian's headless Chromium for dashboard tests and the bench: the DOM after the page's scripts ran,
and screenshots. Never downloads a browser; fails (never skips) if chromium is not installed."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars")


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is not installed (Debian: apt-get install chromium; .ci/run does it)"
    return binary


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="meshd-chromium-") as profile:
        return subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def dump_dom(url: str, *, budget_ms: int = 0, timeout: float = 60) -> str:
    """The DOM as serialized after load (with `budget_ms`, after that much virtual time: fetches and
    timers the page started have run)."""
    extra = [f"--virtual-time-budget={budget_ms}"] if budget_ms else []
    out = _run([*extra, "--dump-dom", url], timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def screenshot(
    url: str, path: Path, *, size: str = "1400,1000", budget_ms: int = 0, timeout: float = 60
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = [f"--virtual-time-budget={budget_ms}"] if budget_ms else []
    out = _run([*extra, f"--window-size={size}", f"--screenshot={path}", url], timeout)
    assert out.returncode == 0 and path.exists(), out.stderr[-3000:]
    return path
