"""The pieces of a UDP flow, on real sockets: DatagramSocket's batches and drop reasons, capsule batches,
and the idle timer (on trio's autojump clock, so no real waiting)."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from meshd.hbone.capsule import CapsuleDecoder
from meshd.node.udp import BATCH_PACKETS, DatagramSocket, encode_batch, expire_when_idle
from meshd.observe.accesslog import ConnectionRecord
from meshd.observe.metrics import Metrics
from meshd.observe.udp import DROP_REFUSED, DROP_TOO_LARGE, FlowCounters, UdpTelemetry


async def test_receive_batch_takes_what_is_queued(loopback: str) -> None:
    server = DatagramSocket.bind(loopback, 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind((loopback, 0))
        for i in range(BATCH_PACKETS + 5):
            client.sendto(b"%d" % i, server.address)
        first = await server.receive_batch()
        second = await server.receive_batch()
        assert [d for d, _ in first + second] == [b"%d" % i for i in range(BATCH_PACKETS + 5)]
        assert len(first) == BATCH_PACKETS
        assert {a for _, a in first} == {client.getsockname()}
        assert server.send_nowait(b"back", client.getsockname()) is None
        assert client.recv(10) == b"back"
    server.close()


async def test_send_to_a_closed_port_is_a_refused_drop(loopback: str) -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind((loopback, 0))
    port = closed.getsockname()[1]
    closed.close()
    flow = DatagramSocket.connect(loopback, port)
    assert flow.send_nowait(b"first") is None  # taken; the ICMP port unreachable comes back
    with trio.fail_after(5):
        while (reason := flow.send_nowait(b"again")) is None:
            await trio.sleep(0.01)
    assert reason == DROP_REFUSED
    assert flow.send_nowait(b"x" * 70_000) == DROP_TOO_LARGE
    flow.close()


def test_encode_batch_is_back_to_back_capsules() -> None:
    payloads = [b"", b"a", b"b" * 1400, b"c" * 70]
    assert CapsuleDecoder().feed(encode_batch(payloads)) == payloads


@pytest.mark.parametrize("active_for", [0.0, 7.5])
async def test_idle_timer_fires_after_the_last_datagram(
    autojump_clock: trio.testing.MockClock, active_for: float
) -> None:
    counters = FlowCounters(last_active=trio.current_time())
    meter = UdpTelemetry(Metrics(), access_log=False).opened(_record())
    start = trio.current_time()

    async def traffic() -> None:
        while trio.current_time() - start < active_for:
            counters.from_client(10, trio.current_time())
            await trio.sleep(0.5)

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic)
            await expire_when_idle(counters, 3.0, scope, meter)
    assert scope.cancel_called
    assert trio.current_time() - counters.last_active == pytest.approx(3.0, abs=0.01)


def _record() -> ConnectionRecord:
    return ConnectionRecord(reporter="source", src="127.0.0.1:1", dst="x.default:53", protocol="udp")
