"""A tiny threaded HTTP/1.1 backend for waypoint tests: answers with its own name, and remembers
every request it saw.

Paths: `?ms=N` on any path waits N ms; `/flaky...` answers 503 the first time it sees an `x-request-id`
(the retry test); anything else 200. The body is `<name> <METHOD> <path>\n`; headers echo the
request's `x-request-id` and `traceparent` back as `x-seen-request-id` / `x-seen-traceparent`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body_size: int


@dataclass
class Backend:
    name: str
    requests: list[Seen] = field(default_factory=list)
    flaky_ids: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self) -> list[str]:
        with self.lock:
            return [s.path for s in self.requests]


def _handler(backend: Backend) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _answer(self) -> None:
            size = int(self.headers.get("content-length") or 0)
            if size:
                self.rfile.read(size)
            seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, size)
            with backend.lock:
                backend.requests.append(seen)
            url = urlsplit(self.path)
            status = 200
            if delay := parse_qs(url.query).get("ms"):  # any path: ?ms=N answers after N ms
                time.sleep(int(delay[0]) / 1000)
            if url.path.startswith("/flaky"):
                rid = seen.headers.get("x-request-id", "")
                with backend.lock:
                    first = rid not in backend.flaky_ids
                    backend.flaky_ids.add(rid)
                status = 503 if first else 200
            body = f"{backend.name} {self.command} {self.path}\n".encode()
            self.send_response(status)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body)))
            self.send_header("x-backend", backend.name)
            self.send_header("x-seen-request-id", seen.headers.get("x-request-id", ""))
            self.send_header("x-seen-traceparent", seen.headers.get("traceparent", ""))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    return Handler


class QuietServer(ThreadingHTTPServer):
    """A threaded HTTP server that drops a client gone mid-answer in silence: the waypoint hangs up on
    purpose (a route timeout, a reset stream), and a traceback per such request is only noise."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


@contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[ThreadingHTTPServer]:
    """`server` answering from a thread (one more per request) until the block ends; then shut and closed."""
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def http_backend(name: str, host: str, port: int) -> Iterator[Backend]:
    backend = Backend(name)
    with serving(QuietServer((host, port), _handler(backend))):
        yield backend
