"""The CI soak: `bench/soak.py --minutes 2` (three long-lived meshd daemons plus a restarted peer, mixed L4
and L7 traffic, connection and peer churn) passes its own slope test, writes a plot, and loses no byte.

~125 s of wall time (2 min of load + set-up); results go to tmp_path, so a long run's build/soak.json
(which scripts/reliability_report.py renders) is left alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib  # noqa: F401 - the soak draws its plot; a test dependency, so missing fails, never skips
import pytest

from tests.support.paths import REPO


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_two_minutes(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "soak.py"),
            "--minutes",
            "2",
            "--out",
            str(tmp_path),
            "--build-json",
            str(tmp_path / "soak.json"),
        ],
        capture_output=True,
        text=True,
        timeout=200,  # 120 s of load + ~5 s set-up + bounded teardown; the script bounds every wait
        cwd=REPO,
    )
    out = run.stdout[-4000:] + run.stderr[-3000:]
    assert run.returncode in (0, 1), f"soak could not run (status {run.returncode}):\n{out}"
    doc = json.loads((tmp_path / "soak.json").read_text())
    grows = {f"{d} {m}": r for d, ms in doc["resources"].items() for m, r in ms.items() if r.get("grows")}
    assert not grows, f"resources grow without bound: {grows}\n{out}"
    assert doc["totals"]["bytes_lost"] == 0, (
        f"bytes lost: {doc['totals']['losses']}\nchurn: {doc['churn']['restarts']}\n{out}"
    )
    assert doc["totals"]["l4_transfers"] > 100 and doc["totals"]["l7_requests"] > 100, out
    assert len(doc["churn"]["restarts"]) >= 3 and doc["churn"]["reloads"] >= 10, doc["churn"]
    png = tmp_path / Path(doc["plot"]).name
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", doc["plot"]
    assert run.returncode == 0 and doc["verdict"] == "pass", f"{doc['failures']}\n{out}"
