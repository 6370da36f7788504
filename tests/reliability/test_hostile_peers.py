"""Hostile peers against a real `meshd run`: floods, broken HTTP/2, slowloris on every listener, a peer
that never reads. After each, the daemon must still serve a good client (and stay within memory)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import trio
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    WindowUpdateFrame,
)

from meshd.identity.ca import LocalCA
from tests.reliability.hostile import RawPeer
from tests.support.configs import ECHO_PORT
from tests.support.echo_node import CLIENT, ECHO, TD, EchoNode, assert_echoes, echo_node
from tests.support.hbone_mesh import certs_of, running_pool
from tests.support.procs import unique_loopback
from tests.support.reliability import Record

SINK_PORT = 7001  # a workload that accepts and never reads
REFUSED_STREAM = 7
TIMEOUT = 20


@dataclass
class Beta(EchoNode):
    sink_ip: str = ""

    def raw(self) -> RawPeer:
        return RawPeer(self.hbone, self.ca.issue(CLIENT), self.ca.cert_pem)


def _sink_server(ip: str, port: int) -> tuple[socket.socket, list[socket.socket]]:
    """Accepts connections and never reads from them (kept open so the daemon's writes block)."""
    listener = socket.create_server((ip, port))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    return listener, held


@pytest.fixture(scope="module")
def beta(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Beta]:
    tmp = tmp_path_factory.mktemp("hostile")
    ca = LocalCA.init(tmp / "ca", TD)
    sink_ip = unique_loopback()
    sink = (
        f'[[workload]]\nname = "sink"\naddress = "{sink_ip}"\nports = [{SINK_PORT}]\nservices = ["sink"]\n'
        f'[[service]]\nname = "sink"\nports = [{{ port = {SINK_PORT} }}]\n'
    )
    listener, held = _sink_server(sink_ip, SINK_PORT)
    try:
        with echo_node(tmp, ca, sink) as node:
            yield Beta(node.daemon, node.ip, node.ca, node.tmp, sink_ip)
    finally:
        listener.close()
        for s in held:
            s.close()


def assert_still_serves(beta: Beta) -> None:
    """beta's daemon is alive, and a good client gets 64 KiB echoed within TIMEOUT."""
    assert beta.daemon.proc is not None and beta.daemon.proc.poll() is None, beta.daemon.log()[-3000:]

    async def check() -> None:
        with trio.fail_after(TIMEOUT):
            await assert_echoes(beta, bytes(range(256)) * 256)

    trio.run(check)


@contextmanager
def abusive_peer(beta: Beta) -> Iterator[RawPeer]:
    """A raw HTTP/2 peer on beta's HBONE port for the block, closed after it; then beta must still
    serve a good client."""
    peer = beta.raw()
    try:
        yield peer
    finally:
        peer.close()
    assert_still_serves(beta)


# ---- HTTP/2 abuse on 15008 ------------------------------------------------------------------------


def test_connect_flood_beyond_the_stream_limit(beta: Beta, record: Record) -> None:
    with abusive_peer(beta) as peer:
        peer.send(b"".join(peer.connect(1 + 2 * i, f"{beta.ip}:{ECHO_PORT}") for i in range(150)))
        accepted: set[int] = set()
        refused: set[int] = set()
        until = time.monotonic() + TIMEOUT
        while len(accepted) + len(refused) < 150 and time.monotonic() < until and not peer.closed:
            for f in peer.frames(until):
                if isinstance(f, HeadersFrame):
                    accepted.add(f.stream_id)
                elif isinstance(f, RstStreamFrame) and f.error_code == REFUSED_STREAM:
                    refused.add(f.stream_id)
        assert not peer.closed, "the flood cost the whole connection, not just the extra streams"
        assert len(accepted) == 100 and refused == {1 + 2 * i for i in range(100, 150)}
        # The 100 accepted tunnels still work: echo on the first.
        peer.send(DataFrame(1, data=b"still tunnelling", flags=["END_STREAM"]).serialize())
        got = b""
        until = time.monotonic() + TIMEOUT
        while b"still tunnelling" not in got and time.monotonic() < until:
            got += b"".join(
                f.data for f in peer.frames(until) if isinstance(f, DataFrame) and f.stream_id == 1
            )
        assert got == b"still tunnelling"
    record("HBONE 15008", "150 concurrent CONNECTs on one connection (limit 100)")


def test_rst_storm(beta: Beta, record: Record) -> None:
    with abusive_peer(beta) as peer:
        burst = bytearray()
        for i in range(3000):
            sid = 1 + 2 * i
            burst += peer.connect(sid, f"{beta.ip}:{ECHO_PORT}")
            burst += RstStreamFrame(sid, error_code=8).serialize()
        peer.send(bytes(burst))
        peer.frames(time.monotonic() + 1)
    record("HBONE 15008", "3000 CONNECT + RST_STREAM pairs")


def test_window_update_overflow_drops_that_connection_only(beta: Beta, record: Record) -> None:
    with abusive_peer(beta) as peer:
        peer.send(peer.connect(1, f"{beta.ip}:{ECHO_PORT}"))
        peer.send(WindowUpdateFrame(0, window_increment=2**31 - 1).serialize())
        peer.send(WindowUpdateFrame(1, window_increment=2**31 - 1).serialize())
        assert peer.wait_closed(TIMEOUT), "a flow-control overflow must end the connection"
    record("HBONE 15008", "WINDOW_UPDATE past 2^31-1 (connection and stream)")


def test_oversized_header_list(beta: Beta, record: Record) -> None:
    with abusive_peer(beta) as peer:
        huge = [(":method", "CONNECT"), (":authority", f"{beta.ip}:{ECHO_PORT}")]
        huge += [(f"x-pad-{i}", "v" * 1000) for i in range(300)]  # ~300 KiB, limit 64 KiB
        block = peer.encoder.encode(huge)
        first = HeadersFrame(1, data=block[:16000])
        rest = [ContinuationFrame(1, data=block[i : i + 16000]) for i in range(16000, len(block), 16000)]
        rest[-1].flags.add("END_HEADERS")
        peer.send(first.serialize() + b"".join(f.serialize() for f in rest))
        frames: list[object] = []
        until = time.monotonic() + TIMEOUT
        while not peer.closed and time.monotonic() < until:
            frames += peer.frames(until)
            if any(isinstance(f, RstStreamFrame | GoAwayFrame | HeadersFrame) for f in frames):
                break
        # Refused: a stream reset, a GOAWAY, or a hang-up. Never a tunnel.
        assert peer.closed or any(isinstance(f, RstStreamFrame | GoAwayFrame) for f in frames), frames
        assert not any(isinstance(f, HeadersFrame) for f in frames)
    record("HBONE 15008", "300 KiB header list (limit 64 KiB)")


def test_headers_without_end_headers_does_not_block_others(beta: Beta, record: Record) -> None:
    stalled = beta.raw()
    try:
        stalled.send(stalled.connect(1, f"{beta.ip}:{ECHO_PORT}")[:-1] and _no_end_headers(stalled, beta))
        assert_still_serves(beta)  # another connection is served while this one waits
        # A frame other than CONTINUATION in the middle of a header block ends the connection at once.
        stalled.send(WindowUpdateFrame(0, window_increment=1).serialize())
        assert stalled.wait_closed(TIMEOUT)
    finally:
        stalled.close()
    record("HBONE 15008", "HEADERS without END_HEADERS (CONTINUATION never sent)")


def _no_end_headers(peer: RawPeer, beta: Beta) -> bytes:
    return peer.headers(
        1, [(":method", "CONNECT"), (":authority", f"{beta.ip}:{ECHO_PORT}")], end_headers=False
    )


# ---- slowloris on every listener --------------------------------------------------------------------


def _trickle(address: tuple[str, int], tls: bool) -> float:
    """Send a request a byte at a time (or a TLS handshake that never completes); seconds until the
    daemon hangs up."""
    start = time.monotonic()
    with socket.create_connection(address, timeout=2) as s:
        if tls:
            s.sendall(b"\x16\x03\x01\x00\x05")  # a TLS record header, then nothing
        request = b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        for i in range(10_000):
            if time.monotonic() - start > 40:
                return float("inf")
            try:
                if not tls:
                    s.sendall(request[i % len(request) : i % len(request) + 1])
                s.settimeout(0.5)
                if s.recv(1024) == b"":
                    return time.monotonic() - start
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - start
    return float("inf")


def test_slowloris_on_every_listener(beta: Beta, record: Record) -> None:
    listeners = {
        "hbone": (15008, True),
        "admin": (15000, False),
        "metrics": (15020, False),
        "readiness": (15021, False),
    }
    took: dict[str, float] = {}

    def run(name: str, port: int, tls: bool) -> None:
        took[name] = _trickle((beta.ip, port), tls)

    threads = [threading.Thread(target=run, args=(n, p, t)) for n, (p, t) in listeners.items()]
    for t in threads:
        t.start()
    assert_still_serves(beta)  # good clients are served while the slow ones hang on
    for t in threads:
        t.join(60)
    assert all(took.get(n, float("inf")) < 15 for n in listeners), took
    for n, (port, _) in listeners.items():
        record(f"{n} {port}", f"slowloris (closed after {took[n]:.1f} s)")


# ---- back-pressure --------------------------------------------------------------------------------


def test_peer_that_never_reads_keeps_memory_bounded(beta: Beta, record: Record) -> None:
    before = beta.rss_kib()
    sent = 0
    total = 200 * 1024 * 1024

    async def push() -> None:
        nonlocal sent
        async with running_pool(certs_of(beta.ca.issue(CLIENT)).client_provider()) as pool:
            # Dialled at beta's address, the daemon presents the identity of the workload there (echo).
            tunnel = await pool.open_tunnel(CLIENT, ECHO, beta.hbone, f"{beta.sink_ip}:{SINK_PORT}")
            chunk = b"x" * (1 << 20)
            with trio.move_on_after(5):  # the push stalls once every window and buffer is full
                while sent < total:
                    await tunnel.send_all(chunk)
                    sent += len(chunk)
            await tunnel.aclose()

    trio.run(push)
    grown = (beta.rss_kib() - before) / 1024
    assert sent < total, "the sink never reads: 200 MiB cannot have gone through"
    assert grown < 64, (
        f"RSS grew {grown:.0f} MiB while {sent >> 20} MiB were pushed at a reader that never reads"
    )
    assert_still_serves(beta)
    record("HBONE 15008", f"200 MiB pushed at a workload that never reads (RSS +{grown:.0f} MiB)")
