"""The HTTP/2 front-end: each request stream of a client's h2 session (http2.H2Session) through the
pipeline, its response written back under the client's flow control."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import trio

from meshd.plugins.filters import HttpRequest, ResponseAborted
from meshd.waypoint.admission import Tunnel
from meshd.waypoint.http1 import forwardable
from meshd.waypoint.http2 import H2Exchange
from meshd.waypoint.pipeline import Pipeline
from meshd.waypoint.upstream import UpstreamBodyError


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
            head.method, head.path, head.authority or t.default_authority, head.headers, scheme=head.scheme
        )
        pipeline = self.pipeline
        rec = pipeline.begin(t, request, "HTTP/2")

        async def body() -> AsyncIterator[bytes]:
            async for chunk in ex.body():
                rec.request_bytes += len(chunk)
                yield chunk

        done = await pipeline.run(t, request, rec, body())
        response = done.response
        rec.response_code = response.status
        headers = forwardable(response.headers)
        try:
            if head.method == "HEAD":
                await ex.respond_headers(response.status, headers, end=True)
                await response.aclose()
            else:
                await ex.respond_headers(response.status, headers, end=False)
                async for chunk in response.body:
                    rec.response_bytes += len(chunk)
                    await ex.send(chunk)
                await ex.send(b"", end=True)
        except (ResponseAborted, UpstreamBodyError) as exc:
            rec.error = str(exc)
            if isinstance(exc, UpstreamBodyError):
                done.info.flag("UR")
            ex.abort()
        finally:
            with trio.CancelScope(shield=True):
                await pipeline.finish(rec, done, self.access_log())
