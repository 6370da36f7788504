"""The reliability record: every test here adds what it tried and survived; the session writes
build/reliability.json, from which scripts/reliability_report.py renders docs/reliability.md."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from fuzz.targets import TARGETS
from tests.support.paths import REPO
from tests.support.reliability import Record

OUT = REPO / "build" / "reliability.json"
_faults: list[dict[str, Any]] = []


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Record:
    """`record(surface, fault, survived=True, bytes_sent=0, bytes_lost=0, **extra)` for the report.
    `extra` adds keys the report may show or ignore (faults under load add `bytes_received`,
    `bytes_corrupted`, `transfers`, `transfers_failed`, `requests`, `requests_failed`)."""

    def add(
        surface: str,
        fault: str,
        *,
        survived: bool = True,
        bytes_sent: int = 0,
        bytes_lost: int = 0,
        **extra: int | str,
    ) -> None:
        _faults.append(
            {
                "test": request.node.name,
                "surface": surface,
                "fault": fault,
                "survived": survived,
                "bytes_sent": bytes_sent,
                "bytes_lost": bytes_lost,
                **extra,
            }
        )

    return add


@pytest.fixture(scope="session", autouse=True)
def reliability_json() -> Iterator[None]:
    yield
    fuzz = [{"target": t.name, "surface": t.surface, "inputs": t.tried} for t in TARGETS.values() if t.tried]
    if not fuzz and not _faults:
        return
    previous: dict[str, Any] = {}
    if OUT.exists():
        try:
            previous = json.loads(OUT.read_text())
        except ValueError:
            previous = {}
    # A partial run (one file) keeps the other half of an earlier run's record.
    data = {"fuzz": fuzz or previous.get("fuzz", []), "faults": _faults or previous.get("faults", [])}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(data, indent=2) + "\n")
