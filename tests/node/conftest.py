"""Two real meshd nodes as subprocesses on their own loopback addresses: alpha hosts the client app
and an upstream listener; beta hosts the echo workload (and a policy dir the tests write into)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.tools.echo import echo_server
from tests.support.configs import ECHO_PORT
from tests.support.mesh import Mesh, NodePair, Upstream, client_host, echo_host
from tests.support.procs import unique_loopback

UPSTREAM_PORT = 17000


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[NodePair]:
    a_ip, b_ip = unique_loopback(), unique_loopback()
    nodes = Mesh(
        tmp_path,
        [
            client_host(
                "alpha",
                a_ip,
                Upstream("echo.default", ECHO_PORT, f"{a_ip}:{UPSTREAM_PORT}"),
                policy={},
            ),
            echo_host("beta", b_ip, ECHO_PORT, policy={}),
        ],
    )
    with echo_server(b_ip, ECHO_PORT), nodes.running():
        nodes.wait_knows("alpha", services=["echo.default"])
        yield NodePair(nodes["alpha"], nodes["beta"], (a_ip, UPSTREAM_PORT), nodes.policy_dir("beta"))
