"""The L7 filter API: proxy-wasm's shape, in Python, driven by a FilterChain.

Theory of operation
  * A `Filter` is built once per route when policy loads (its settings already validated). It keeps
    no per-request state: every callback receives a `FilterContext`, one per (request, filter), whose
    `state` dict is that filter's scratch space for this request.
  * Request side, in filter order: `on_request_headers`, then `on_request_body` per chunk (streamed,
    lazily, as the upstream reads the body). Response side, in reverse order: `on_response_headers`,
    then `on_response_body` per chunk. Each step returns `CONTINUE` or a `LocalResponse` (answer here,
    never reach the upstream); a body step may also return `bytes` to replace the chunk. Any step may
    be `async` (or return an awaitable): the chain awaits it.
  * `wrap_upstream(ctx, send)` lets a filter drive the upstream call (retries, timeouts): it gets
    `send: async (HttpRequest) -> HttpResponse` and returns another such callable. Filters wrap in
    order, so the first filter is the outermost. `send` raises `UpstreamError` for connect failures
    and resets; a retry may call it again only if `request.body.replayable`.
  * `on_log(ctx, record)` is called once per request, after the response, in filter order.
  * Failures are contained: a filter that raises turns the request into a 500 with response flag
    `PLUGIN_ERROR`; the error is logged once per (plugin, route) with the plugin's name, and the next
    request runs the chain as usual.

No sockets here; the only trio use is `trio.sleep`/timeouts inside the built-in filters.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias, TypeVar, cast

log = logging.getLogger("meshd.plugins")

PLUGIN_ERROR: Final = "PLUGIN_ERROR"

T = TypeVar("T")


class _Continue:
    __slots__ = ()

    def __repr__(self) -> str:
        return "CONTINUE"


CONTINUE: Final = _Continue()
"""Go on to the next filter (and eventually the upstream)."""


# ---- messages -----------------------------------------------------------------------------------


class Headers:
    """HTTP header fields in order, names lower case (as HTTP/2 sends them); repeated names allowed."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(k.lower(), v) for k, v in items]

    @classmethod
    def adopt(cls, items: list[tuple[str, str]]) -> Headers:
        """Headers over `items` as they are (names lower case already, as a parser gave them): no copy."""
        headers = cls.__new__(cls)
        headers._items = items
        return headers

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of `name`; repeated fields are joined with `, ` (RFC 9110)."""
        name = name.lower()
        values = [v for k, v in self._items if k == name]
        return ", ".join(values) if values else default

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self._items if k == name]

    def add(self, name: str, value: str) -> None:
        self._items.append((name.lower(), value))

    def set(self, name: str, value: str) -> None:
        self.remove(name)
        self._items.append((name.lower(), value))

    def remove(self, name: str) -> None:
        name = name.lower()
        self._items = [(k, v) for k, v in self._items if k != name]

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        name = name.lower()  # once, not per field
        return any(k == name for k, _ in self._items)

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def copy(self) -> Headers:
        return Headers(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


async def _no_body() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover


async def body_of(data: bytes) -> AsyncIterator[bytes]:
    """A body stream of one chunk (none if empty)."""
    if data:
        yield data


class RequestBody:
    """A streamed request body that the upstream reads, possibly more than once (retries).

    Chunks pass through the filters' `on_request_body` as they are read, and are kept while the total
    stays within `buffer_limit`; beyond it the buffer is dropped and `replayable` becomes False, so a
    retry cannot send the body again (and must not try).
    """

    def __init__(
        self,
        source: AsyncIterable[bytes],
        buffer_limit: int = 64 * 1024,
        transform: Callable[[bytes, bool], Awaitable[bytes]] | None = None,
    ) -> None:
        self._source = source.__aiter__()
        self._limit = buffer_limit
        self._transform = transform
        self._buffer: list[bytes] | None = []
        self._done = False
        self._reads = 0
        self.size = 0

    @property
    def replayable(self) -> bool:
        """True while everything read so far is still buffered (so `chunks()` can start over)."""
        return self._buffer is not None

    @property
    def complete(self) -> bool:
        return self._done

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body from its start. Raises RuntimeError if a previous reader went beyond the limit."""
        if self._reads and self._buffer is None:
            raise RuntimeError("request body was streamed beyond the buffer limit; it cannot be replayed")
        self._reads += 1
        for chunk in list(self._buffer or ()):
            yield chunk
        while not self._done:
            try:
                chunk = await self._source.__anext__()
            except StopAsyncIteration:
                self._done = True
                chunk, end = b"", True
            else:
                end = False
            if self._transform is not None:
                chunk = await self._transform(chunk, end)
            if not chunk:
                continue
            self.size += len(chunk)
            if self._buffer is not None:
                if self.size <= self._limit:
                    self._buffer.append(chunk)
                else:
                    self._buffer = None
            yield chunk

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])


