"""`HbonePool`: outbound HBONE connections, pooled per (source identity, destination identity, address).

Must never know: the catalog, policy, what the tunnels carry. Callers name both identities and the
address; the pool guarantees the peer *is* that destination identity.

Invariants:
- A connection is used only by the key it was opened for: a source's certificate is never reused
  for another source, and a destination identity is verified once per connection, at its handshake.
- New streams go to a connection that is healthy, has seen no GOAWAY and has a free stream (below
  both `max_streams_per_connection` and the peer's MAX_CONCURRENT_STREAMS); otherwise a new one opens.
- Connection set-up (TCP + TLS) runs in the caller's task under `connect_timeout`; once up, a connection
  lives in the pool's nursery (`run()`), so it outlives the caller that opened it.
- A connection idle for `idle_timeout` is closed; PING every `ping_interval`, dead after `ping_timeout`.
- A stream refused because of a GOAWAY race (REFUSED_STREAM) is retried once on a fresh connection.
"""

from __future__ import annotations

import errno
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from meshd.hbone._link import HboneLink
from meshd.hbone.bridge import socket_over
from meshd.hbone.connection import REFUSED_STREAM, HboneConnection, HboneSettings, Role
from meshd.hbone.errors import HboneConnectError, PeerIdentityError, TunnelRefused
from meshd.hbone.stream import TunnelStream
from meshd.hbone.tls import ALPN, check_cipher, peer_identity, require_identity, require_one_of
from meshd.hbone.wire import Wire
from meshd.identity.spiffe import SpiffeId
from meshd.units import Address

__all__ = [
    "HboneConnectError",
    "HbonePool",
    "PeerIdentityError",
    "PoolKey",
    "PoolStatistics",
    "TunnelRefused",
]

log = logging.getLogger("meshd.hbone.pool")

MAX_REASON = 4096  # bytes of a refusal body kept as the reason
MAX_GET_BODY = 64 * 1024 * 1024
# A reply that has not come after PROBE_AFTER seconds makes the pool PING the connection; no answer
# within PROBE_TIMEOUT fails it (and a first attempt is retried on a new connection). Without this, a
# CONNECT on a pooled connection that died silently (a partition) waited for the keep-alive PING's
# timeout. A slow but live peer (a workload slow to accept) answers the PING and is waited for.
PROBE_AFTER = 2.0
PROBE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class PoolKey:
    source: SpiffeId
    destination: SpiffeId
    address: tuple[str, int]


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    connections: int
    streams: int
    keys: int
    connects: int  # connections opened since start


_STUCK = (
    f"no reply to a request nor to a PING within {PROBE_AFTER + PROBE_TIMEOUT:g} s: peer or network is stuck"
)


class _Retry(Exception):
    """The stream was refused before the peer processed it (GOAWAY race): try a new connection."""


