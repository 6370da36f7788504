from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.identity.ca import LocalCA
from tests.support.configs import example_node
from tests.support.procs import Meshd, unique_loopback


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


@pytest.fixture
def example_daemon(tmp_path: Path, ca: LocalCA, loopback: str, daemons: list[Meshd]) -> Meshd:
    """configs/meshd.toml as shipped (on its own loopback address and CA), started and ready."""
    node = example_node(tmp_path, ca, loopback)
    daemons.append(node)
    return node.start().wait_ready()
