"""Reading a test daemon's own endpoints: a metric's value, and polling for a condition."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.support.procs import Meshd, http_get


def metric(daemon: Meshd, name: str, **labels: str) -> float:
    """The sum of `name` over the series whose labels include `labels` (Prometheus text format)."""
    _, body = http_get(daemon.metrics_url)
    total = 0.0
    for line in body.decode().splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(condition: Callable[[], bool], daemon: Meshd, timeout: float = 15.0) -> None:
    """Poll a condition on a daemon's own endpoints (not a sleep standing in for readiness)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s:\n{daemon.log()[-4000:]}")
