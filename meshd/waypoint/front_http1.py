"""The HTTP/1.1 front-end: one client connection inside a tunnel, served by the connection's own task.

Requests in (http1.RequestParser) -> the pipeline -> responses out; keep-alive, pipelined requests in
order, `100 Continue` when the body is first read, an unread body read and dropped (up to a limit) to
keep the connection. No task per request: the connection's task reads, runs the pipeline and writes.
A drain closes an idle connection at once and answers a busy one's request with `connection: close`.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable

import trio

from meshd.observe.accesslog import RequestRecord
from meshd.plugins.filters import (
    Headers,
    HttpRequest,
    HttpResponse,
    RequestInfo,
    ResponseAborted,
    UpstreamBodyError,
)
from meshd.waypoint.admission import Tunnel
from meshd.waypoint.http1 import (
    CHUNK,
    CONTINUE_100,
    END,
    LAST_CHUNK,
    BadMessage,
    Event,
    Head,
    RequestParser,
    chunk,
    forwardable,
    has_body,
    response_head,
)
from meshd.waypoint.pipeline import Pipeline

log = logging.getLogger("meshd.waypoint")

DRAIN_BODY_LIMIT = 1 << 20  # bytes of an unread request body read and dropped to keep the connection
DRAIN_BODY_TIMEOUT = 5.0
_CLOSED = (trio.BrokenResourceError, trio.ClosedResourceError)


class ClientGone(trio.BrokenResourceError):
    """The client closed or broke the connection in the middle of a request body."""


class H1Connection:
    """Serve one HTTP/1.1 client connection (the bytes in `initial` were read already)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        initial: bytes,
        tunnel: Tunnel,
        pipeline: Pipeline,
        draining: Callable[[], bool],
        access_log: Callable[[], bool],
    ) -> None:
        self.stream = stream
        self.tunnel = tunnel
        self.pipeline = pipeline
        self.draining = draining
        self.access_log = access_log
        self.parser = RequestParser()
        self.events: deque[Event] = deque()
        self.pending = initial  # bytes read but not parsed yet (so a drain knows the client started)
        self.idle = True
        self.scope = trio.CancelScope()
        self._request_done = True
        self._continue = False  # send `100 Continue` before reading the body

    async def _next(self) -> Event | None:
        """The next event; None: the client closed (raises BadMessage, trio errors)."""
        events = self.events
        while not events:
            data = self.pending
            if data:
                self.pending = b""
            else:
                data = bytes(await self.stream.receive_some(CHUNK))
                if not data:
                    return None
            events.extend(self.parser.feed(data))
        return events.popleft()

    async def serve(self) -> None:
        with self.scope:  # cancelled by a drain only while idle
            try:
                await self._serve()
            except _CLOSED as exc:
                log.debug("client connection ended: %s", exc)

    async def _serve(self) -> None:
        while True:
            if self.draining() and not self.events and not self.pending:
                return  # draining and idle: close
            self.idle = True
            try:
                event = await self._next()
            except BadMessage as exc:
                await self._bad_request(exc)
                return
            self.idle = False
            if self.scope.cancel_called:
                # A drain found it idle just as a request arrived: close without starting it (as a
                # keep-alive connection closed by the server races with a client's next request).
                return
            if not isinstance(event, Head):
                return  # closed (or a stray END after an Upgrade)
            if not await self._request(event):
                return

    async def _request(self, head: Head) -> bool:
        """Handle one request; True if the connection may carry the next one."""
        t = self.tunnel
        headers = Headers.adopt(head.headers)
        self._request_done = bool(self.events) and self.events[0] is END
        if self._request_done:
            self.events.popleft()
        self._continue = not self._request_done and head.version == "1.1" and _expects_continue(headers)
        request = HttpRequest(head.method, head.target, headers.get("host") or t.default_authority, headers)
        pipeline = self.pipeline
        rec = pipeline.begin(t, request, f"HTTP/{head.version}")
        done = await pipeline.run(t, request, rec, self._body(rec))
        keep = head.keep_alive and head.version == "1.1"  # HTTP/1.0 connections close (as before, with h11)
        keep = await self._respond(head, keep, done.response, rec, done.info)
        if keep and not self._request_done:
            keep = await self._discard_body()
        await pipeline.finish(rec, done, self.access_log())
        return keep and not self.draining()

    async def _body(self, rec: RequestRecord) -> AsyncIterator[bytes]:
        if self._request_done:
            return
        if self._continue:
            self._continue = False
            await self.stream.send_all(CONTINUE_100)
        while True:
            try:
                event = await self._next()
            except BadMessage as exc:
                raise ClientGone(f"bad request body: {exc}") from exc
            if type(event) is bytes:
                rec.request_bytes += len(event)
                yield event
            elif event is END:
                self._request_done = True
                return
            else:
                raise ClientGone("client closed the connection mid-body")

    async def _discard_body(self) -> bool:
        """Read and drop what is left of the request body, to keep the connection; False: close it."""
        dropped = 0
        with trio.move_on_after(DRAIN_BODY_TIMEOUT):
            while not self._request_done:
                try:
                    event = await self._next()
                except BadMessage:
                    return False
                if type(event) is bytes:
                    dropped += len(event)
                    if dropped > DRAIN_BODY_LIMIT:
                        return False
                elif event is END:
                    self._request_done = True
                else:
                    return False
            return True
        return False

    async def _respond(
        self, head: Head, keep: bool, response: HttpResponse, rec: RequestRecord, info: RequestInfo
    ) -> bool:
        rec.response_code = status = response.status
        headers = forwardable(response.headers)
        with_body = has_body(status, head.method)
        length_known = "content-length" in response.headers
        chunked = with_body and not length_known and head.version == "1.1"
        if with_body and not length_known and not chunked:
            keep = False  # HTTP/1.0 client, unknown length: the body ends with the connection
        if chunked:
            headers.append(("transfer-encoding", "chunked"))
        if self.draining() or not keep:
            keep = False
            headers.append(("connection", "close"))
        try:
            out = response_head(status, headers)
        except ValueError as exc:
            log.info("response not writable as HTTP/1.1: %s", exc)
            await response.aclose()
            return False
        send_all = self.stream.send_all
        if not with_body:
            await response.aclose()
            await send_all(out)
            return keep
        if not length_known:
            await send_all(out)  # a stream of unknown length: the client gets the headers now
            out = b""
        # With a known length, the headers go out with the first body chunk (one write, one frame).
        try:
            async for data in response.body:
                rec.response_bytes += len(data)
                await send_all(out + (chunk(data) if chunked else data))
                out = b""
        except (ResponseAborted, UpstreamBodyError) as exc:
            rec.error = str(exc)
            if isinstance(exc, UpstreamBodyError):
                info.flag("UR")
            return False  # no last chunk: the client sees the connection end mid-response
        tail = out + LAST_CHUNK if chunked else out
        if tail:
            await send_all(tail)
        return keep

    async def _bad_request(self, exc: BadMessage) -> None:
        body = f"bad request: {exc}\n".encode()
        head = [("content-type", "text/plain"), ("content-length", str(len(body))), ("connection", "close")]
        with contextlib.suppress(*_CLOSED):
            await self.stream.send_all(response_head(exc.status, head) + body)


def _expects_continue(headers: Headers) -> bool:
    expect = headers.get("expect")
    return expect is not None and expect.lower() == "100-continue"
