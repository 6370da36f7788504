"""Hash-checked TCP transfers for faults under load.

Each transfer sends a deterministic byte stream (a seeded pattern, repeated) through a mesh
listener to an echo workload, and checks every byte that comes back against the stream it sent,
as it arrives: a transfer either completes with the right hash, or ends early; the bytes it did
get back must still be a prefix of what was sent. Any other byte counts as corrupted. Every
socket operation is bounded by a timeout, so a hang shows as a timeout, never as a stuck test.
"""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

PATTERN_LEN = (1 << 20) + 7  # not a multiple of any chunk size: chunk boundaries drift
CHUNK = 64 * 1024


@dataclass
class Transfer:
    name: str
    seed: int
    sent: int = 0
    received: int = 0
    corrupted: int = 0
    eof: bool = False  # the far side closed cleanly after the bytes we got
    error: str | None = None
    sent_hash: str = ""
    received_hash: str = ""
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def completed(self) -> bool:
        """Every byte came back, in order, and the stream then ended cleanly."""
        return (
            self.eof
            and self.error is None
            and self.corrupted == 0
            and self.received == self.sent
            and self.sent_hash == self.received_hash
        )

    @property
    def hung(self) -> bool:
        return not self.done.is_set() or (self.error is not None and "timed out" in self.error)

    def __str__(self) -> str:
        return (
            f"{self.name}: sent {self.sent} received {self.received} corrupted {self.corrupted} "
            f"eof={self.eof} error={self.error}"
        )


def _pattern(seed: int) -> bytes:
    p = random.Random(seed).randbytes(PATTERN_LEN)
    return p + p  # slices up to PATTERN_LEN long never wrap


def run_transfer(
    t: Transfer,
    connect: Callable[[], socket.socket],
    stop: threading.Event,
    *,
    max_bytes: int = 1 << 40,
    rate: float = 16e6,
    timeout: float = 15.0,
) -> None:
    """Send until `stop` is set (or max_bytes), then half-close and read to the end; the reader runs
    alongside the writer. Paced at `rate` bytes/s so two cores are left for the daemons."""
    pattern = _pattern(t.seed)
    sent_hash, received_hash = hashlib.sha256(), hashlib.sha256()
    try:
        sock = connect()
    except OSError as exc:
        t.error = f"connect: {exc}"
        t.done.set()
        return
    sock.settimeout(timeout)

    def writer() -> None:
        start = time.monotonic()
        try:
            while not stop.is_set() and t.sent < max_bytes:
                off = t.sent % PATTERN_LEN
                chunk = pattern[off : off + min(CHUNK, max_bytes - t.sent)]
                sock.sendall(chunk)
                sent_hash.update(chunk)
                t.sent += len(chunk)
                ahead = t.sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)  # pacing the load, not waiting for anything
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            t.error = t.error or f"send: {exc or type(exc).__name__}"

    w = threading.Thread(target=writer, name=f"{t.name}-writer", daemon=True)
    w.start()
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                t.eof = True
                break
            off = t.received % PATTERN_LEN
            expected = pattern[off : off + len(data)]
            if data != expected:  # not the bytes we sent at this offset
                t.corrupted += sum(a != b for a, b in zip(data, expected, strict=True))
            received_hash.update(data)
            t.received += len(data)
    except OSError as exc:
        t.error = t.error or f"recv: {exc or type(exc).__name__}"
    finally:
        w.join(timeout + 5)
        if w.is_alive():
            t.error = t.error or "send: writer timed out"
        sock.close()
        t.corrupted += max(0, t.received - t.sent)  # more came back than was ever sent
        t.sent_hash, t.received_hash = sent_hash.hexdigest(), received_hash.hexdigest()
        t.done.set()


@dataclass
class Load:
    """Several concurrent transfers; `stop()` ends them (half-close, drain) and waits, bounded."""

    transfers: list[Transfer]
    stop_event: threading.Event
    threads: list[threading.Thread]

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        self.join(timeout)

    def join(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for th in self.threads:
            th.join(max(0.0, deadline - time.monotonic()))

    def wait_progress(self, at_least: int, timeout: float = 15.0) -> None:
        """Every transfer has had `at_least` bytes echoed back (polled, bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(t.received >= at_least or t.done.is_set() for t in self.transfers):
                return
            time.sleep(0.02)
        raise AssertionError("no progress: " + "; ".join(map(str, self.transfers)))

    @property
    def sent(self) -> int:
        return sum(t.sent for t in self.transfers)

    @property
    def received(self) -> int:
        return sum(t.received for t in self.transfers)

    @property
    def corrupted(self) -> int:
        return sum(t.corrupted for t in self.transfers)

    def report(self) -> str:
        return "\n".join(map(str, self.transfers))


def start_load(targets: Iterable[tuple[str, Callable[[], socket.socket]]], **kwargs: float | int) -> Load:
    """One transfer per (name, connect) target, each in its own thread."""
    stop = threading.Event()
    transfers, threads = [], []
    for i, (name, connect) in enumerate(targets):
        t = Transfer(name, seed=i + 1)
        th = threading.Thread(
            target=run_transfer, args=(t, connect, stop), kwargs=kwargs, name=name, daemon=True
        )
        th.start()
        transfers.append(t)
        threads.append(th)
    return Load(transfers, stop, threads)


def round_trip(connect: Callable[[], socket.socket], payload: bytes, timeout: float = 10.0) -> bytes:
    """Send, half-close, read to the end; b"" if refused or reset."""
    try:
        with connect() as s:
            s.settimeout(timeout)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            out = bytearray()
            while chunk := s.recv(1 << 16):
                out += chunk
            return bytes(out)
    except OSError:
        return b""
