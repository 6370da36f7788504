"""A network partition between two hosts (network namespaces, tests/netns/lab.py) and its healing,
under load. h1 runs the client and an upstream listener for echo.default; h2 hosts the echo
workload. The partition takes h2's veth down on the bridge: h2 is withdrawn from h1's catalog after peer_timeout (new connections are then refused at once),
and once the link is back up the
catalog and traffic recover with no daemon restarted. Transfers that were running are
hash-checked: each completes intact or ends early; none is corrupted, none hangs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshd.identity.ca import LocalCA
from meshd.tools.echo import echo_server
from tests.netns.lab import Host, Lab, NsMeshd, host_config, ip, namespaces_or_fail
from tests.reliability.load import round_trip, start_load
from tests.support.configs import echo_workload
from tests.support.procs import wait_for
from tests.support.reliability import Record

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(600)]

ECHO_PORT = 7000
UPSTREAM = ("127.0.0.1", 17000)
PEER_TIMEOUT = 2.0
FAIL_WITHIN = 35.0  # a connection on a dead HBONE connection ends by then (ping every 10 s, dead after 20 s)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with namespaces_or_fail(Lab.create, "the partition test needs root") as lab:
        yield lab


def config(tmp: Path, host: Host, peer: Host, body: str) -> Path:
    discovery = (
        f'mdns = false\npeers = ["{peer.ip}:15008"]\nrefresh = "1s"\npeer_timeout = "{PEER_TIMEOUT:g}s"\n'
    )
    return host_config(tmp, host.label, discovery, body)


class TimedProbe:
    """One new connection across the mesh, in a thread: did it round-trip, and how long did it take."""

    def __init__(self, connect: Callable[[], socket.socket]) -> None:
        self.result: bytes | None = None
        self.took = 0.0

        def run() -> None:
            start = time.monotonic()
            self.result = round_trip(connect, b"across", timeout=FAIL_WITHIN + 10)
            self.took = time.monotonic() - start

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(FAIL_WITHIN + 15)
        assert not self.thread.is_alive(), "a connection across the partition hung"


def test_partition_and_healing_under_load(lab: Lab, tmp_path: Path, ca: LocalCA, record: Record) -> None:
    h1, h2 = lab.add_host(), lab.add_host()
    client = (
        f'[[workload]]\nname = "client"\naddress = "{h1.ip}"\nports = [8000]\n'
        f'[[upstream]]\nservice = "echo.default"\nport = {ECHO_PORT}\nlisten = "{UPSTREAM[0]}:{UPSTREAM[1]}"\n'
    )
    echo = echo_workload(h2.ip, ECHO_PORT)
    d1 = NsMeshd(h1, config(tmp_path, h1, h2, client))
    d2 = NsMeshd(h2, config(tmp_path, h2, h1, echo))

    def connect() -> socket.socket:
        return h1.call(socket.create_connection, UPSTREAM, 10)

    server = echo_server(h2.ip, ECHO_PORT)
    h2.call(server.__enter__)  # its socket lives in h2's namespace
    try:
        for d in (d1, d2):
            d.start()
        for d in (d1, d2):
            d.wait_ready()
        wait_for(lambda: d1.nodes() == ["h1", "h2"], d1, d2, timeout=15, what="h1 sees h2")
        wait_for(
            lambda: round_trip(connect, b"hello") == b"hello", d1, d2, timeout=15, what="traffic h1 -> h2"
        )
        pids = [d.proc.pid for d in (d1, d2) if d.proc]

        load = start_load([("h1->h2 #1", connect), ("h1->h2 #2", connect)], rate=2e6, timeout=40.0)
        load.wait_progress(1 << 16)

        ip("-n", lab.bridge_ns, "link", "set", "v2", "down")  # the partition
        cut = time.monotonic()
        during = TimedProbe(connect)
        withdrawn = wait_for(
            lambda: d1.nodes() == ["h1"], d1, timeout=PEER_TIMEOUT + 10, what="h1 withdraws h2"
        )
        after_withdrawal = TimedProbe(connect)  # no endpoint left: refused at once
        after_withdrawal.join()
        assert d2.proc is not None and d2.proc.poll() is None

        ip("-n", lab.bridge_ns, "link", "set", "v2", "up")  # healing
        healed = time.monotonic()
        partition_s = healed - cut
        wait_for(lambda: d1.nodes() == ["h1", "h2"], d1, d2, timeout=15, what="h1 sees h2 again")
        wait_for(
            lambda: round_trip(connect, b"again") == b"again",
            d1,
            d2,
            timeout=15,
            what="traffic after healing",
        )
        recovered = time.monotonic() - healed
        # The connection opened during the partition rode the pooled HBONE connection: it either
        # resumes after healing or fails when that connection is declared dead (ping timeout).
        during.join()
        load.stop(60)
        same = [d.proc.pid for d in (d1, d2) if d.proc and d.proc.poll() is None] == pids
    finally:
        server.__exit__(None, None, None)

    hung = [t for t in load.transfers if t.hung]
    completed = [t for t in load.transfers if t.completed]
    record(
        "two hosts (network namespaces) under load",
        f"partition ({partition_s:.1f} s, veth down) and healing: h2 withdrawn after {withdrawn:.1f} s, "
        f"new connections then refused in {after_withdrawal.took:.2f} s; one opened during the partition "
        f"{'completed' if during.result == b'across' else 'failed'} after {during.took:.1f} s; "
        f"traffic back {recovered:.1f} s after healing; "
        f"{len(completed)}/{len(load.transfers)} running transfers completed intact",
        survived=not hung and load.corrupted == 0 and same and during.result in (b"", b"across"),
        bytes_sent=load.sent,
        bytes_lost=load.corrupted,
        bytes_received=load.received,
        bytes_corrupted=load.corrupted,
        transfers=len(load.transfers),
        transfers_failed=len(load.transfers) - len(completed),
    )
    assert during.result in (b"", b"across") and during.took < FAIL_WITHIN, (during.took, d1.log()[-3000:])
    assert after_withdrawal.result == b"" and after_withdrawal.took < 2.0
    assert not hung and load.corrupted == 0, load.report()
    assert all(t.completed or t.received < t.sent for t in load.transfers), load.report()
    assert same, "a daemon restarted"
