"""The HTTP/2 front-end: each request stream of a client's h2 session (http2.H2Session) through the
pipeline, its response written back under the client's flow control, trailers and all.

A gRPC call the waypoint answers itself (deny, no route, timeout, overflow: any non-200 status) is
answered as gRPC: HTTP 200, trailers-only, `grpc-status` from the HTTP status (meshd/grpc.py), so the
client sees PERMISSION_DENIED, DEADLINE_EXCEEDED, UNAVAILABLE ... rather than a protocol error.
A client's RST_STREAM cancels this handler (http2.H2Session), which resets the upstream stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import trio

from meshd import grpc
from meshd.observe.accesslog import RequestRecord
from meshd.plugins.filters import (
    FilterContext,
    HttpRequest,
    HttpResponse,
    RequestInfo,
    ResponseAborted,
    UpstreamBodyError,
)
from meshd.waypoint.admission import Tunnel
from meshd.waypoint.http1 import forwardable
from meshd.waypoint.http2 import H2Exchange
from meshd.waypoint.pipeline import Outcome, Pipeline
from meshd.waypoint.router import CompiledRoute

FLAG_DOWNSTREAM_RESET = "DC"  # Envoy's: the downstream went away before the response ended


class H2Front:
    """The handler of one tunnel's h2 session: one call per request stream."""

    def __init__(self, tunnel: Tunnel, pipeline: Pipeline, access_log: Callable[[], bool]) -> None:
        self.tunnel = tunnel
        self.pipeline = pipeline
        self.access_log = access_log

    async def __call__(self, ex: H2Exchange) -> None:
        t = self.tunnel
        head = ex.head
        request = HttpRequest(
            head.method,
            head.path,
            head.authority or t.default_authority,
            head.headers,
            scheme=head.scheme,
            trailers=ex.trailers,
        )
        pipeline = self.pipeline
        rec = pipeline.begin(t, request, "HTTP/2")

        async def body() -> AsyncIterator[bytes]:
            async for chunk in ex.body():
                rec.request_bytes += len(chunk)
                yield chunk

        done: Outcome | None = None
        try:
            done = await pipeline.run(t, request, rec, body())
            await self._respond(ex, done, rec)
        finally:
            if done is None or ex.reset:
                # The client reset the stream (or the session ended) before the response went out.
                info = done.info if done is not None else RequestInfo("", source_principal=t.source.principal)
                info.flag(FLAG_DOWNSTREAM_RESET)
                rec.error = rec.error or "client reset the stream"
                done = Outcome(done.response if done is not None else HttpResponse(0), info, *_route(done))
            with trio.CancelScope(shield=True):
                await pipeline.finish(rec, done, self.access_log())

    async def _respond(self, ex: H2Exchange, done: Outcome, rec: RequestRecord) -> None:
        head = ex.head
        response = done.response
        rec.response_code = response.status
        headers = forwardable(response.headers)
        try:
            if response.status != 200 and grpc.is_grpc(head.headers.get("content-type")):
                message = await _first_chunk(response)
                reply = grpc.local_reply_headers(response.status, message)
                rec.grpc_status = next(v for k, v in reply if k == "grpc-status")
                rec.response_code = 200  # what the client got, as Envoy counts its gRPC local replies
                await ex.respond_headers(200, reply, end=True)
            elif head.method == "HEAD":
                await ex.respond_headers(response.status, headers, end=True)
                await response.aclose()
            else:
                await ex.respond_headers(response.status, headers, end=False)
                async for chunk in response.body:
                    rec.response_bytes += len(chunk)
                    await ex.send(chunk)
                if response.trailers:
                    await ex.send_trailers(forwardable(response.trailers))
                else:
                    await ex.send(b"", end=True)
        except (ResponseAborted, UpstreamBodyError) as exc:
            rec.error = str(exc)
            if isinstance(exc, UpstreamBodyError):
                done.info.flag("UR")
            ex.abort()


def _route(done: Outcome | None) -> tuple[CompiledRoute | None, list[FilterContext] | None]:
    return (done.route, done.ctxs) if done is not None else (None, None)


async def _first_chunk(response: HttpResponse) -> str:
    """The start of a local answer's body: the grpc-message of its gRPC form."""
    async for chunk in response.body:
        await response.aclose()
        return chunk[:1024].decode("utf-8", "replace")
    return ""
