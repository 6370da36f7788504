"""`TcpStream` (the node's local legs) against trio's stream conformance checks, and the pump over it."""

from __future__ import annotations

import socket
import struct

import trio
import trio.testing

from meshd.dataplane.pump import pump
from meshd.node.tcp import TcpStream


def _tcp_pair() -> tuple[TcpStream, TcpStream]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return TcpStream(client), TcpStream(server)


async def test_tcp_stream_is_a_half_closeable_stream() -> None:
    async def maker() -> tuple[TcpStream, TcpStream]:
        return _tcp_pair()

    async def clogged() -> tuple[TcpStream, TcpStream]:
        a, b = _tcp_pair()
        # Both directions full (a sender blocked for good), so the checker sees sends block.
        for s in (a, b):
            # The smallest buffers: otherwise the kernel appends a few bytes to its last unsent
            # segment even when "full", and the checker's small send_all would not block.
            s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
            s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        for s in (a, b):
            async with trio.open_nursery() as nursery:

                async def fill(s: TcpStream = s) -> None:
                    while True:
                        await s.send_all(b"x" * 10_000)

                nursery.start_soon(fill)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        return a, b

    await trio.testing.check_half_closeable_stream(maker, clogged)


async def test_send_nowait_takes_what_the_kernel_takes_without_yielding() -> None:
    a, b = _tcp_pair()
    async with a, b:
        a.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        with trio.testing.assert_no_checkpoints():
            taken = a.send_nowait(b"x" * 10_000_000)
        assert 0 < taken < 10_000_000  # the kernel took a part, the rest would block
        got = 0
        while got < taken:
            got += len(await b.receive_some(1 << 20))
        assert got == taken


async def test_pump_copies_both_ways_and_passes_half_close() -> None:
    app, node_side = _tcp_pair()
    node_upstream, workload = _tcp_pair()
    payload = bytes(range(256)) * 40_000  # ~10 MB, several chunks and sends that block
    async with app, node_side, node_upstream, workload, trio.open_nursery() as nursery:
        results = []

        async def run_pump() -> None:
            results.append(await pump(node_side, node_upstream))

        async def workload_echo() -> None:
            while data := await workload.receive_some(1 << 16):
                await workload.send_all(data)
            await workload.send_eof()

        async def app_send() -> None:
            await app.send_all(payload)
            await app.send_eof()

        nursery.start_soon(run_pump)
        nursery.start_soon(workload_echo)
        nursery.start_soon(app_send)
        echoed = bytearray()
        while data := await app.receive_some(1 << 16):
            echoed += data
    assert echoed == payload
    assert results[0].a_to_b == results[0].b_to_a == len(payload)
    assert results[0].error is None


def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]  # tcp_info.tcpi_state


async def test_a_half_close_to_a_peer_that_already_reset_is_no_error() -> None:
    """The workload answers, ends its side and resets; the client half-closes only then. Its EOF
    cannot be passed on (ENOTCONN), but nothing was lost: the copy ended cleanly, as in ztunnel."""
    app, node_side = _tcp_pair()
    node_upstream, workload = _tcp_pair()
    async with app, node_side, node_upstream, trio.open_nursery() as nursery:
        results = []

        async def run_pump() -> None:
            results.append(await pump(node_side, node_upstream))

        nursery.start_soon(run_pump)
        await app.send_all(b"ping")
        assert await workload.receive_some(4) == b"ping"
        await workload.send_all(b"pong")
        await workload.send_eof()
        assert await app.receive_some(4) == b"pong"
        assert await app.receive_some(4) == b""  # the workload's end reached the client
        workload.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await workload.aclose()  # RST
        tcp_close = 7
        for _ in range(1000):  # loopback delivers the RST at once; bounded all the same
            if _tcp_state(node_upstream.socket) == tcp_close:
                break
            await trio.sleep(0.001)
        assert _tcp_state(node_upstream.socket) == tcp_close
        await app.send_eof()
    assert (results[0].a_to_b, results[0].b_to_a, results[0].error) == (4, 4, None)
