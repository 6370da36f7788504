"""Real UDP servers for tests: a threaded server answering each datagram with a function (an echo
server is one), and Debian's dnsmasq as a DNS server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import dns.message
import dns.query

T = TypeVar("T")


def _here(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


@contextmanager
def udp_server(
    host: str,
    port: int,
    answer: Callable[[bytes], bytes | None],
    call: Callable[..., Any] = _here,
    *,
    receive_buffer: int | None = None,
) -> Iterator[tuple[str, int]]:
    """Send `answer(datagram)` back to each datagram's sender (None: no reply), from a thread, until
    the block ends. `call` creates the socket (a netns Host's `call` puts it in that namespace)."""
    sock = call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.bind((host, port))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = answer(data)
            if reply is not None:
                with suppress(OSError):
                    sock.sendto(reply, addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def udp_echo_server(
    host: str, port: int, call: Callable[..., Any] = _here
) -> AbstractContextManager[tuple[str, int]]:
    """Echo every datagram to its sender (see udp_server)."""
    return udp_server(host, port, lambda data: data, call, receive_buffer=4 * 1024 * 1024)


@contextmanager
def dnsmasq(host: str, port: int, tmp: Path, records: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """Debian's dnsmasq answering A queries for `records` (name -> IPv4) on host:port (UDP and TCP).
    Fails (never skips) when dnsmasq is missing: .ci/run installs dnsmasq-base."""
    binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    assert Path(binary).exists(), "dnsmasq is not installed: apt-get install dnsmasq-base (.ci/run does)"
    log = tmp / f"dnsmasq-{host}-{port}.log"
    args = [
        binary,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        f"--listen-address={host}",
        "--bind-interfaces",
        f"--port={port}",
        "--no-resolv",
        "--no-hosts",
        "--user=root",
        "--pid-file=",
        "--log-facility=-",
        *(f"--address=/{name}/{ip}" for name, ip in records.items()),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        name = next(iter(records))
        deadline = time.monotonic() + 10
        while True:  # ready when it answers
            try:
                dns.query.udp(dns.message.make_query(name, "A"), host, port=port, timeout=0.2)
                break
            except (dns.exception.Timeout, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"dnsmasq did not start:\n{log.read_text()}") from None
        yield proc
    finally:
        proc.terminate()
        proc.wait(5)
