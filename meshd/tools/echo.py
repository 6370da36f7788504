"""A TCP echo workload: `python -m meshd.tools.echo HOST:PORT [HOST:PORT ...]`.

For the demo, smoke tests ("does the mesh carry bytes both ways?"), the test suite and the
benchmarks. Threaded on purpose: `socat ... PIPE` deadlocks itself under two-way bulk traffic,
and a thread per connection keeps each direction flowing independently.
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from meshd.units import Address


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while data := sock.recv(1 << 18):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # half-close: the client sees our EOF after its own
        except OSError:
            pass


class ThreadedServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096
    block_on_close = False


@contextmanager
def echo_server(host: str, port: int) -> Iterator[tuple[str, int]]:
    """Serve echo on host:port in a background thread for the duration of the block."""
    server = ThreadedServer((host, port), EchoHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        bound = server.server_address
        yield str(bound[0]), int(bound[1])
    finally:
        server.shutdown()
        server.server_close()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m meshd.tools.echo", description=__doc__)
    ap.add_argument("addresses", nargs="+", metavar="HOST:PORT")
    args = ap.parse_args()
    servers = [ThreadedServer((a.host, a.port), EchoHandler) for a in map(Address.parse, args.addresses)]
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    with suppress(KeyboardInterrupt):
        servers[0].serve_forever()


if __name__ == "__main__":
    main()
