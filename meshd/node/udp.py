"""What both ends of a UDP flow share: a non-blocking datagram socket, moving datagrams between a
socket and a connect-udp tunnel as capsules, and the idle timer.

Must never know: policy, the catalog, how the tunnel was opened.

Where datagrams can wait, and what bounds each place (no queue grows without bound):
- towards the tunnel, at the outbound listener: the flow's memory channel (`queue_packets`); a full
  queue drops the datagram, counted (one slow flow must not stall the listener every flow shares);
- towards the tunnel, at the inbound side: the workload socket's kernel buffer (the sender task reads
  it only as fast as the tunnel takes capsules; the kernel drops the excess, as for any UDP socket);
- inside the tunnel: HTTP/2 flow control (the stream and connection windows);
- towards a socket: never queued; a datagram the kernel does not take at once is dropped, counted.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

import trio

from meshd.hbone.capsule import CapsuleDecoder, datagram_header
from meshd.hbone.stream import TunnelStream
from meshd.observe.udp import (
    DROP_REFUSED,
    DROP_SOCKET_FULL,
    DROP_TOO_LARGE,
    DROP_UNKNOWN_CONTEXT,
    FLUSH_INTERVAL,
    FlowCounters,
    FlowMeter,
)

MAX_DATAGRAM = 65535
LISTENER_RECEIVE_BUFFER = 4 * 1024 * 1024  # one per UDP upstream: every client's datagrams queue here
BATCH_BYTES = 64 * 1024  # capsules written to the tunnel at once
BATCH_PACKETS = 64  # datagrams read from a socket per wake-up
# Why the kernel did not take a datagram, as a drop reason (meshd_udp_dropped_packets_total).
_DROP_REASONS = {
    errno.EAGAIN: DROP_SOCKET_FULL,
    errno.ENOBUFS: DROP_SOCKET_FULL,
    errno.EMSGSIZE: DROP_TOO_LARGE,
    errno.ECONNREFUSED: DROP_REFUSED,
}


class DatagramSocket:
    """A UDP socket for trio, with sends that never wait: a datagram is taken or dropped."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock

    @classmethod
    def bind(cls, host: str, port: int, receive_buffer: int | None = None) -> DatagramSocket:
        """A listening socket; `receive_buffer` asks for a larger kernel queue (capped by
        net.core.rmem_max) so a burst from many clients waits there instead of being dropped."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if receive_buffer is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return cls(sock)

    @classmethod
    def connect(cls, host: str, port: int) -> DatagramSocket:
        """A socket of its own for one flow, connected to the workload: its replies come back here
        (and only its replies: the kernel filters other senders)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.connect((host, port))
        except OSError:
            sock.close()
            raise
        return cls(sock)

    @property
    def address(self) -> tuple[str, int]:
        name = self.socket.getsockname()
        return str(name[0]), int(name[1])

    async def receive_batch(self) -> list[tuple[bytes, tuple[str, int]]]:
        """Wait for at least one datagram; return those queued now (up to BATCH_PACKETS)."""
        sock = self.socket
        out: list[tuple[bytes, tuple[str, int]]] = []
        while not out:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(BATCH_PACKETS):
                try:
                    data, addr = sock.recvfrom(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionRefusedError:
                    continue  # an ICMP port unreachable for an earlier send (connected socket)
                out.append((data, (str(addr[0]), int(addr[1]))))
        return out

    def send_nowait(self, data: bytes, address: tuple[str, int] | None = None) -> str | None:
        """Send one datagram now; None if the kernel took it, else why not (a drop reason: buffer
        full, port closed, too large)."""
        try:
            if address is None:
                self.socket.send(data)
            else:
                self.socket.sendto(data, address)
        except OSError as e:
            reason = _DROP_REASONS.get(e.errno or 0)
            if reason is None:
                raise
            return reason
        return None

    def close(self) -> None:
        if self.socket.fileno() != -1:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()


def encode_batch(payloads: list[bytes]) -> bytearray:
    """DATAGRAM capsules (context 0) for these payloads, back to back."""
    out = bytearray()
    for payload in payloads:
        out += datagram_header(len(payload))
        out += payload
    return out


async def tunnel_to_socket(
    tunnel: TunnelStream,
    deliver: Callable[[bytes], str | None],
    counters: FlowCounters,
    on_drop: Callable[[str, int], None],
    *,
    towards_client: bool,
) -> None:
    """Decode capsules from the tunnel and `deliver` each UDP payload (a returned reason: dropped,
    counted) until the peer ends the stream. Raises CapsuleError on a malformed capsule stream."""
    decoder = CapsuleDecoder()
    unknown = 0
    while data := await tunnel.receive_some():
        now = trio.current_time()
        for payload in decoder.feed(data):
            if towards_client:
                counters.to_client(len(payload), now)
            else:
                counters.from_client(len(payload), now)
            dropped = deliver(payload)
            if dropped is not None:
                counters.dropped += 1
                on_drop(dropped, 1)
        if decoder.stats.unknown_context != unknown:
            on_drop(DROP_UNKNOWN_CONTEXT, decoder.stats.unknown_context - unknown)
            unknown = decoder.stats.unknown_context
    decoder.finish()


async def expire_when_idle(
    counters: FlowCounters, idle_timeout: float, scope: trio.CancelScope, meter: FlowMeter
) -> None:
    """Cancel `scope` once no datagram has passed either way for `idle_timeout` seconds; meanwhile
    flush the flow's counters to its metrics every FLUSH_INTERVAL."""
    while True:
        deadline = counters.last_active + idle_timeout
        now = trio.current_time()
        if now >= deadline:
            scope.cancel()
            return
        await trio.sleep_until(min(deadline, now + FLUSH_INTERVAL))
        meter.flush(counters)