class HbonePool:
    def __init__(
        self,
        context_provider: Callable[[SpiffeId], ssl.SSLContext],
        *,
        max_streams_per_connection: int = 100,
        idle_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        ping_interval: float | None = 10.0,
        ping_timeout: float = 20.0,
        settings: HboneSettings | None = None,
    ) -> None:
        if max_streams_per_connection < 1:
            raise ValueError("max_streams_per_connection must be at least 1")
        self._context_provider = context_provider
        self._max_streams = max_streams_per_connection
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._settings = settings or HboneSettings()
        self._links: dict[PoolKey, list[HboneLink]] = {}
        self._locks: dict[PoolKey, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self._connects = 0

    def statistics(self) -> PoolStatistics:
        links = [link for group in self._links.values() for link in group]
        return PoolStatistics(
            connections=len(links),
            streams=sum(link.stream_count for link in links),
            keys=sum(1 for group in self._links.values() if group),
            connects=self._connects,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the pool's connections until cancelled (they are closed then)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def drain(self) -> None:
        """GOAWAY every pooled connection; open tunnels finish, new ones get new connections."""
        for group in self._links.values():
            for link in group:
                link.drain()

    # ---- public operations ---------------------------------------------------------------------------

    async def open_tunnel(
        self,
        source: SpiffeId,
        destination: SpiffeId,
        address: tuple[str, int],
        authority: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> TunnelStream:
        """CONNECT to `authority` through the HBONE endpoint at `address`, which must present
        `destination`'s certificate. Raises TunnelRefused (non-200), HboneConnectError, PeerIdentityError."""
        key = PoolKey(source, destination, (address[0], int(address[1])))
        return await self._tunnel(key, lambda c: c.open_tunnel(authority, headers=headers), extended=False)

    async def open_udp_tunnel(
        self,
        source: SpiffeId,
        destination: SpiffeId,
        address: tuple[str, int],
        target: tuple[str, int],
        headers: Sequence[tuple[str, str]] = (),
    ) -> TunnelStream:
        """A connect-udp stream (RFC 9298) to the UDP `target` (ip, port) through the HBONE endpoint at
        `address`, on the same pooled connections as TCP tunnels. The returned stream carries capsules
        (meshd.hbone.capsule). Raises as `open_tunnel`; HboneConnectError if the peer does not enable
        extended CONNECT."""
        key = PoolKey(source, destination, (address[0], int(address[1])))
        return await self._tunnel(
            key, lambda c: c.open_udp_tunnel(target[0], target[1], headers=headers), extended=True
        )

    async def _tunnel(
        self, key: PoolKey, open_stream: Callable[[HboneConnection], int], *, extended: bool
    ) -> TunnelStream:
        """Open a CONNECT stream with `open_stream` and wait for its answer: the tunnel on 2xx, else
        TunnelRefused with the peer's reason. A connection that went away before answering (GOAWAY
        past our stream) is retried once on a fresh one."""
        for attempt in range(2):
            link, sid = await self._open_stream(key, open_stream, extended=extended)
            try:
                return await self._tunnel_answer(link, sid, retryable=attempt == 0)
            except _Retry:
                continue
            except BaseException:
                link.release(sid)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def get(
        self, source: SpiffeId, destination: SpiffeId, address: tuple[str, int], path: str
    ) -> tuple[int, tuple[tuple[str, str], ...], bytes]:
        """An HTTP/2 GET over the pooled connection (the catalog endpoint): (status, headers, body)."""
        key = PoolKey(source, destination, (address[0], int(address[1])))
        authority = str(Address(*key.address))
        for attempt in range(2):
            link, sid = await self._open_stream(key, lambda c: c.send_request("GET", authority, path))
            try:
                status = await self._wait_response(link, sid, retryable=attempt == 0)
                slot = link.slot(sid)
                assert slot is not None and slot.response is not None
                headers = slot.response.headers
                body = await self._read_body(link, sid, MAX_GET_BODY, strict=True)
                return status, headers, body
            except _Retry:
                continue
            finally:
                link.release(sid)
        raise AssertionError("unreachable")  # pragma: no cover

    async def open_nested_tunnel(
        self,
        outer: TunnelStream,
        source: SpiffeId,
        destination: SpiffeId | frozenset[SpiffeId],
        authority: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        peer_address: tuple[str, int],
    ) -> TunnelStream:
        """Double HBONE: an inner HBONE connection (TLS as `source`, the peer must be `destination`, or
        one of them when the gateway picks the endpoint of a service hostname)
        run inside the already open `outer` tunnel, and one CONNECT to `authority` on it. The inner
        connection is not pooled (one per tunnel, as ztunnel does: the hop in the middle may reach a
        different node each time) and closes `NESTED_GRACE` seconds after its stream is released; the outer tunnel is
        closed with it. `peer_address` is where the inner endpoint is (for logs and errors).

        The TLS code runs on sockets, so the outer tunnel is spliced to one end of a socketpair and
        the inner connection runs on the other: the same `Wire` and `HboneLink` as every connection,
        at the cost of one local copy each way (docs/hbone.md, "Double HBONE")."""
        if self._nursery is None:
            raise RuntimeError("HbonePool.run() is not running")
        inner_tcp = trio.SocketStream(trio.socket.from_stdlib_socket(socket_over(outer, self._nursery)))
        tls, identity = await self._handshake(source, peer_address, None, expected=destination, tcp=inner_tcp)
        link = self._new_link(tls, identity, peer_address, idle_timeout=NESTED_GRACE)
        await self._nursery.start(link.run)
        try:
            sid = link.conn.open_tunnel(authority, headers=headers)
            link.add_slot(sid)
            link.send_pending()
        except BaseException:
            link.close()
            raise
        try:
            return await self._tunnel_answer(link, sid, retryable=False)
        except BaseException:
            link.release(sid)
            link.close()
            raise

    async def _tunnel_answer(self, link: HboneLink, sid: int, *, retryable: bool) -> TunnelStream:
        """The peer's answer to a CONNECT: the tunnel on 2xx, else TunnelRefused with its reason."""
        status = await self._wait_response(link, sid, retryable=retryable)
        if 200 <= status < 300:
            return TunnelStream(link, sid)
        reason = (await self._read_body(link, sid, MAX_REASON)).decode("utf-8", "replace")
        raise TunnelRefused(status, reason)

    def client_link_over(
        self, stream: trio.abc.HalfCloseableStream, peer_identity: SpiffeId, peer_address: tuple[str, int]
    ) -> HboneLink:
        """A client HBONE connection without TLS of its own, inside `stream` (already mutually
        authenticated as `peer_identity`): the gateway's reverse connection, on the side that opens
        tunnels on it. The caller runs it (`link.run`) and uses `open_tunnel_on` / `get_on`."""
        if self._nursery is None:
            raise RuntimeError("HbonePool.run() is not running")
        return self._new_link(
            Wire(socket_over(stream, self._nursery)),
            peer_identity,
            peer_address,
            idle_timeout=None,
        )

    async def open_tunnel_on(
        self, link: HboneLink, authority: str, headers: Sequence[tuple[str, str]] = ()
    ) -> TunnelStream:
        """CONNECT on a link the caller holds (not pooled). Raises TunnelRefused, HboneConnectError."""
        if not link.usable:
            raise HboneConnectError(_explain_failure(link))
        sid = link.conn.open_tunnel(authority, headers=headers)
        link.add_slot(sid)
        link.send_pending()
        try:
            return await self._tunnel_answer(link, sid, retryable=False)
        except BaseException:
            link.release(sid)
            raise

    async def get_on(self, link: HboneLink, path: str) -> tuple[int, bytes]:
        """A GET on a link the caller holds: (status, body)."""
        if not link.usable:
            raise HboneConnectError(_explain_failure(link))
        sid = link.conn.send_request("GET", str(Address(*link.peer_address)), path)
        link.add_slot(sid)
        link.send_pending()
        try:
            status = await self._wait_response(link, sid, retryable=False)
            return status, await self._read_body(link, sid, MAX_GET_BODY, strict=True)
        finally:
            link.release(sid)

    # ---- internals -----------------------------------------------------------------------------------

    async def _open_stream(
        self, key: PoolKey, opener: Callable[[HboneConnection], int], *, extended: bool = False
    ) -> tuple[HboneLink, int]:
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            link = self._pick(key)
            if link is None:
                link = await self._connect(key)
                self._links.setdefault(key, []).append(link)
            if extended and link.conn.peer_enables_connect_protocol is None:
                # RFC 8441: no extended CONNECT before the peer's SETTINGS allow it. Only a brand-new
                # connection waits (its SETTINGS come with the server's first flight).
                with trio.move_on_after(self._connect_timeout):
                    await link.wait_peer_settings()
                if not (link.usable and link.conn.available_streams > 0):
                    link = await self._connect(key)
                    self._links.setdefault(key, []).append(link)
                    with trio.move_on_after(self._connect_timeout):
                        await link.wait_peer_settings()
            if extended and not link.conn.peer_enables_connect_protocol:
                raise HboneConnectError(
                    f"{_peer(link)} does not enable extended CONNECT (SETTINGS_ENABLE_CONNECT_PROTOCOL): "
                    "it cannot carry UDP (connect-udp); is it a meshd without UDP support, or ztunnel?"
                )
            # No checkpoint between picking and opening: the free stream cannot be taken meanwhile.
            sid = opener(link.conn)
            link.add_slot(sid)
            link.send_pending()
        return link, sid

    def _pick(self, key: PoolKey) -> HboneLink | None:
        for link in self._links.get(key, ()):
            if link.usable and link.stream_count < self._max_streams and link.conn.available_streams > 0:
                return link
        return None

    async def _wait_response(self, link: HboneLink, sid: int, *, retryable: bool) -> int:
        slot = link.slot(sid)
        assert slot is not None
        while slot.response is None:
            if slot.reset_code is not None:
                if slot.reset_code == REFUSED_STREAM and retryable:
                    link.release(sid)
                    raise _Retry
                raise HboneConnectError(
                    f"{_peer(link)} reset the stream before answering (HTTP/2 error {slot.reset_code})"
                )
            if link.broken or link.slot(sid) is None:
                if retryable and link.failure == _STUCK:
                    link.release(sid)
                    raise _Retry
                raise HboneConnectError(_explain_failure(link))
            with trio.move_on_after(PROBE_AFTER) as waited:
                await slot.readable.wait()
            stuck = waited.cancelled_caught and slot.response is None and not link.broken
            if stuck and not await link.probe(PROBE_TIMEOUT):
                link.fail(_STUCK)
        return slot.response.status

    async def _read_body(self, link: HboneLink, sid: int, limit: int, *, strict: bool = False) -> bytes:
        slot = link.slot(sid)
        assert slot is not None
        body = bytearray()
        while True:
            while slot.chunks:
                chunk = slot.chunks.popleft()
                link.conn.acknowledge(sid, len(chunk))
                body += chunk
                if len(body) > limit:
                    if strict:
                        raise HboneConnectError(f"response from {_peer(link)} is larger than {limit} bytes")
                    return bytes(body[:limit])
            link.send_pending()
            if slot.remote_ended or slot.reset_code is not None:
                return bytes(body)
            if link.broken:
                if strict:
                    raise HboneConnectError(_explain_failure(link))
                return bytes(body)
            await slot.readable.wait()

    async def get_control(
        self,
        source: SpiffeId,
        address: tuple[str, int],
        path: str,
        *,
        server_hostname: str | None = None,
        max_body: int = MAX_GET_BODY,
    ) -> tuple[int, tuple[tuple[str, str], ...], bytes, SpiffeId]:
        """A GET on a one-off connection to a peer whose identity is not known yet (catalog fetch from
        a discovered node): (status, headers, body, the peer's identity). The peer must be in
        `source`'s trust domain; the caller decides whether that identity may answer.
        `server_hostname` is sent as SNI (tunnels never send SNI; a control name lets the peer pick
        its node certificate). A body over `max_body` bytes fails the request as soon as it is seen."""
        if self._nursery is None:
            raise RuntimeError("HbonePool.run() is not running")
        addr = (address[0], int(address[1]))
        tls, identity = await self._handshake(source, addr, server_hostname, expected=None)
        link = self._new_link(tls, identity, addr, idle_timeout=None)
        await self._nursery.start(link.run)
        try:
            sid = link.conn.send_request("GET", str(Address(*addr)), path)
            link.add_slot(sid)
            link.send_pending()
            status = await self._wait_response(link, sid, retryable=False)
            slot = link.slot(sid)
            assert slot is not None and slot.response is not None
            headers = slot.response.headers
            body = await self._read_body(link, sid, max_body, strict=True)
        finally:
            link.close()
        return status, headers, body, identity

    async def _connect(self, key: PoolKey) -> HboneLink:
        if self._nursery is None:
            raise RuntimeError("HbonePool.run() is not running")
        tls, identity = await self._handshake(key.source, key.address, None, expected=key.destination)
        self._connects += 1
        link = self._new_link(tls, identity, key.address, idle_timeout=self._idle_timeout)
        await self._nursery.start(self._run_link, key, link)
        return link

    def _new_link(
        self,
        tls: Wire,
        identity: SpiffeId,
        address: tuple[str, int],
        *,
        idle_timeout: float | None,
    ) -> HboneLink:
        return HboneLink(
            tls,
            HboneConnection(Role.CLIENT, self._settings),
            peer_identity=identity,
            peer_address=address,
            ping_interval=self._ping_interval,
            ping_timeout=self._ping_timeout,
            idle_timeout=idle_timeout,
        )

    async def _handshake(
        self,
        source: SpiffeId,
        address: tuple[str, int],
        server_hostname: str | None,
        *,
        expected: SpiffeId | frozenset[SpiffeId] | None,
        tcp: trio.SocketStream | None = None,
    ) -> tuple[Wire, SpiffeId]:
        """TCP (unless `tcp` is given: an already connected stream) + TLS under connect_timeout;
        checks ALPN, cipher and the server's identity (exactly `expected`, or else any identity in
        `source`'s trust domain)."""
        host, port = address
        where = str(Address(host, port))
        tls: Wire | None = None
        try:
            with trio.fail_after(self._connect_timeout):
                if tcp is None:
                    tcp = await trio.open_tcp_stream(host, port)
                context = self._context_provider(source)
                tls = await Wire.handshake(tcp, context, server_side=False, server_hostname=server_hostname)
            if tls.selected_alpn_protocol() != ALPN:
                raise HboneConnectError(f"{where} did not negotiate HTTP/2 (ALPN h2): is that an HBONE port?")
            check_cipher(tls.cipher())
            identity = peer_identity(tls)
            if isinstance(expected, frozenset):
                require_one_of(identity, expected)
            elif expected is not None:
                require_identity(identity, expected)
            elif identity.trust_domain != source.trust_domain:
                raise PeerIdentityError(
                    f"{where} presented {identity.uri}, outside trust domain {source.trust_domain!r}"
                )
        except BaseException as e:
            if tls is not None:
                tls.close()
            elif tcp is not None and tcp.socket.fileno() != -1:  # Wire.handshake took it over otherwise
                await trio.aclose_forcefully(tcp)
            if isinstance(e, trio.TooSlowError):
                raise HboneConnectError(
                    f"connection to {where} timed out after {self._connect_timeout:g} s: "
                    f"is a firewall blocking HBONE port {port}?"
                ) from None
            if isinstance(e, OSError):
                raise HboneConnectError(_explain_os_error(e, where)) from None
            if isinstance(e, trio.BrokenResourceError):
                raise HboneConnectError(
                    f"TLS handshake with {where} failed: {_tls_reason(e)} (do both sides trust the same mesh CA?)"
                ) from None
            raise
        return tls, identity

    async def _run_link(self, key: PoolKey, link: HboneLink, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            await link.run(task_status=task_status)
        finally:
            group = self._links.get(key)
            if group is not None and link in group:
                group.remove(link)
                if not group:
                    del self._links[key]


# An inner (double HBONE) connection outlives its one tunnel by this much: closing it at once would
# end the destination's handler (and whatever it still had to deliver) with the connection.
NESTED_GRACE = 1.0


def _peer(link: HboneLink) -> str:
    return f"{link.peer_identity} at {Address(*link.peer_address)}"


def _explain_failure(link: HboneLink) -> str:
    failure = link.failure or "connection closed"
    if not link.heard_from_peer and failure != _STUCK:
        # With TLS 1.3 the server checks our certificate after our side of the handshake is done,
        # so its refusal arrives as the first read failing.
        return (
            f"{_peer(link)} hung up right after the TLS handshake ({failure}): it probably rejected our "
            "certificate (missing, expired, from another CA, or outside its trust domain)"
        )
    return f"HBONE connection to {_peer(link)} failed: {failure}"


def _errno_of(e: BaseException) -> int | None:
    # trio.open_tcp_stream raises OSError("all attempts ... failed") caused by the per-address errors.
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            if (code := _errno_of(sub)) is not None:
                return code
    cause = e.__cause__
    return _errno_of(cause) if cause is not None else None


def _explain_os_error(e: OSError, where: str) -> str:
    code = _errno_of(e)
    if code == errno.ECONNREFUSED:
        return f"connection refused: is meshd running on {where}?"
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"no route to {where}: is the host up and reachable?"
    return f"cannot connect to {where}: {e.strerror or e}"


def _tls_reason(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    return str(cause or e) or e.__class__.__name__
