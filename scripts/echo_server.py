"""A threaded TCP echo server for the demo and the benchmarks (socat PIPE deadlocks on two-way bulk traffic)."""

from __future__ import annotations

import argparse
import socket
import socketserver


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while data := sock.recv(1 << 16):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("address", help="HOST:PORT")
    host, _, port = ap.parse_args().address.rpartition(":")
    with Server((host, int(port)), Echo) as server:
        server.serve_forever()