@dataclass
class HttpRequest:
    method: str
    path: str  # with the query string, as sent
    authority: str  # Host / :authority
    headers: Headers = field(default_factory=Headers)
    body: RequestBody = field(default_factory=lambda: RequestBody(_no_body()))
    scheme: str = "http"
    trailers: Headers = field(default_factory=Headers)  # HTTP/2: filled in once the body has been read

    @property
    def path_only(self) -> str:
        return self.path.split("?", 1)[0].split("#", 1)[0]


@dataclass
class HttpResponse:
    status: int
    headers: Headers = field(default_factory=Headers)
    body: AsyncIterable[bytes] = field(default_factory=_no_body)
    trailers: Headers = field(default_factory=Headers)  # filled in by the body's end (gRPC's status)

    async def read(self) -> bytes:
        return b"".join([c async for c in self.body])

    async def aclose(self) -> None:
        """Discard the body (an abandoned attempt of a retry)."""
        close = getattr(self.body, "aclose", None)
        if close is not None:
            await close()


@dataclass(frozen=True)
class LocalResponse:
    """Answer the request here: the upstream never sees it. `flag` is the access log's response flag."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    flag: str | None = None

    def to_response(self) -> HttpResponse:
        headers = Headers(self.headers)
        if self.body and "content-type" not in headers:
            headers.add("content-type", "text/plain")
        headers.set("content-length", str(len(self.body)))
        return HttpResponse(self.status, headers, body_of(self.body))


StepResult = _Continue | LocalResponse
BodyResult = _Continue | LocalResponse | bytes
MaybeAwaitable: TypeAlias = "T | Awaitable[T]"
SendUpstream = Callable[[HttpRequest], Awaitable[HttpResponse]]


class UpstreamError(Exception):
    """Raised by `send_upstream`: `kind` is `connect-failure` or `reset`; `flag` is Envoy's (UF, UR)."""

    FLAGS: Final = {"connect-failure": "UF", "reset": "UR"}

    def __init__(self, kind: str, message: str = "") -> None:
        super().__init__(message or kind)
        self.kind = kind
        self.flag = self.FLAGS.get(kind, "UF")


class UpstreamBodyError(Exception):
    """The upstream failed (connection lost, stream reset) while the response body was streaming."""


class ResponseAborted(Exception):
    """A response-body filter answered locally after the response headers were sent: reset the stream."""


# ---- per-request context ------------------------------------------------------------------------


@dataclass
class RequestInfo:
    """What the proxy knows about one request, shared by every filter of the chain."""

    route: str
    source_principal: str | None = None  # Istio spelling td/ns/NS/sa/SA; None for plaintext
    source_address: str | None = None
    response_flags: list[str] = field(default_factory=list)
    upstream_attempts: int = 0
    destination_service: str | None = None  # name.namespace, as the catalog names it
    wasm_failures: list[tuple[str, str]] = field(
        default_factory=list
    )  # (filter, reason): the metric's labels

    def flag(self, flag: str) -> None:
        if flag not in self.response_flags:
            self.response_flags.append(flag)


@dataclass
class FilterContext:
    """One filter's view of one request: shared info plus its own per-request `state`."""

    info: RequestInfo
    plugin: str
    filter_name: str
    state: dict[str, Any] = field(default_factory=dict)

    def log(self, level: int, message: str, *args: object) -> None:
        """Log on behalf of this filter (the plugin and route are added)."""
        log.log(level, f"[{self.plugin}/{self.filter_name} route={self.info.route}] {message}", *args)


class Filter:
    """Base class of filters: every step continues unless overridden. Subclass what you need."""

    def on_request_headers(self, ctx: FilterContext, request: HttpRequest) -> MaybeAwaitable[StepResult]:
        return CONTINUE

    def on_request_body(self, ctx: FilterContext, chunk: bytes, end: bool) -> MaybeAwaitable[BodyResult]:
        return CONTINUE

    def on_response_headers(self, ctx: FilterContext, response: HttpResponse) -> MaybeAwaitable[StepResult]:
        return CONTINUE

    def on_response_body(self, ctx: FilterContext, chunk: bytes, end: bool) -> MaybeAwaitable[BodyResult]:
        return CONTINUE

    def wrap_upstream(self, ctx: FilterContext, send: SendUpstream) -> SendUpstream:
        return send

    def on_log(self, ctx: FilterContext, record: dict[str, Any]) -> MaybeAwaitable[None]:
        return None


