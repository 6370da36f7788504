"""A small HTTP/1.1 server (h11) for meshd's own endpoints: readiness, metrics and admin.

Handlers are plain functions `(Request) -> Response`; nothing here knows what they serve.
Each connection lives in the server's nursery, is bounded by a read timeout (slowloris), and
is closed in `finally`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from meshd.listeners import open_listeners, per_connection
from meshd.units import Address

# h11 writes an empty reason phrase unless given one ("HTTP/1.1 200 "); curl and browsers show it.
_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}


def reason(status: int) -> bytes:
    """The standard reason phrase of a status code (b"" for a code without one)."""
    return _REASONS.get(status, b"")


log = logging.getLogger("meshd.http")

READ_TIMEOUT = 10.0
MAX_BODY = 1 << 20
# Out-of-capacity accept errors are retried; anything else is a real failure (trio's serve_listeners).
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, text.encode())

    @classmethod
    def json(cls, status: int, data: Any) -> Response:
        """Indented JSON (what a person reads with curl); values JSON lacks (datetimes) as str."""
        return cls(status, json.dumps(data, indent=2, default=str).encode() + b"\n", "application/json")


Handler = Callable[[Request], Response | Awaitable[Response]]


class HttpServer:
    def __init__(self, name: str, routes: Mapping[str, Handler], *, key: str | None = None) -> None:
        self.name = name
        self.key = key or f"listen.{name}"  # the config key of its address, named in bind errors
        self.routes = dict(routes)

    async def serve(
        self, address: Address, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await open_listeners(self.key, address)
        sock = listeners[0].socket
        host, port = sock.getsockname()[:2]
        bound = Address(host, port)
        log.info("listening", extra={"component": self.name, "address": str(bound)})
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started(bound)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno in _CAPACITY_ERRNOS:
                        await trio.sleep(0.1)
                        continue
                    raise
                nursery.start_soon(per_connection(self._serve_connection, self.name), stream)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                with trio.move_on_after(READ_TIMEOUT) as scope:
                    request = await self._read_request(conn, stream)
                if scope.cancelled_caught or request is None:
                    return
                response = await self._dispatch(request)
                headers = [
                    ("content-type", response.content_type),
                    ("content-length", str(len(response.body))),
                    *response.headers,
                ]
                await stream.send_all(
                    conn.send(
                        h11.Response(
                            status_code=response.status, headers=headers, reason=reason(response.status)
                        )
                    )
                )
                if request.method != "HEAD":
                    await stream.send_all(conn.send(h11.Data(data=response.body)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            await self._bad_request(conn, stream, exc)
        except h11.LocalProtocolError as exc:  # a response h11 would not send (a bug here): this one only
            log.warning("%s: response not sent: %s", self.name, exc, extra={"component": self.name})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away, mid-request or mid-response
        finally:
            await stream.aclose()

    async def _bad_request(
        self, conn: h11.Connection, stream: trio.SocketStream, exc: h11.RemoteProtocolError
    ) -> None:
        """A malformed request gets a 400 naming the problem (when no response has begun), then the
        connection closes; the server carries on."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"bad request: {exc}\n".encode()
        head = (
            f"HTTP/1.1 {exc.error_status_hint} {reason(exc.error_status_hint).decode()}\r\n"
            f"content-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode()
        with (
            trio.move_on_after(READ_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await stream.send_all(head + body)

    async def _read_request(self, conn: h11.Connection, stream: trio.SocketStream) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data and conn.their_state is h11.IDLE:
                    return None
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.RemoteProtocolError("request body too large")
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                target = urlsplit(head.target.decode("latin-1"))
                return Request(
                    method=head.method.decode(),
                    path=target.path,
                    query=parse_qs(target.query),
                    headers={k.decode(): v.decode("latin-1") for k, v in head.headers},
                    body=bytes(body),
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _dispatch(self, request: Request) -> Response:
        handler = self.routes.get(request.path)
        if handler is None:
            known = ", ".join(sorted(self.routes))
            return Response.text(404, f"not found: {request.path} (this port serves {known})\n")
        try:
            result = handler(request)
            return await result if isinstance(result, Awaitable) else result
        except Exception:
            log.exception("handler failed", extra={"component": self.name, "path": request.path})
            return Response.text(500, "internal error (see meshd's log)\n")
