"""One real `meshd run` node, `beta`, hosting the `echo` workload on its own loopback address, for tests
that dial its HBONE port (15008) directly, with meshd's pool or with raw sockets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from meshd.hbone.pool import HbonePool
from meshd.identity.ca import LocalCA
from meshd.identity.spiffe import SpiffeId
from meshd.tools.echo import echo_server
from tests.support.configs import ECHO_PORT, echo_workload, node_config
from tests.support.hbone_mesh import certs_of, echo_through, running_pool
from tests.support.procs import Meshd, running, unique_loopback

TD = "home.arpa"
CLIENT = SpiffeId(TD, "default", "client")
ECHO = SpiffeId(TD, "default", "echo")  # what beta presents when dialled at the echo's address


@dataclass
class EchoNode:
    daemon: Meshd
    ip: str
    ca: LocalCA
    tmp: Path

    @property
    def hbone(self) -> tuple[str, int]:
        return (self.ip, 15008)

    def log_since(self, mark: int) -> str:
        return self.daemon.log()[mark:]

    def rss_kib(self) -> int:
        """The daemon's resident memory now (VmRSS)."""
        assert self.daemon.proc is not None
        for line in Path(f"/proc/{self.daemon.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@contextmanager
def echo_node(tmp: Path, ca: LocalCA, body: str = "") -> Iterator[EchoNode]:
    """beta running (config tmp/beta.toml, certificates from `ca` at tmp/ca) with the echo workload at
    its address:ECHO_PORT and `body` appended to its config; stopped on exit."""
    ip = unique_loopback()
    cfg = node_config(tmp / "beta.toml", "beta", tmp / "ca", body=echo_workload(ip) + body, trust_domain=TD)
    with echo_server(ip, ECHO_PORT), running(Meshd(cfg, ip)) as daemon:
        yield EchoNode(daemon, ip, ca, tmp)


async def assert_echoes(beta: EchoNode, payload: bytes) -> None:
    """A good client (CLIENT, certificate from beta's CA) gets `payload` echoed back through beta."""
    async with running_pool(certs_of(beta.ca.issue(CLIENT)).client_provider()) as pool:
        assert await echo_once(pool, beta, payload) == payload


async def echo_once(pool: HbonePool, beta: EchoNode, payload: bytes, source: SpiffeId = CLIENT) -> bytes:
    """One tunnel from `source` to beta's echo workload: send, half-close, read the echo to the end."""
    tunnel = await pool.open_tunnel(source, ECHO, beta.hbone, f"{beta.ip}:{ECHO_PORT}")
    return await echo_through(tunnel, payload)
