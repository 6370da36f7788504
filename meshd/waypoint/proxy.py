"""The waypoint role's data plane: HBONE in, HTTP/1.1 or HTTP/2 inside each tunnel, out over HBONE.

Per tunnel (`:authority` = a service VIP:port bound to this waypoint):
  * protocol "tcp": L4 authorization (the client's identity against the chosen endpoint's workload),
    then a plain tunnel to the endpoint's node (bytes pumped both ways).
  * protocol "http": requests are parsed (h11, keep-alive; or h2 when the tunnel starts with the
    HTTP/2 preface, see http2.py). Per request, whatever the version (`_pipeline`): L7 authorization (403 if
    denied, the backend never sees it), route match (`meshd_no_route` / 404 NR), the route's filter
    chain, a backend endpoint (subset by workload labels, round robin / least request, outlier
    ejection, circuit breaking -> 503 UO), and the request forwarded as HTTP/1.1 over pooled HBONE to
    the endpoint's node, as the waypoint's own node identity. The response streams back.
  * Hairpin: a destination node may send back a client that dialled a bound workload directly, as its
    node identity with a claim of the client's identity (hairpin.py); an accepted claim makes the
    tunnel the client's, its requests pinned to the workload it dialled.
  * Telemetry: Istio's request metrics (reporter="waypoint"), one access-log line per request, the
    filters' `on_log` and the `meshd_access_log` hook; W3C `traceparent` propagated or created.

Policy scope: a request is authorized against every workload of the destination service (in the
service's namespace); it must be allowed for each. So a policy naming one workload of a service (or
selecting it by label) applies to the whole service at the waypoint: the decision is taken before an
endpoint is chosen, as Istio's waypoint does for a policy that targets the service.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import h11
import pluggy
import trio

from meshd.capture.vip import VipIndex
from meshd.discovery.catalog import Catalog, Endpoint, ServiceEntry, ServicePortEntry, WorkloadEntry
from meshd.hbone.errors import HboneConnectError, PeerIdentityError, TunnelRefused
from meshd.hbone.pool import HbonePool
from meshd.hbone.server import Handler, InboundRequest, ServerReply
from meshd.identity.spiffe import SpiffeId
from meshd.node.pump import pump
from meshd.node.state import NodeState
from meshd.observe.accesslog import (
    FLAG_NO_HEALTHY,
    FLAG_UNAUTHORIZED,
    UNKNOWN_WORKLOAD,
    ConnectionRecord,
    RequestRecord,
    RequestTelemetry,
    WorkloadLabels,
    source_of,
)
from meshd.observe.http import reason
from meshd.plugins.filters import (
    FilterContext,
    HttpRequest,
    HttpResponse,
    LocalResponse,
    RequestBody,
    RequestInfo,
    ResponseAborted,
)
from meshd.policy.evaluate import (
    ConnectionAttrs,
    Decision,
    RequestAttrs,
    authorize_connection,
    authorize_request,
)
from meshd.policy.model import Origin, Route
from meshd.units import Address
from meshd.waypoint.hairpin import SOURCE_HEADER, TARGET_HEADER, HairpinRefused, accept_claim
from meshd.waypoint.http1 import H11Stream, forwardable, headers_from_h11, trace_headers
from meshd.waypoint.http2 import H2Exchange, H2Session, sniff
from meshd.waypoint.router import (
    Backend,
    CircuitBreaker,
    CompiledRoute,
    LeastRequest,
    RoundRobin,
    RouteChoice,
    Router,
    no_route_response,
)
from meshd.waypoint.upstream import BackendState, EndpointKey, UpstreamBodyError, UpstreamPool

log = logging.getLogger("meshd.waypoint")

DRAIN_BODY_LIMIT = 1 << 20  # bytes of an unread request body read and dropped to keep the connection
DRAIN_BODY_TIMEOUT = 5.0
FORBIDDEN_BODY = b"RBAC: access denied\n"


@dataclass(frozen=True)
class Tunnel:
    """One client tunnel to a service bound to this waypoint."""

    source: SpiffeId
    source_address: str  # the client node's IP (policy ip_blocks)
    src: str  # the original client ip:port (forwarded header), for logs
    service: ServiceEntry
    port: ServicePortEntry
    vip: str
    pinned: tuple[str, int] | None = None  # hairpin: the workload ip:port the client dialled, the only target
    source_labels: WorkloadLabels = UNKNOWN_WORKLOAD  # the client as telemetry labels it
    peer: str | None = None  # the node that opened the tunnel, ip:port

    @cached_property
    def upstream_headers(self) -> list[tuple[str, str]]:
        """Headers of the tunnels this client's requests take upstream (informational at the node)."""
        return [("forwarded", f'for="{self.src}"'), ("baggage", f"source.principal={self.source.uri}")]


