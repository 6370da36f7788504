"""`HboneServer`: the HBONE listener (port 15008): mTLS handshake, peer identity, requests to a handler.

Must never know: authorization, upstreams, the catalog's content. It authenticates (certificate from
our CA, SPIFFE ID in our trust domain, TLS 1.3 + h2) and hands every request to `handler(req, reply)`,
which decides everything else.

A bad client (no certificate, another CA, another trust domain, plaintext, HTTP/1.1, a stalled
handshake) costs one log line and its socket, never the server. Each handler runs in a nursery owned by
its connection: it is cancelled if the connection breaks, and not if the server drains.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

import trio

from meshd.hbone import events as ev
from meshd.hbone._link import HboneLink
from meshd.hbone.bridge import socket_over
from meshd.hbone.connection import (
    INTERNAL_ERROR,
    HboneConnection,
    HboneSettings,
    Role,
    parse_authority,
    parse_forwarded_for,
    parse_udp_path,
)
from meshd.hbone.errors import LocalProtocolError, PeerIdentityError
from meshd.hbone.stream import TunnelStream
from meshd.hbone.target import ConnectTarget, SocketTarget
from meshd.hbone.tls import ALPN, check_cipher, peer_identity, require_trust_domain
from meshd.hbone.wire import Wire
from meshd.identity.spiffe import SpiffeId
from meshd.listeners import open_listeners, per_connection
from meshd.units import Address

log = logging.getLogger("meshd.hbone.server")


@dataclass(frozen=True, slots=True)
class InboundRequest:
    """A request that arrived over an authenticated HBONE connection."""

    method: str
    authority: str
    path: str | None
    headers: tuple[tuple[str, str], ...]
    peer_identity: SpiffeId
    peer_address: tuple[str, int]
    stream_id: int = 0
    protocol: str | None = None  # extended CONNECT's :protocol ("connect-udp"); None for a TCP tunnel
    target: ConnectTarget | None = None  # a TCP CONNECT's parsed :authority (meshd/hbone/target.py)

    @property
    def is_connect(self) -> bool:
        return self.method == "CONNECT"

    @property
    def is_udp(self) -> bool:
        """A connect-udp stream (RFC 9298): its DATA is capsules carrying UDP payloads."""
        return self.method == "CONNECT" and self.protocol == "connect-udp"

    @property
    def destination(self) -> tuple[str, int] | None:
        """The CONNECT target (ip, port): the authority of a TCP tunnel, the `:path` template of a
        connect-udp one; None if it is not an IP and port (a service hostname: see `target`)."""
        if self.is_udp:
            return parse_udp_path(self.path)
        if isinstance(self.target, SocketTarget):
            return self.target.host, self.target.port
        return parse_authority(self.authority) if self.target is None else None

    @property
    def client_address(self) -> str:
        """The original client's ip:port: the `forwarded` header's `for=` when a proxy sent one, else
        the peer's address. Informational (logs, telemetry): never used for policy."""
        forwarded = parse_forwarded_for(self.header("forwarded"))
        return forwarded or f"{self.peer_address[0]}:{self.peer_address[1]}"

    def header(self, name: str) -> str | None:
        """First value of a header (names are lowercase in HTTP/2)."""
        name = name.lower()
        for n, v in self.headers:
            if n == name:
                return v
        return None


