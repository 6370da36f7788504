"""One live HBONE connection under trio: a `Wire` (socket + TLS) driven by a sans-I/O `HboneConnection`.

Must never know: listening, pooling, identities beyond carrying them, what a handler does.

Writing: whoever makes the connection produce bytes hands them to the wire at once (`send_pending`):
a tunnel's sender after framing its chunk, the reader after the frames it answers (PING and SETTINGS
acks, WINDOW_UPDATE), a handler after its response headers. `Wire.write` is synchronous (encrypt,
offer to the socket, keep the rest in order), so there is never a half-done TLS write to cancel and
writers cannot interleave: one writer at a time holds by construction. A chunk therefore goes out
from the task that read it, without waiting for another task's turn; the old single writer task sent
what fifty streams queued in one scheduler batch, and requests crossed daemons in herds.

Tasks (all in the link's own nursery, so a link's lifetime is one `run()` call):
- reader: `wire.receive` -> `conn.receive_data` -> update per-stream slots and wake their waiters. It
  never waits for anything but the socket, so it cannot deadlock behind a sender (docs/design.md,
  "Traps": a reader that waits on a send deadlocks under two-way bulk traffic).
- flusher: the only task that waits for the socket to take the bytes the kernel refused (trio allows
  one waiter per direction); senders whose bytes pile up behind it wait for it (`wait_drained`).
- keepalive (optional): PING every `ping_interval`; no answer within `ping_timeout` fails the link.
- idle watch (optional, client side): retire the connection after `idle_timeout` without streams.
- request handlers (server side): spawned here so they die with their connection.

Finishing: after a GOAWAY (either way) the link closes itself once no stream is left; a broken
transport or a protocol error fails every stream at once with the recorded `failure` reason.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from meshd.hbone import events as ev
from meshd.hbone.connection import HboneConnection
from meshd.hbone.errors import RemoteProtocolError
from meshd.hbone.wire import Wire
from meshd.identity.spiffe import SpiffeId

log = logging.getLogger("meshd.hbone")

# Senders wait once this much ciphertext waits for the socket (then until all of it is out): a fast
# sender buffers at most about this much per connection.
HIGH_WATER = 256 * 1024
FLUSH_TIMEOUT = 2.0  # how long a failing link tries to tell the peer why (GOAWAY) before hanging up


class Signal:
    """Wake every waiter; no memory (waiters re-check their condition in a loop)."""

    __slots__ = ("_lot",)

    def __init__(self) -> None:
        self._lot = trio.lowlevel.ParkingLot()

    async def wait(self) -> None:
        await self._lot.park()

    def fire(self) -> None:
        if self._lot:
            self._lot.unpark_all()


class Slot:
    """What the link knows about one stream, for the task using it."""

    __slots__ = (
        "chunks",
        "readable",
        "remote_ended",
        "reset_code",
        "response",
        "stream_id",
        "writable",
    )

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.chunks: deque[bytes] = deque()
        self.remote_ended = False
        self.reset_code: int | None = None
        self.response: ev.ResponseReceived | None = None
        self.readable = Signal()  # data, end, reset, response, link failure
        self.writable = Signal()  # window opened, reset, link failure

    def wake(self) -> None:
        self.readable.fire()
        self.writable.fire()


RequestCallback = Callable[
    ["HboneLink", "ev.TunnelRequested | ev.UdpTunnelRequested | ev.RequestReceived"], None
]


class HboneLink:
    def __init__(
        self,
        wire: Wire,
        conn: HboneConnection,
        *,
        peer_identity: SpiffeId,
        peer_address: tuple[str, int],
        on_request: RequestCallback | None = None,
        ping_interval: float | None = 10.0,
        ping_timeout: float = 20.0,
        idle_timeout: float | None = None,
    ) -> None:
        self.wire = wire
        self.conn = conn
        self.peer_identity = peer_identity
        self.peer_address = peer_address
        self.failure: str | None = None  # why the link broke; None while healthy or after a clean end
        self.heard_from_peer = False  # any HTTP/2 bytes yet? (TLS 1.3 refusals show before any)
        self._on_request = on_request
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._idle_timeout = idle_timeout
        self._slots: dict[int, Slot] = {}
        self._nursery: trio.Nursery | None = None
        self._wake_flusher = Signal()
        self._drained = Signal()  # the kernel took everything written (or the link failed)
        self._streams_changed = Signal()
        self._pong = Signal()
        self._peer_settings = Signal()
        self._last_pong: bytes = b""
        self._pongs = 0  # PING acknowledgements received (any payload: each proves the link is alive)
        self._finishing = False  # no new streams; close once the queued bytes are out
        self._done = False

    # ---- state -------------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Healthy and willing to carry new streams (no GOAWAY either way)."""
        return not (self._finishing or self._done or self.conn.closed or self.conn.goaway_received)

    @property
    def broken(self) -> bool:
        return self.failure is not None

    @property
    def stream_count(self) -> int:
        return self.conn.stream_count

    def slot(self, stream_id: int) -> Slot | None:
        return self._slots.get(stream_id)

    def add_slot(self, stream_id: int) -> Slot:
        slot = self._slots[stream_id] = Slot(stream_id)
        self._streams_changed.fire()
        return slot

    def release(self, stream_id: int) -> None:
        """Forget a stream (resetting it if still open) and close the link if it was the last one
        after a GOAWAY."""
        slot = self._slots.pop(stream_id, None)
        self.conn.release_stream(stream_id)
        if slot is not None:
            slot.wake()
        self.send_pending()
        self._streams_changed.fire()
        self._maybe_finish()

    def send_pending(self) -> None:
        """Hand what the connection has queued to the wire now (never blocks; see the module doc)."""
        if not self.conn.wants_write or self._done:
            return
        pieces = self.conn.pieces_to_send()
        if not pieces:
            return
        try:
            self.wire.write(*pieces)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.fail(_describe(e))
            return
        if self.wire.pending:
            self._wake_flusher.fire()

    @property
    def backed_up(self) -> bool:
        """More than HIGH_WATER bytes wait for the socket: senders should `wait_drained()`."""
        return self.wire.pending > HIGH_WATER

    async def wait_drained(self) -> None:
        """Wait until the kernel has taken everything written (or the link failed)."""
        while self.wire.pending and not self._done and self.failure is None:
            self._wake_flusher.fire()
            await self._drained.wait()

    async def wait_peer_settings(self) -> bool:
        """Until the peer's first SETTINGS arrived (or the link broke); whether they allow extended
        CONNECT (RFC 8441)."""
        while self.conn.peer_enables_connect_protocol is None and not self.broken:
            await self._peer_settings.wait()
        return bool(self.conn.peer_enables_connect_protocol)

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        assert self._nursery is not None, "spawn() before run() started"
        self._nursery.start_soon(fn, *args)

    def drain(self) -> None:
        """Graceful GOAWAY: in-flight streams continue; the link closes when the last one ends."""
        if self._done or self.conn.closed:
            return
        self.conn.goaway()
        self.send_pending()
        self._maybe_finish()

    def close(self) -> None:
        """Close now: GOAWAY, flush, hang up. Open streams see BrokenResourceError."""
        if self._done:
            return
        if not self.conn.closed:
            self.conn.close()
        self._finish()

    def _maybe_finish(self) -> None:
        if (self.conn.goaway_sent or self.conn.goaway_received) and self.conn.stream_count == 0:
            self.close()

    def _finish(self) -> None:
        self._finishing = True
        self._wake_flusher.fire()

    def fail(self, reason: str) -> None:
        """The link is unusable: wake everyone; the writer tries to flush, then everything stops."""
        if self.failure is None and not self._done:
            self.failure = reason
            log.debug("HBONE link to %s failed: %s", self.peer_address, reason)
        for slot in self._slots.values():
            slot.wake()
        self._drained.fire()
        self._pong.fire()
        self._peer_settings.fire()
        self._finish()

    # ---- tasks -------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._flusher)
                nursery.start_soon(self._reader)
                if self._ping_interval is not None:
                    nursery.start_soon(self._keepalive, self._ping_interval, self._ping_timeout)
                if self._idle_timeout is not None:
                    nursery.start_soon(self._idle_watch, self._idle_timeout)
                task_status.started()
        finally:
            self._done = True
            if self.failure is None and self._slots:
                self.failure = "connection closed"
            for slot in self._slots.values():
                slot.wake()
            self._drained.fire()
            self.wire.close()

    async def _reader(self) -> None:
        try:
            while not self._finishing:
                data = await self.wire.receive()
                if not data:
                    if not self._finishing:
                        self.fail("peer closed the connection")
                    return
                self.heard_from_peer = True
                try:
                    events = self.conn.receive_data(data)
                except RemoteProtocolError as e:
                    self._dispatch_all([])
                    self.fail(str(e))
                    return
                self._dispatch_all(events)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            if not self._finishing:
                self.fail(_describe(e))

    def _dispatch_all(self, events: list[ev.Event]) -> None:
        for event in events:
            self._dispatch(event)
        self.send_pending()

    def _dispatch(self, event: ev.Event) -> None:
        if isinstance(event, ev.DataReceived):
            slot = self._slots.get(event.stream_id)
            if slot is None:
                self.conn.acknowledge(event.stream_id, len(event.data))
            else:
                slot.chunks.append(event.data)
                slot.readable.fire()
        elif isinstance(event, ev.WindowOpened):
            if event.stream_id == 0:
                for slot in self._slots.values():
                    slot.writable.fire()
            elif (slot := self._slots.get(event.stream_id)) is not None:
                slot.writable.fire()
        elif isinstance(event, ev.StreamEnded):
            if (slot := self._slots.get(event.stream_id)) is not None:
                slot.remote_ended = True
                slot.readable.fire()
        elif isinstance(event, ev.StreamReset):
            if (slot := self._slots.get(event.stream_id)) is not None:
                slot.reset_code = event.error_code
                slot.wake()
        elif isinstance(event, ev.ResponseReceived):
            if (slot := self._slots.get(event.stream_id)) is not None:
                slot.response = event
                slot.readable.fire()
        elif isinstance(event, ev.TunnelRequested | ev.UdpTunnelRequested | ev.RequestReceived):
            self.add_slot(event.stream_id)
            if self._on_request is None or self._finishing:
                self.release(event.stream_id)
            else:
                self._on_request(self, event)
        elif isinstance(event, ev.PeerSettingsReceived):
            self._peer_settings.fire()
        elif isinstance(event, ev.PingAcked):
            self._last_pong = event.payload
            self._pongs += 1
            self._pong.fire()
        elif isinstance(event, ev.GoAwayReceived):
            log.debug("GOAWAY from %s (last stream %d)", self.peer_address, event.last_stream_id)
            self._streams_changed.fire()
            self._maybe_finish()
        elif isinstance(event, ev.ConnectionTerminated):
            self.fail(f"peer ended the connection with HTTP/2 error {event.error_code}")
        elif isinstance(event, ev.RequestRejected):
            log.info("rejected request from %s: %d %s", self.peer_identity, event.status, event.reason)

    async def _flusher(self) -> None:
        wire = self.wire
        try:
            while True:
                self.send_pending()
                if wire.pending:
                    if self.failure is not None:
                        with trio.move_on_after(FLUSH_TIMEOUT):
                            await wire.flush()
                        break
                    await wire.flush()
                    continue
                self._drained.fire()
                if self._finishing:
                    break
                await self._wake_flusher.wait()
            if self.failure is None:
                wire.close_notify()
                with trio.move_on_after(FLUSH_TIMEOUT):
                    await wire.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.fail(_describe(e))
        finally:
            assert self._nursery is not None
            self._done = True
            self._drained.fire()
            self._nursery.cancel_scope.cancel()

    async def _keepalive(self, interval: float, timeout: float) -> None:
        while True:
            await trio.sleep(interval)
            if self._finishing:
                return
            payload = self.conn.ping()
            self.send_pending()
            with trio.move_on_after(timeout) as waited:
                while self._last_pong != payload and not self._finishing:
                    await self._pong.wait()
            if waited.cancelled_caught:
                self.fail(f"no answer to PING within {timeout:g} s: peer or network is stuck")
                return

    async def probe(self, timeout: float) -> bool:
        """PING now; True once any PING is acknowledged within `timeout`. False (the link failed, or no
        answer) means the peer or the network is stuck; the caller decides whether to fail the link."""
        seen = self._pongs
        self.conn.ping()
        self.send_pending()
        with trio.move_on_after(timeout):
            while self._pongs == seen and self.failure is None and not self._done:
                await self._pong.wait()
        return self._pongs != seen

    async def _idle_watch(self, timeout: float) -> None:
        while not self._finishing:
            while self.conn.stream_count:
                await self._streams_changed.wait()
            with trio.move_on_after(timeout) as waited:
                while not self.conn.stream_count and not self._finishing:
                    await self._streams_changed.wait()
            if waited.cancelled_caught:
                log.debug("closing idle HBONE connection to %s", self.peer_address)
                self.close()
                return


def _describe(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause):
        return f"{e.__class__.__name__}: {cause}"
    return str(e) or e.__class__.__name__
