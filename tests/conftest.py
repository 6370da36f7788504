from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.identity.ca import LocalCA
from tests.support.procs import Meshd, unique_loopback

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    return LocalCA.init(tmp_path / "ca", "home.arpa")


@pytest.fixture
def loopback() -> str:
    return unique_loopback()


@pytest.fixture
def daemons() -> Iterator[list[Meshd]]:
    """Daemons started by a test; whatever is still running at the end is stopped."""
    started: list[Meshd] = []
    yield started
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
