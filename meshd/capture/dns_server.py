"""The DNS proxy (default 127.0.0.1:15053, UDP and TCP): mesh names answered here (`meshd.capture.dns`),
everything else forwarded to the upstream resolvers (`dns.upstreams`, else /etc/resolv.conf).

Bounded everywhere: queries over 4 KiB are dropped, at most MAX_INFLIGHT UDP queries and MAX_TCP
connections at once (more are dropped/closed), each upstream gets `dns.forward_timeout` before the
next is tried, a TCP connection is closed after IDLE_TIMEOUT without a query. A query no upstream
answers gets SERVFAIL.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import trio
from prometheus_client import Counter

from meshd.capture.dns import decide, formerr, parse, to_wire
from meshd.config.model import DnsConfig
from meshd.discovery.catalog import ServiceEntry
from meshd.discovery.vip import VipTable
from meshd.listeners import ListenError, per_connection
from meshd.units import Address

log = logging.getLogger("meshd.dns")

MAX_QUERY = 4096
MAX_INFLIGHT = 256
MAX_TCP = 64
IDLE_TIMEOUT = 10.0
RESOLV_CONF = Path("/etc/resolv.conf")

View = Callable[[], tuple[Mapping[str, ServiceEntry], VipTable]]


def resolv_conf_upstreams(text: str) -> list[Address]:
    """`nameserver` lines of resolv.conf text, as port-53 addresses."""
    out = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            out.append(Address(parts[1].split("%", 1)[0], 53))
    return out


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def _read_exact(stream: trio.abc.ReceiveStream, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


async def _read_frame(stream: trio.abc.ReceiveStream) -> bytes | None:
    head = await _read_exact(stream, 2)
    if head is None:
        return None
    return await _read_exact(stream, int.from_bytes(head, "big"))


class DnsServer:
    def __init__(
        self, config: DnsConfig, view: View, queries: Counter | None = None, *, mark: int | None = None
    ) -> None:
        self.config = config
        self.view = view
        self.queries = queries
        self.mark = mark  # SO_MARK on forwarded queries (port-53 capture lets marked packets pass)
        self.upstreams: list[Address] = list(config.upstreams)
        self._udp_inflight = 0
        self._tcp_open = 0

    def _count(self, result: str) -> None:
        if self.queries is not None:
            self.queries.labels(result).inc()

    async def serve(
        self,
        connections: trio.Nursery | None = None,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answer on UDP and TCP until cancelled. (`connections` is unused: queries are short, and
        a drain ends them with the listener.)"""
        listen = self.config.listen
        if not self.upstreams:
            try:
                text = await trio.Path(RESOLV_CONF).read_text()
            except OSError as exc:
                text = ""
                log.warning("cannot read %s: %s", RESOLV_CONF, exc)
            self.upstreams = [u for u in resolv_conf_upstreams(text) if u != listen]
        if not self.upstreams:
            log.warning("DNS proxy has no upstream resolver: names outside the mesh get SERVFAIL")
        try:
            udp, listeners = await bind_udp_and_tcp(listen)
        except OSError as exc:
            raise ListenError("dns.listen", listen, exc) from exc
        bound = Address(listen.host, udp.getsockname()[1])
        log.info(
            "DNS proxy listening",
            extra={
                "listen": str(bound),
                "domain": self.config.domain,
                "upstreams": [str(u) for u in self.upstreams],
            },
        )
        with udp:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_udp, udp, nursery)
                await nursery.start(trio.serve_listeners, per_connection(self._handle_tcp, "DNS"), listeners)
                task_status.started(bound)

    async def _serve_udp(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            data, addr = await sock.recvfrom(MAX_QUERY + 1)
            if len(data) > MAX_QUERY or self._udp_inflight >= MAX_INFLIGHT:
                self._count("dropped")
                continue
            self._udp_inflight += 1
            nursery.start_soon(self._handle_udp, sock, data, addr)

    async def _handle_udp(self, sock: trio.socket.SocketType, data: bytes, addr: Any) -> None:
        try:
            reply = await self.respond(data, udp=True)
            if reply is not None:
                await sock.sendto(reply, addr)
        except OSError as exc:
            log.debug("DNS reply to %s failed: %s", addr, exc)
        finally:
            self._udp_inflight -= 1

    async def _handle_tcp(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self._tcp_open >= MAX_TCP:
                self._count("dropped")
                return
            self._tcp_open += 1
            try:
                while True:
                    with trio.move_on_after(IDLE_TIMEOUT):
                        data = await _read_frame(stream)
                    if not data or len(data) > MAX_QUERY:
                        return
                    reply = await self.respond(data, udp=False)
                    if reply is None:
                        return
                    await stream.send_all(len(reply).to_bytes(2, "big") + reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            finally:
                self._tcp_open -= 1

    async def respond(self, data: bytes, *, udp: bool) -> bytes | None:
        """The reply to one query (None: say nothing)."""
        query = parse(data)
        if query is None:
            self._count("formerr")
            return formerr(data)
        services, vips = self.view()
        decision = decide(query, self.config.domain, services, vips)
        if decision.response is not None:
            self._count(decision.result)
            return to_wire(decision.response, query, udp=udp)
        reply = await self.forward(data, udp=udp)
        if reply is None:
            self._count("servfail")
            r = dns.message.make_response(query)
            r.set_rcode(dns.rcode.SERVFAIL)
            return r.to_wire()
        self._count("forwarded")
        return reply

    async def forward(self, data: bytes, *, udp: bool) -> bytes | None:
        """The first upstream's answer to the query bytes, over the client's transport; None if none
        answers in time."""
        timeout = self.config.forward_timeout.total_seconds()
        for up in self.upstreams:
            try:
                with trio.move_on_after(timeout):
                    reply = await (self._forward_udp if udp else self._forward_tcp)(up, data)
                    if reply is not None:
                        return reply
            except OSError as exc:
                log.debug("upstream %s failed: %s", up, exc)
            log.warning("DNS upstream %s did not answer within %gs", up, timeout)
        return None

    def _socket(self, up: Address, kind: socket.SocketKind) -> trio.socket.SocketType:
        sock = trio.socket.socket(_family(up.host), kind)
        if self.mark is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)  # needs CAP_NET_ADMIN
            except OSError:
                sock.close()
                raise
        return sock

    async def _forward_udp(self, up: Address, data: bytes) -> bytes | None:
        with self._socket(up, socket.SOCK_DGRAM) as sock:
            await sock.connect((up.host, up.port))
            await sock.send(data)
            while True:
                reply = await sock.recv(65535)
                if reply[:2] == data[:2]:  # same id; anything else is stale or spoofed
                    return reply

    async def _forward_tcp(self, up: Address, data: bytes) -> bytes | None:
        sock = self._socket(up, socket.SOCK_STREAM)
        try:
            await sock.connect((up.host, up.port))
        except BaseException:
            sock.close()
            raise
        stream = trio.SocketStream(sock)
        async with stream:
            await stream.send_all(len(data).to_bytes(2, "big") + data)
            return await _read_frame(stream)

    def statistics(self) -> dict[str, Any]:
        return {
            "listen": str(self.config.listen),
            "domain": self.config.domain,
            "upstreams": [str(u) for u in self.upstreams],
        }


async def bind_udp_and_tcp(address: Address) -> tuple[trio.socket.SocketType, list[trio.SocketListener]]:
    """A UDP socket and TCP listeners on the same port. With port 0 the UDP socket picks a free port
    whose TCP twin may be taken by someone else's connection: then try another (bounded)."""
    for _ in range(20):
        udp = trio.socket.socket(_family(address.host), socket.SOCK_DGRAM)
        await udp.bind((address.host, address.port))
        try:
            return udp, await trio.open_tcp_listeners(udp.getsockname()[1], host=address.host)
        except OSError as exc:
            udp.close()
            if address.port != 0 or exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, f"no port free for both UDP and TCP on {address.host}")
