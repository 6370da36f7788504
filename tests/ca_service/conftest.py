from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.identity.ca import LocalCA
from meshd.tools.echo import echo_server
from tests.support.ca_hosts import Hosts
from tests.support.configs import ECHO_PORT
from tests.support.procs import Meshd


@pytest.fixture
def hosts(tmp_path: Path, ca: LocalCA, daemons: list[Meshd]) -> Iterator[Hosts]:
    h = Hosts(tmp_path, ca, daemons)
    with echo_server(h.a_ip, ECHO_PORT):
        h.alpha.start().wait_ready()
        yield h
