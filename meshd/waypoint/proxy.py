"""The waypoint role's data plane: HBONE in, HTTP/1.1 or HTTP/2 inside each tunnel, out over HBONE.

This module wires the layers and does the tunnel I/O; each layer knows only the one below:

  admission.py   CONNECT -> Tunnel, or Refused (answered once, here, where the reply is written)
  front_http1.py / front_http2.py
                 bytes <-> one request/response model (plugins.filters.HttpRequest / HttpResponse)
  pipeline.py    authorize -> route -> filter chain -> send (pure but for the sender it is given)
  backends.py    endpoint choice, outlier ejection, circuit breaking (meshd/balance.py)
  upstream.py    HTTP/1.1 over pooled HBONE tunnels to the destination nodes

Per tunnel: protocol "tcp" gets L4 authorization and a plain tunnel to an endpoint's node (bytes pumped
both ways); protocol "http" is parsed: HTTP/2 when the tunnel starts with the client preface, else
HTTP/1.1. Telemetry: Istio's request metrics (reporter="waypoint"), one access-log line per request,
the filters' `on_log` and the `meshd_access_log` hook; W3C `traceparent` propagated or created.
"""

from __future__ import annotations

import logging
from typing import Any

import pluggy
import trio

from meshd.dataplane.proxied import Refused, proxied
from meshd.dataplane.state import NodeState
from meshd.discovery.vip import VipIndex
from meshd.hbone.errors import HboneConnectError, PeerIdentityError, TunnelRefused
from meshd.hbone.pool import HbonePool
from meshd.hbone.server import Handler, InboundRequest, ServerReply
from meshd.observe import dry_run
from meshd.observe.accesslog import (
    FLAG_NO_HEALTHY,
    FLAG_UNAUTHORIZED,
    ConnectionRecord,
    RequestTelemetry,
    WorkloadLabels,
)
from meshd.observe.tracecontext import trace_header
from meshd.policy.evaluate import authorize_connection
from meshd.waypoint.admission import Tunnel, admit
from meshd.waypoint.backends import Backends
from meshd.waypoint.front_http1 import H1Connection
from meshd.waypoint.front_http2 import H2Front
from meshd.waypoint.http2 import H2Session, sniff
from meshd.waypoint.pipeline import Pipeline
from meshd.waypoint.upstream import UpstreamPool

log = logging.getLogger("meshd.waypoint")

HTTP_PROTOCOLS = frozenset({"http", "http2", "grpc"})