@dataclass(frozen=True)
class FilterType:
    """What a plugin offers (hook `meshd_filter_types`): a name, a settings dataclass and a factory.

    `settings` is a frozen dataclass read from the route's `settings = {...}` table by meshd's schema
    module (so mistakes get FILE:LINE); `None` means the filter takes no settings. `factory(settings)`
    builds one filter instance per route; a ValueError it raises is reported at the route's line.
    """

    name: str
    factory: Callable[[Any], Filter]
    settings: type[Any] | None = None
    doc: str = ""


@dataclass(frozen=True)
class BoundFilter:
    """A filter instance in a chain, with the plugin (distribution/module) that provided it."""

    name: str
    plugin: str
    filter: Filter


# ---- the chain ----------------------------------------------------------------------------------


async def _resolve(value: MaybeAwaitable[T]) -> T:
    if inspect.isawaitable(value):
        return cast(T, await value)
    return value


class _Contained(Exception):
    """A filter raised: carry which one up through the upstream wrappers."""

    def __init__(self, index: int, exc: Exception) -> None:
        super().__init__(str(exc))
        self.index = index
        self.exc = exc


class _LocalReply(Exception):
    """A request-body filter answered locally while the upstream was reading the body."""

    def __init__(self, index: int, response: LocalResponse) -> None:
        super().__init__(f"local response {response.status}")
        self.index = index
        self.response = response


class _UpstreamBug(Exception):
    def __init__(self, exc: Exception) -> None:
        super().__init__(str(exc))
        self.exc = exc


_PASS_THROUGH = (_Contained, _LocalReply, _UpstreamBug, UpstreamError)