class ServerReply:
    """The one answer a handler gives to its request: accept, refuse, or respond."""

    def __init__(self, link: HboneLink, stream_id: int) -> None:
        self._link = link
        self._stream_id = stream_id
        self.status: int | None = None  # the status sent, once replied
        self._stream: TunnelStream | None = None

    @property
    def replied(self) -> bool:
        return self.status is not None

    def _start(self, status: int) -> None:
        if self.status is not None:
            raise LocalProtocolError(f"already replied with {self.status}")
        if self._link.broken or not self._link.conn.can_send(self._stream_id):
            raise trio.BrokenResourceError(self._link.failure or "the client went away")
        self.status = status

    async def accept(self, headers: Sequence[tuple[str, str]] = ()) -> TunnelStream:
        """200: the tunnel is open. The returned stream is closed for you when the handler returns."""
        self._start(200)
        self._link.conn.accept(self._stream_id, headers)
        self._link.send_pending()
        self._stream = TunnelStream(self._link, self._stream_id)
        await trio.lowlevel.checkpoint()
        return self._stream

    async def refuse(self, status: int, reason: str = "") -> None:
        """400 (bad request), 401 (denied by policy), 503 (no upstream), ...; `reason` goes in the body."""
        self._start(status)
        self._link.conn.refuse(self._stream_id, status, reason)
        self._link.send_pending()
        await trio.lowlevel.checkpoint()

    async def respond(self, status: int, headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> None:
        """A complete response with a body (the catalog GET), sent under flow control."""
        self._start(status)
        hdrs = [*headers, ("content-length", str(len(body)))]
        self._link.conn.send_response(self._stream_id, status, hdrs, end_stream=not body)
        self._link.send_pending()
        self._stream = TunnelStream(self._link, self._stream_id)
        if body:
            await self._stream.send_all(body)
            await self._stream.send_eof()
        await trio.lowlevel.checkpoint()

    def _finish(self, failed: bool) -> None:
        conn, sid = self._link.conn, self._stream_id
        if self._link.slot(sid) is None:
            return
        if self.status is None and conn.can_send(sid) and not self._link.broken:
            conn.refuse(sid, 500 if failed else 503, "handler failed" if failed else "no answer from handler")
        elif failed:
            conn.reset_stream(sid, INTERNAL_ERROR)
        if self._stream is not None:
            self._stream.close_nowait()
        else:
            self._link.release(sid)


Handler = Callable[[InboundRequest, ServerReply], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    connections: int
    streams: int
    refused_connections: int  # TLS / identity refusals since start
    draining: bool


class HboneServer:
    def __init__(
        self,
        context_provider: Callable[[str], ssl.SSLContext],
        trust_domain: str,
        handler: Handler,
        *,
        handshake_timeout: float = 10.0,
        settings: HboneSettings | None = None,
        ping_interval: float | None = 10.0,
        ping_timeout: float = 20.0,
    ) -> None:
        # The provider gets the local IP the client dialled: like ztunnel, the server can present
        # the certificate of the workload behind that address.
        self._context_provider = context_provider
        self._trust_domain = trust_domain
        self._handler = handler
        self._handshake_timeout = handshake_timeout
        self._settings = settings or HboneSettings()
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._links: set[HboneLink] = set()
        self._accept_scope: trio.CancelScope | None = None
        self._draining = False
        self._refused = 0

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            connections=len(self._links),
            streams=sum(link.stream_count for link in self._links),
            refused_connections=self._refused,
            draining=self._draining,
        )

    async def serve(
        self,
        host: str,
        port: int,
        *,
        key: str = "listen.hbone",
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on host:port (0 = any free port) and serve until cancelled, or until drained and every
        connection has finished. Reports the bound (host, port) through task_status."""
        listeners = await open_listeners(key, Address(host, port))
        sockname = listeners[0].socket.getsockname()
        bound = (str(sockname[0]), int(sockname[1]))
        async with trio.open_nursery() as connections:
            with trio.CancelScope() as self._accept_scope:
                if self._draining:
                    self._accept_scope.cancel()
                async with trio.open_nursery() as accepting:
                    await accepting.start(
                        partial(
                            trio.serve_listeners,
                            per_connection(self._serve_tcp, "HBONE"),
                            listeners,
                            handler_nursery=connections,
                        )
                    )
                    log.info("HBONE listening on %s:%d", *bound)
                    task_status.started(bound)
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    def drain(self) -> None:
        """Stop accepting; GOAWAY every connection; in-flight streams continue. `serve()` returns once
        the last connection has finished (bound it with a deadline at the call site)."""
        self._draining = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        for link in list(self._links):
            link.drain()

    async def serve_stream(
        self, stream: trio.abc.HalfCloseableStream, peer_identity: SpiffeId, peer_address: tuple[str, int]
    ) -> None:
        """Serve HBONE requests arriving inside `stream`, a tunnel already mutually authenticated as
        `peer_identity` (no TLS of its own): the gateway's reverse connection, on the side that
        dialled out. Returns when the connection ends; drained with the others."""
        async with trio.open_nursery() as nursery:
            link = HboneLink(
                Wire(socket_over(stream, nursery)),
                HboneConnection(Role.SERVER, self._settings),
                peer_identity=peer_identity,
                peer_address=peer_address,
                on_request=self._on_request,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_timeout,
            )
            self._links.add(link)
            if self._draining:
                link.drain()
            try:
                await link.run()
            finally:
                self._links.discard(link)
                nursery.cancel_scope.cancel()

    async def _serve_tcp(self, tcp: trio.SocketStream) -> None:
        try:
            peer = tcp.socket.getpeername()
            peer_address = (str(peer[0]), int(peer[1]))
        except OSError:
            await trio.aclose_forcefully(tcp)
            return
        try:
            link = await self._authenticate(tcp, peer_address)
        except Exception:  # a bug here must not stop the listener
            log.exception("unexpected error setting up HBONE connection from %s", peer_address)
            await trio.aclose_forcefully(tcp)
            return
        if link is None:
            return
        self._links.add(link)
        if self._draining:
            link.drain()
        try:
            await link.run()
        finally:
            self._links.discard(link)

    async def _authenticate(self, tcp: trio.SocketStream, peer_address: tuple[str, int]) -> HboneLink | None:
        tls: Wire | None = None
        try:
            context = self._context_for(tcp)
            with trio.fail_after(self._handshake_timeout):
                tls = await Wire.handshake(tcp, context, server_side=True)
            if tls.selected_alpn_protocol() != ALPN:
                raise PeerIdentityError("client did not negotiate ALPN h2")
            check_cipher(tls.cipher())
            identity = peer_identity(tls)
            require_trust_domain(identity, self._trust_domain)
        except (trio.BrokenResourceError, trio.TooSlowError, PeerIdentityError, ssl.SSLError, OSError) as e:
            self._refused += 1
            reason = "handshake timed out" if isinstance(e, trio.TooSlowError) else _reason(e)
            log.info("refused HBONE connection from %s:%d: %s", *peer_address, reason)
            if tls is not None:
                tls.close()
            elif tcp.socket.fileno() != -1:  # Wire.handshake takes the socket over (and closes it)
                await trio.aclose_forcefully(tcp)
            return None
        return HboneLink(
            tls,
            HboneConnection(Role.SERVER, self._settings),
            peer_identity=identity,
            peer_address=peer_address,
            on_request=self._on_request,
            ping_interval=self._ping_interval,
            ping_timeout=self._ping_timeout,
        )

    def _context_for(self, tcp: trio.SocketStream) -> ssl.SSLContext:
        return self._context_provider(str(tcp.socket.getsockname()[0]))

    def _on_request(
        self, link: HboneLink, event: ev.TunnelRequested | ev.UdpTunnelRequested | ev.RequestReceived
    ) -> None:
        protocol: str | None = None
        target: ConnectTarget | None = None
        if isinstance(event, ev.TunnelRequested):
            method, path, target = "CONNECT", None, event.target
        elif isinstance(event, ev.UdpTunnelRequested):
            method, path, protocol = "CONNECT", event.path, "connect-udp"
        else:
            method, path = event.method, event.path
        req = InboundRequest(
            method=method,
            authority=event.authority,
            path=path,
            headers=event.headers,
            peer_identity=link.peer_identity,
            peer_address=link.peer_address,
            stream_id=event.stream_id,
            protocol=protocol,
            target=target,
        )
        link.spawn(self._run_handler, link, req)

    async def _run_handler(self, link: HboneLink, req: InboundRequest) -> None:
        reply = ServerReply(link, req.stream_id)
        failed = False
        try:
            await self._handler(req, reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.debug("stream %d from %s ended: %s", req.stream_id, req.peer_identity, e)
        except Exception:
            failed = True
            log.exception(
                "HBONE handler failed for %s %s from %s", req.method, req.authority, req.peer_identity
            )
        finally:
            reply._finish(failed)


def _reason(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    return str(e) or e.__class__.__name__