class Waypoint:
    def __init__(self, state: NodeState, pool: HbonePool, plugins: pluggy.PluginManager | None) -> None:
        self.state = state
        self.vips = VipIndex(state.config.capture.vip_range)
        self.upstreams = UpstreamPool(pool, lambda: self.state.node_identity)
        self.hbone = pool
        self.backends = Backends(
            self.upstreams,
            lambda: self.state.catalog,
            lambda: self.state.config.trust_domain,
            state.tracer,
        )
        self.pipeline = Pipeline(
            lambda: self.state.policy,
            lambda: self.state.catalog,
            self.backends,
            RequestTelemetry(state.metrics, access_log=state.config.log.access_log, tracer=state.tracer),
            plugins,
            state.tracer,
        )
        self.fallback: Handler | None = None  # non-CONNECT requests (catalog GET): the node's inbound
        self._draining = False
        self._h1: set[H1Connection] = set()  # open HTTP/1.1 client connections (closed early by a drain)
        self._h2: set[H2Session] = set()

    def _is_draining(self) -> bool:
        return self._draining

    def _access_log(self) -> bool:
        return self.state.config.log.access_log

    def drain(self) -> None:
        """Let keep-alive clients go: idle HTTP/1.1 connections close now, busy ones answer their
        request with `connection: close`; HTTP/2 sessions get a GOAWAY and end after their streams.
        Idle upstream connections are closed."""
        self._draining = True
        for c in list(self._h1):
            if c.idle and not c.pending and not c.events:  # not even part of a next request read
                c.scope.cancel()
        for session in list(self._h2):
            session.drain()
        self.upstreams.close_idle()

    async def handle(self, req: InboundRequest, reply: ServerReply) -> None:
        if not req.is_connect or req.is_udp:  # UDP flows go to workloads, never through a waypoint
            if self.fallback is not None:
                await self.fallback(req, reply)
            else:
                await reply.refuse(400, "HBONE expects CONNECT")
            return
        tunnel: Tunnel | None = None
        try:
            tunnel = admit(req, self.state.catalog, self.vips, self.state.config.node_name)
            if tunnel.port.protocol not in HTTP_PROTOCOLS:
                await self._tcp(tunnel, req, reply)
                return
        except Refused as refused:  # the one place a refusal is answered
            if tunnel is None and refused.status == 401:  # admission's only 401: a hairpin claim
                log.warning("refused a hairpin tunnel from %s: %s", req.peer_identity, refused.reason)
            await reply.refuse(refused.status, refused.reason)
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
            else:
                await self._serve_h1(tunnel, stream, initial)
        finally:
            self.state.track_inflight(-1)

    async def _serve_h1(self, t: Tunnel, stream: trio.abc.Stream, initial: bytes) -> None:
        c = H1Connection(stream, initial, t, self.pipeline, self._is_draining, self._access_log)
        self._h1.add(c)
        try:
            await c.serve()
        finally:
            self._h1.discard(c)

    async def _serve_h2(self, t: Tunnel, stream: trio.abc.Stream, initial: bytes) -> None:
        session = H2Session(stream, H2Front(t, self.pipeline, self._access_log))
        self._h2.add(session)
        if self._draining:
            session.drain()
        try:
            await session.run(initial)
        finally:
            self._h2.discard(session)

    # ---- tcp passthrough (L4 only) -----------------------------------------------------------------
    async def _tcp(self, t: Tunnel, req: InboundRequest, reply: ServerReply) -> None:
        """Raises Refused before the tunnel is accepted (telemetry counted here)."""
        rec = ConnectionRecord(
            reporter="waypoint",
            src=t.src,
            dst=req.authority,
            source_identity=t.source,
            source=t.source_labels,
            destination_service=t.service.key,
            peer=t.peer,
        )
        tracer = self.state.tracer
        if tracer.connection_spans:
            rec.trace = tracer.start(t.trace_parent)
        telemetry = self.state.telemetry
        ep = self.backends.pick_tcp(t)
        if ep is None:
            reason = f"no endpoint for {t.service.key}:{t.port.port}"
            telemetry.failed(rec, FLAG_NO_HEALTHY, reason)
            raise Refused(503, FLAG_NO_HEALTHY, reason)
        w = ep.workload
        td = self.state.config.trust_domain
        rec.destination_identity = w.identity(td)
        rec.destination = WorkloadLabels.of(w, td)
        decision = authorize_connection(self.state.policy, t.connection_attrs(w, ep.target_port))
        rec.dry_run = dry_run.record(telemetry.metrics, decision)
        if not decision.allowed:
            telemetry.failed(rec, FLAG_UNAUTHORIZED, decision.reason)
            raise Refused(401, FLAG_UNAUTHORIZED, decision.reason)
        try:
            upstream = await self.hbone.open_tunnel(
                self.state.node_identity,
                ep.identity,
                (ep.dial.host, ep.dial.port),
                ep.authority,
                headers=[("forwarded", f'for="{t.src}"'), *trace_header(rec.trace)],
            )
        except (TunnelRefused, HboneConnectError, PeerIdentityError) as exc:
            telemetry.failed(rec, "UF", str(exc))
            raise Refused(503, "UF", f"upstream {ep.authority}: {exc}") from None
        async with upstream:
            await proxied(self.state, rec, await reply.accept(), upstream)

    def statistics(self) -> dict[str, Any]:
        return {"upstream_connections": self.upstreams.statistics(), "backends": self.backends.statistics()}