class Waypoint:
    def __init__(self, state: NodeState, pool: HbonePool, plugins: pluggy.PluginManager | None) -> None:
        self.state = state
        self.plugins = plugins
        self.vips = VipIndex(state.config.capture.vip_range)
        self.upstreams = UpstreamPool(pool, lambda: self.state.node_identity)
        self.hbone = pool
        self.telemetry = RequestTelemetry(state.metrics, access_log=state.config.log.access_log)
        self.fallback: Handler | None = None  # non-CONNECT requests (catalog GET): the node's inbound
        self._router: Router | None = None
        self._backends: dict[tuple[int, int], tuple[CompiledRoute, BackendState]] = {}
        self._defaults: dict[str, CompiledRoute] = {}
        self._tcp_balancers: dict[str, RoundRobin[EndpointKey]] = {}
        self._hook_errors: set[str] = set()
        # Per-request lookups derived from the catalog / the router, cached until either is swapped
        # (both are immutable values, replaced whole on every change).
        self._catalog: Catalog | None = None
        self._endpoints: dict[tuple[str, int, tuple[tuple[str, str], ...]], list[Endpoint]] = {}
        self._service_workloads: dict[str, list[WorkloadEntry | None]] = {}
        self._routed: dict[str, bool] = {}  # service -> does any route of the router name it (or none)?
        self._draining = False
        self._h1: set[_H1Conn] = set()  # open HTTP/1.1 client connections (closed early by a drain)
        self._h2: set[H2Session] = set()

    def drain(self) -> None:
        """Let keep-alive clients go: idle HTTP/1.1 connections close now, busy ones answer their
        request with `connection: close`; HTTP/2 sessions get a GOAWAY and end after their streams.
        Idle upstream connections are closed."""
        self._draining = True
        for c in list(self._h1):
            if c.idle and not c.io.conn.trailing_data[0]:  # not even part of a next request read
                c.scope.cancel()
        for session in list(self._h2):
            session.drain()
        self.upstreams.close_idle()

    # ---- tunnels ---------------------------------------------------------------------------------
    async def handle(self, req: InboundRequest, reply: ServerReply) -> None:
        if not req.is_connect:
            if self.fallback is not None:
                await self.fallback(req, reply)
            else:
                await reply.refuse(400, "HBONE expects CONNECT")
            return
        dest = req.destination
        if dest is None:
            await reply.refuse(400, f"CONNECT authority {req.authority!r} is not ip:port")
            return
        ip, port = dest
        catalog = self.state.catalog
        key = self.vips.table(catalog.services)[0].service(ip)
        svc = catalog.services.get(key) if key is not None else None
        if svc is None:
            await reply.refuse(503, f"{req.authority} is not a service VIP this waypoint knows")
            return
        me = self.state.config.node_name
        if svc.waypoint != me:
            await reply.refuse(503, f"service {svc.key} is not bound to waypoint {me!r}")
            return
        sp = svc.port(port)
        if sp is None:
            await reply.refuse(503, f"service {svc.key} has no port {port}")
            return
        try:
            claim = accept_claim(
                catalog, req.peer_identity, svc, sp, req.header(SOURCE_HEADER), req.header(TARGET_HEADER)
            )
        except HairpinRefused as exc:
            log.warning("refused a hairpin tunnel from %s: %s", req.peer_identity, exc)
            await reply.refuse(401, f"hairpin refused: {exc}")
            return
        # claim: a destination node sent back a client that dialled its workload directly
        source = req.peer_identity if claim is None else claim.source
        tunnel = Tunnel(
            source,
            req.peer_address[0],
            req.client_address,
            svc,
            sp,
            ip,
            None if claim is None else claim.target,
            source_of(catalog, source, req.client_address),
            str(Address(*req.peer_address)),
        )
        if sp.protocol != "http":
            await self._tcp(tunnel, req, reply)
            return
        stream = await reply.accept()
        self.state.track_inflight(1)
        try:
            try:
                is_h2, initial = await sniff(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if is_h2:
                await self._serve_h2(tunnel, stream, initial)
                return
            io = H11Stream(stream, h11.SERVER)
            io.conn.receive_data(initial)  # b"": the client closed before a byte
            await self._serve_http(tunnel, io)
        finally:
            self.state.track_inflight(-1)

    # ---- tcp passthrough (L4 only) -----------------------------------------------------------------
    async def _tcp(self, t: Tunnel, req: InboundRequest, reply: ServerReply) -> None:
        rec = ConnectionRecord(
            reporter="waypoint",
            src=t.src,
            dst=req.authority,
            source_identity=t.source,
            source=t.source_labels,
            destination_service=t.service.key,
            peer=t.peer,
        )
        telemetry = self.state.telemetry
        endpoints = self._pinned(t) if t.pinned else self.state.catalog.endpoints(t.service.key, t.port.port)
        rr = self._tcp_balancers.setdefault(f"{t.service.key}:{t.port.port}", RoundRobin())
        by_key = {ep.key: ep for ep in endpoints}
        key = rr.pick(list(by_key))
        if key is None:
            telemetry.failed(rec, FLAG_NO_HEALTHY, f"no endpoint for {t.service.key}:{t.port.port}")
            await reply.refuse(503, f"no endpoint for {t.service.key}:{t.port.port}")
            return
        ep = by_key[key]
        _describe(rec, ep, self.state.config.trust_domain)
        decision = authorize_connection(self.state.policy, self._conn_attrs(t, ep.workload, ep.target_port))
        if not decision.allowed:
            telemetry.failed(rec, FLAG_UNAUTHORIZED, decision.reason)
            await reply.refuse(401, decision.reason)
            return
        try:
            upstream = await self.hbone.open_tunnel(
                self.state.node_identity,
                ep.identity,
                (ep.dial.host, ep.dial.port),
                ep.authority,
                headers=[("forwarded", f'for="{t.src}"')],
            )
        except (TunnelRefused, HboneConnectError, PeerIdentityError) as exc:
            telemetry.failed(rec, "UF", str(exc))
            await reply.refuse(503, f"upstream {ep.authority}: {exc}")
            return
        async with upstream:
            client = await reply.accept()
            telemetry.opened(rec)
            self.state.track_inflight(1)
            try:
                result = await pump(client, upstream)
            finally:
                self.state.track_inflight(-1)
            telemetry.closed(rec, sent=result.b_to_a, received=result.a_to_b, error=result.error)

    # ---- HTTP/1.1 --------------------------------------------------------------------------------
    async def _serve_http(self, t: Tunnel, io: H11Stream) -> None:
        c = _H1Conn(io)
        self._h1.add(c)
        try:
            with c.scope:  # cancelled by a drain only while idle (see _serve_h1)
                await self._serve_h1(t, c)
        finally:
            self._h1.discard(c)

    async def _serve_h1(self, t: Tunnel, c: _H1Conn) -> None:
        io = c.io
        while True:
            if self._draining and not io.conn.trailing_data[0]:
                return  # draining and idle: close
            c.idle = True
            try:
                event = await io.next_event()
            except h11.RemoteProtocolError as exc:
                await self._bad_request(io, exc)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            c.idle = False
            if c.scope.cancel_called:
                # A drain found it idle just as a request arrived: close without starting it (as a
                # keep-alive connection closed by the server races with a client's next request).
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed (or PAUSED after a close)
            try:
                keep = await self._request(t, io, event)
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
                log.debug("client connection ended: %s", exc)
                return
            if not keep or not io.reusable or self._draining:
                return
            try:
                io.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _bad_request(self, io: H11Stream, exc: h11.RemoteProtocolError) -> None:
        if io.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"bad request: {exc}\n".encode()
        try:
            await io.send(
                h11.Response(
                    status_code=exc.error_status_hint,
                    reason=reason(exc.error_status_hint),
                    headers=[("content-type", "text/plain"), ("content-length", str(len(body)))],
                )
            )
            await io.send(h11.Data(data=body))
            await io.send(h11.EndOfMessage())
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass

    async def _request(self, t: Tunnel, io: H11Stream, event: h11.Request) -> bool:
        """Handle one request; True if the connection may carry the next one."""
        headers = headers_from_h11(event.headers)
        request = HttpRequest(
            event.method.decode("ascii"),
            event.target.decode("latin-1"),
            headers.get("host") or f"{t.vip}:{t.port.port}",
            headers,
        )
        rec = self._record(t, request, f"HTTP/{event.http_version.decode('ascii')}")
        done = await self._pipeline(t, request, rec, self._client_body(io, rec))
        keep = await self._respond(io, done.response, rec, done.info)
        if keep and io.conn.their_state is not h11.DONE:
            keep = await self._discard_body(io)
        await self._finish(rec, done)
        return keep

    def _record(self, t: Tunnel, request: HttpRequest, protocol: str) -> RequestRecord:
        rec = RequestRecord(
            src=t.src,
            method=request.method,
            path=request.path,
            authority=request.authority,
            protocol=protocol,
            source_identity=t.source,
            source=t.source_labels,
            destination_service=t.service.key,
            user_agent=request.headers.get("user-agent"),
        )
        rec.trace_id = trace_headers(request.headers)
        rec.request_id = request.headers.get("x-request-id")
        return rec

    async def _pipeline(
        self, t: Tunnel, request: HttpRequest, rec: RequestRecord, body: AsyncIterator[bytes]
    ) -> _Outcome:
        """The per-request pipeline, whatever the client's HTTP version: L7 authorization, route,
        filter chain, upstream. Returns the response to send (its body still streaming)."""
        info = RequestInfo("", source_principal=t.source.principal, source_address=t.src)
        decision = self._authorize(t, request)
        if not decision.allowed:
            log.info(
                "request denied",
                extra={"reason": decision.reason, "path": request.path, "method": request.method},
            )
            info.flag(FLAG_UNAUTHORIZED)
            rec.error = decision.reason
            return _Outcome(
                LocalResponse(403, body=FORBIDDEN_BODY, flag=FLAG_UNAUTHORIZED).to_response(), info
            )
        choice = self._match(request, t.service.key)
        if choice is None:
            local = await self._no_route(request, t.service.key)
            if local.flag:
                info.flag(local.flag)
            return _Outcome(local.to_response(), info)
        route = choice.route
        chain = route.chain
        info.route = rec.route = route.name
        ctxs = chain.contexts(info)
        request.body = RequestBody(body, chain.buffer_limit)
        send = self._sender(t, choice, rec, info)
        try:
            response = await chain.handle(request, send, info, ctxs)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            raise
        except Exception as exc:  # a bug in the proxy: answer 500, keep serving
            log.exception("waypoint failed on %s %s", request.method, request.path)
            rec.error = repr(exc)
            response = LocalResponse(500, body=b"internal error\n").to_response()
        return _Outcome(response, info, route, ctxs)

    async def _finish(self, rec: RequestRecord, done: _Outcome) -> None:
        """Telemetry once the response went out: metrics, access log, filters' on_log, the hook."""
        rec.response_flags = list(done.info.response_flags)
        rec.attempts = done.info.upstream_attempts
        self.telemetry.access_log = self.state.config.log.access_log
        record = self.telemetry.finished(rec)
        if done.route is not None and done.ctxs is not None:
            await done.route.chain.log(done.ctxs, record)
        await self._access_log_hook(record)

    # ---- HTTP/2 (prior knowledge) ----------------------------------------------------------------
    async def _serve_h2(self, t: Tunnel, stream: trio.abc.Stream, initial: bytes) -> None:
        async def handler(ex: H2Exchange) -> None:
            await self._h2_request(t, ex)

        session = H2Session(stream, handler)
        self._h2.add(session)
        if self._draining:
            session.drain()
        try:
            await session.run(initial)
        finally:
            self._h2.discard(session)

    async def _h2_request(self, t: Tunnel, ex: H2Exchange) -> None:
        head = ex.head
        request = HttpRequest(
            head.method,
            head.path,
            head.authority or f"{t.vip}:{t.port.port}",
            head.headers,
            scheme=head.scheme,
        )
        rec = self._record(t, request, "HTTP/2")

        async def body() -> AsyncIterator[bytes]:
            async for chunk in ex.body():
                rec.request_bytes += len(chunk)
                yield chunk

        done = await self._pipeline(t, request, rec, body())
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
                await self._finish(rec, done)

    async def _client_body(self, io: H11Stream, rec: RequestRecord) -> AsyncIterator[bytes]:
        if io.conn.their_state is h11.DONE:
            return
        if io.conn.they_are_waiting_for_100_continue:
            await io.send(h11.InformationalResponse(status_code=100, headers=[], reason=reason(100)))
        while True:
            event = await io.next_event()
            if isinstance(event, h11.Data):
                rec.request_bytes += len(event.data)
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise trio.BrokenResourceError("client closed the connection mid-body")

    async def _discard_body(self, io: H11Stream) -> bool:
        """Read and drop what is left of the request body, to keep the connection; False: close it."""
        dropped = 0
        with trio.move_on_after(DRAIN_BODY_TIMEOUT):
            while io.conn.their_state is not h11.DONE:
                event = await io.next_event()
                if isinstance(event, h11.Data):
                    dropped += len(event.data)
                    if dropped > DRAIN_BODY_LIMIT:
                        return False
                elif not isinstance(event, h11.EndOfMessage):
                    return False
            return True
        return False

    async def _respond(
        self, io: H11Stream, response: HttpResponse, rec: RequestRecord, info: RequestInfo
    ) -> bool:
        rec.response_code = response.status
        if io.conn.our_state is not h11.SEND_RESPONSE:
            await response.aclose()
            return False
        headers = forwardable(response.headers)
        if self._draining:
            headers.append(("connection", "close"))  # h11 closes the connection after this response
        head = io.conn.send(
            h11.Response(status_code=response.status, headers=headers, reason=reason(response.status))
        )
        if "content-length" not in response.headers:
            await io.stream.send_all(head)  # a stream of unknown length: the client gets headers now
            head = b""
        # With a known length, the headers go out with the first body chunk (one write, one frame).
        try:
            async for chunk in response.body:
                rec.response_bytes += len(chunk)
                await io.stream.send_all(head + io.conn.send(h11.Data(data=chunk)))
                head = b""
        except (ResponseAborted, UpstreamBodyError) as exc:
            rec.error = str(exc)
            if isinstance(exc, UpstreamBodyError):
                info.flag("UR")
            return False  # no EndOfMessage: the client sees the connection end mid-response
        tail = head + io.conn.send(h11.EndOfMessage())
        if tail:
            await io.stream.send_all(tail)
        return True

    # ---- policy, routes, hooks -------------------------------------------------------------------
    def _conn_attrs(self, t: Tunnel, w: WorkloadEntry | None, port: int) -> ConnectionAttrs:
        return ConnectionAttrs(
            source=t.source,
            source_ip=t.source_address,
            destination_ip=w.address if w is not None else t.vip,
            destination_port=port,
            workload_namespace=w.namespace if w is not None else t.service.namespace,
            workload_name=w.name if w is not None else "",
            workload_labels=w.label_map if w is not None else {},
        )

    def _current_catalog(self) -> Catalog:
        catalog = self.state.catalog
        if catalog is not self._catalog:
            self._catalog = catalog
            self._endpoints.clear()
            self._service_workloads.clear()
        return catalog

    def _workloads_of(self, service: str) -> list[WorkloadEntry | None]:
        catalog = self._current_catalog()
        workloads = self._service_workloads.get(service)
        if workloads is None:
            workloads = self._service_workloads[service] = [
                w for w in catalog.workloads if service in w.services
            ] or [None]
        return workloads

    def _endpoints_of(self, backend: Backend, port: int) -> list[Endpoint]:
        """The catalog's endpoints of the backend's service port, in the backend's subset."""
        catalog = self._current_catalog()
        key = (backend.service, port, tuple(backend.subset.items()))
        endpoints = self._endpoints.get(key)
        if endpoints is None:
            endpoints = self._endpoints[key] = [
                ep
                for ep in catalog.endpoints(backend.service, port)
                if backend.selects(ep.workload.label_map)
            ]
        return endpoints

    def _pinned(self, t: Tunnel) -> list[Endpoint]:
        """A hairpinned client's requests go to the workload it dialled, whatever the route's backends:
        the claim that brought them here vouches for that workload only (see hairpin.py)."""
        return [
            ep
            for ep in self.state.catalog.endpoints(t.service.key, t.port.port)
            if (ep.workload.address, ep.target_port) == t.pinned
        ]

    def _authorize(self, t: Tunnel, request: HttpRequest) -> Decision:
        """Allowed only if allowed for every workload of the service (see the module docstring)."""
        workloads = self._workloads_of(t.service.key)
        hdrs: dict[str, str] = {}  # repeated fields joined with ", ", as Headers.get() does
        for k, v in request.headers.items():
            hdrs[k] = f"{hdrs[k]}, {v}" if k in hdrs else v
        decision = Decision(True, None, "no workload")
        for w in workloads:
            attrs = RequestAttrs(
                self._conn_attrs(t, w, t.port.target_port),
                request.method,
                request.path,
                request.authority,
                hdrs,
            )
            decision = authorize_request(self.state.policy, attrs)
            if not decision.allowed:
                return decision
        return decision

    def _match(self, request: HttpRequest, service: str) -> RouteChoice | None:
        router = self.state.policy.router
        if router is not self._router:
            self._router = router
            self._backends.clear()
            self._routed.clear()
        routed = self._routed.get(service)
        if routed is None:
            routed = self._routed[service] = any(r.spec.service in (None, service) for r in router.routes)
        if not routed:
            route = self._defaults.get(service)
            if route is None:
                spec = Route(name=f"default.{service}", service=service)
                route = self._defaults[service] = CompiledRoute.build(spec, Origin("<default>", None), [])
            return RouteChoice(route, route.backends[0])
        return router.match(request, service)

    async def _no_route(self, request: HttpRequest, service: str) -> LocalResponse:
        if self.plugins is not None:
            try:
                answer = self.plugins.hook.meshd_no_route(request=request, service=service)
                if inspect.isawaitable(answer):
                    answer = await answer
                if isinstance(answer, LocalResponse):
                    return answer
            except Exception:
                self._hook_failed("meshd_no_route")
        return no_route_response()

    async def _access_log_hook(self, record: dict[str, Any]) -> None:
        if self.plugins is None:
            return
        try:
            for result in self.plugins.hook.meshd_access_log(record=record):
                if inspect.isawaitable(result):
                    await result
        except Exception:
            self._hook_failed("meshd_access_log")

    def _hook_failed(self, hook: str) -> None:
        if hook not in self._hook_errors:  # logged once per hook, then only counted in the log level
            self._hook_errors.add(hook)
            log.exception("plugin hook %s failed (further failures are not logged)", hook)

    # ---- upstream --------------------------------------------------------------------------------
    def _backend(self, route: CompiledRoute, backend: Backend) -> BackendState:
        index = route.backends.index(backend)
        key = (id(route), index)
        hit = self._backends.get(key)
        if hit is None or hit[0] is not route:
            hit = self._backends[key] = (route, BackendState.for_route(route.spec))
        return hit[1]

    def _sender(self, t: Tunnel, choice: RouteChoice, rec: RequestRecord, info: RequestInfo) -> Any:
        backend = choice.backend
        state = self._backend(choice.route, backend)
        port = backend.port or t.port.port
        td = self.state.config.trust_domain
        tunnel_headers = t.upstream_headers

        async def send(request: HttpRequest) -> HttpResponse:
            ep = state.pick(self._pinned(t) if t.pinned else self._endpoints_of(backend, port))
            if ep is None:
                info.flag(FLAG_NO_HEALTHY)
                return LocalResponse(503, body=b"no healthy upstream\n").to_response()
            if not state.breaker.try_start_request():
                return _overflow(info)
            rec.upstream = ep.authority
            rec.destination = WorkloadLabels.of(ep.workload, td)
            rec.destination_identity = ep.workload.identity(td)
            balancer = state.balancer
            if isinstance(balancer, LeastRequest):
                balancer.started(ep.key)
            try:
                response = await self.upstreams.exchange(ep, request, state.breaker, tunnel_headers)
            except BaseException as exc:
                if not isinstance(exc, trio.Cancelled):
                    state.record(ep, ok=False)
                raise
            finally:
                state.breaker.finish_request()
                if isinstance(balancer, LeastRequest):
                    balancer.finished(ep.key)
            if response is None:
                return _overflow(info)
            state.record(ep, ok=response.status < 500)
            return response

        return send

    def statistics(self) -> dict[str, Any]:
        return {
            "upstream_connections": self.upstreams.statistics(),
            "backends": {
                f"{route.name}/{route.backends[i].service}{_subset(route.backends[i])}": state.breaker.statistics()
                for (_, i), (route, state) in self._backends.items()
            },
        }


@dataclass(eq=False)
class _H1Conn:
    """An HTTP/1.1 client connection as a drain sees it: idle (waiting for a request) or not."""

    io: H11Stream
    idle: bool = True
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass
class _Outcome:
    response: HttpResponse
    info: RequestInfo
    route: CompiledRoute | None = None
    ctxs: list[FilterContext] | None = None


def _overflow(info: RequestInfo) -> HttpResponse:
    local = CircuitBreaker.overflow_response()
    if local.flag:
        info.flag(local.flag)
    return local.to_response()


def _subset(b: Backend) -> str:
    return "" if not b.subset else "{" + ",".join(f"{k}={v}" for k, v in sorted(b.subset.items())) + "}"


def _describe(rec: ConnectionRecord, ep: Endpoint, td: str) -> None:
    rec.destination_identity = ep.workload.identity(td)
    rec.destination = WorkloadLabels.of(ep.workload, td)