class FilterChain:
    """The filters of one route, in order. Built at policy load; `handle` runs one request.

    Statistics: `errors` counts contained filter failures per filter name.
    """

    def __init__(self, route: str, filters: Sequence[BoundFilter], *, buffer_limit: int = 64 * 1024) -> None:
        self.route = route
        self.filters = tuple(filters)
        self.buffer_limit = buffer_limit
        self.errors: dict[str, int] = {}
        self._logged: set[tuple[str, str]] = set()

    def __len__(self) -> int:
        return len(self.filters)

    def contexts(self, info: RequestInfo) -> list[FilterContext]:
        return [FilterContext(info, f.plugin, f.name) for f in self.filters]

    def _failed(self, index: int, exc: BaseException) -> LocalResponse:
        bound = self.filters[index]
        self.errors[bound.name] = self.errors.get(bound.name, 0) + 1
        key = (bound.plugin, bound.name)
        if key not in self._logged:  # once per (plugin, route): a chain belongs to one route
            self._logged.add(key)
            log.error(
                "filter %r of plugin %r failed on route %r (further failures are counted, not logged): %r",
                bound.name,
                bound.plugin,
                self.route,
                exc,
                exc_info=exc,
            )
        return LocalResponse(500, body=b"filter error\n", flag=PLUGIN_ERROR)

    async def handle(
        self,
        request: HttpRequest,
        send_upstream: SendUpstream,
        info: RequestInfo,
        ctxs: list[FilterContext] | None = None,
    ) -> HttpResponse:
        """Run the request through the chain and the upstream; return the response to send.

        `request.body` should be a fresh `RequestBody` over the client's body stream; the chain
        installs the request-body filters on it. The returned response's body streams through the
        response-body filters (it may raise `ResponseAborted`). Call `log()` after the response.
        """
        ctxs = ctxs if ctxs is not None else self.contexts(info)
        ran = 0  # how many filters saw the request (the response side runs through these)
        local: LocalResponse | None = None
        for i, bound in enumerate(self.filters):
            ran = i + 1
            try:
                result: StepResult = await _resolve(bound.filter.on_request_headers(ctxs[i], request))
            except Exception as exc:
                local = self._failed(i, exc)
                break
            if isinstance(result, LocalResponse):
                local = result
                break
        if local is None:
            request.body._transform = self._request_body_transform(ctxs)
            try:
                response = await self._upstream(ctxs, send_upstream, info)(request)
            except _Contained as c:
                local = self._failed(c.index, c.exc)
            except _LocalReply as r:
                local = r.response
            except UpstreamError as exc:
                info.flag(exc.flag)
                local = LocalResponse(503, body=f"upstream {exc.kind}\n".encode())
            except _UpstreamBug as bug:
                raise bug.exc from None
        if local is not None:
            if local.flag:
                info.flag(local.flag)
            response = local.to_response()
        return await self._response_side(response, ctxs, ran, info)

    def _request_body_transform(self, ctxs: list[FilterContext]) -> Callable[[bytes, bool], Awaitable[bytes]]:
        async def transform(chunk: bytes, end: bool) -> bytes:
            for i, bound in enumerate(self.filters):
                try:
                    result: BodyResult = await _resolve(bound.filter.on_request_body(ctxs[i], chunk, end))
                except Exception as exc:
                    raise _Contained(i, exc) from exc
                if isinstance(result, LocalResponse):
                    raise _LocalReply(i, result)
                if isinstance(result, bytes):
                    chunk = result
            return chunk

        return transform

    def _upstream(
        self, ctxs: list[FilterContext], send_upstream: SendUpstream, info: RequestInfo
    ) -> SendUpstream:
        async def base(request: HttpRequest) -> HttpResponse:
            info.upstream_attempts += 1
            try:
                return await send_upstream(request)
            except _PASS_THROUGH:
                raise
            except Exception as exc:  # a bug in the proxy's send_upstream: not a filter's fault
                raise _UpstreamBug(exc) from exc

        send: SendUpstream = base
        for i in reversed(range(len(self.filters))):
            send = self._guard(i, send, ctxs[i])
        return send

    def _guard(self, index: int, inner: SendUpstream, ctx: FilterContext) -> SendUpstream:
        bound = self.filters[index]
        try:
            wrapped = bound.filter.wrap_upstream(ctx, inner)
        except Exception as exc:
            err = exc

            async def broken(request: HttpRequest) -> HttpResponse:
                raise _Contained(index, err)

            return broken
        if wrapped is inner:
            return inner

        async def guarded(request: HttpRequest) -> HttpResponse:
            try:
                return await wrapped(request)
            except _PASS_THROUGH:
                raise
            except Exception as exc:
                raise _Contained(index, exc) from exc

        return guarded

    async def _response_side(
        self, response: HttpResponse, ctxs: list[FilterContext], ran: int, info: RequestInfo
    ) -> HttpResponse:
        for i in reversed(range(ran)):
            try:
                result: StepResult = await _resolve(
                    self.filters[i].filter.on_response_headers(ctxs[i], response)
                )
            except Exception as exc:
                await response.aclose()
                local = self._failed(i, exc)
                info.flag(PLUGIN_ERROR)
                return local.to_response()
            if isinstance(result, LocalResponse):
                await response.aclose()
                if result.flag:
                    info.flag(result.flag)
                response = result.to_response()
        if ran:
            response.body = self._response_body(response.body, ctxs, ran, info)
        return response

    async def _response_body(
        self, body: AsyncIterable[bytes], ctxs: list[FilterContext], ran: int, info: RequestInfo
    ) -> AsyncIterator[bytes]:
        it = body.__aiter__()
        while True:
            try:
                chunk, end = await it.__anext__(), False
            except StopAsyncIteration:
                chunk, end = b"", True
            for i in reversed(range(ran)):
                try:
                    result: BodyResult = await _resolve(
                        self.filters[i].filter.on_response_body(ctxs[i], chunk, end)
                    )
                except Exception as exc:
                    self._failed(i, exc)
                    info.flag(PLUGIN_ERROR)
                    raise ResponseAborted(f"filter {self.filters[i].name!r} failed") from exc
                if isinstance(result, LocalResponse):
                    if result.flag:
                        info.flag(result.flag)
                    raise ResponseAborted(f"filter {self.filters[i].name!r} answered {result.status}")
                if isinstance(result, bytes):
                    chunk = result
            if chunk:
                yield chunk
            if end:
                return

    async def log(self, ctxs: list[FilterContext], record: dict[str, Any]) -> None:
        """Give every filter the request's access-log record (failures contained and counted)."""
        for i, bound in enumerate(self.filters):
            try:
                await _resolve(bound.filter.on_log(ctxs[i], record))
            except Exception as exc:
                self._failed(i, exc)
