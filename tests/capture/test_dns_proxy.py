"""The DNS proxy's I/O: UDP and TCP on loopback, forwarding to a fake upstream, SERVFAIL when the
upstream is silent, garbage answered with FORMERR. In process, on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import socket
from datetime import timedelta

import dns.message
import dns.rcode
import dns.rrset
import trio
import trio.testing
from prometheus_client import CollectorRegistry, Counter

from meshd.capture.dns_server import DnsServer, _read_frame, bind_udp_and_tcp, resolv_conf_upstreams
from meshd.config.model import DnsConfig
from meshd.discovery.catalog import ServiceEntry, ServicePortEntry
from meshd.discovery.vip import allocate
from meshd.units import Address

SERVICES = {"echo.default": ServiceEntry("echo", "default", (ServicePortEntry(7000, 7000, "tcp"),))}
VIPS = allocate(SERVICES)


async def fake_upstream(*, task_status: trio.TaskStatus[Address]) -> None:
    """UDP and TCP on one port; answers A 192.0.2.1 for anything."""
    udp, listeners = await bind_udp_and_tcp(Address("127.0.0.1", 0))
    port = udp.getsockname()[1]

    def answer(data: bytes) -> bytes:
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "192.0.2.1"))
        return r.to_wire()

    async def tcp(stream: trio.SocketStream) -> None:
        async with stream:
            data = await _read_frame(stream)
            assert data is not None
            reply = answer(data)
            await stream.send_all(len(reply).to_bytes(2, "big") + reply)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, tcp, listeners)
        task_status.started(Address("127.0.0.1", port))
        while True:
            data, addr = await udp.recvfrom(4096)
            await udp.sendto(answer(data), addr)


async def ask_udp(server: Address, wire: bytes) -> bytes:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        await s.connect((server.host, server.port))
        await s.send(wire)
        with trio.fail_after(5):
            return await s.recv(65535)


async def ask_tcp(server: Address, wire: bytes) -> bytes:
    stream = await trio.open_tcp_stream(server.host, server.port)
    async with stream:
        await stream.send_all(len(wire).to_bytes(2, "big") + wire)
        with trio.fail_after(5):
            reply = await _read_frame(stream)
    assert reply is not None
    return reply


def server(upstreams: tuple[Address, ...], counter: Counter | None = None) -> DnsServer:
    cfg = DnsConfig(
        enabled=True,
        listen=Address("127.0.0.1", 0),
        upstreams=upstreams,
        forward_timeout=timedelta(milliseconds=200),
    )
    return DnsServer(cfg, lambda: (SERVICES, VIPS), counter)


def value(counter: Counter, result: str) -> float:
    return counter.labels(result)._value.get()  # type: ignore[no-any-return]


async def test_mesh_answers_and_forwarding_over_udp_and_tcp() -> None:
    counter = Counter("q", "q", ("result",), registry=CollectorRegistry())
    async with trio.open_nursery() as nursery:
        upstream = await nursery.start(fake_upstream)
        addr = await nursery.start(server((upstream,), counter).serve)
        for ask in (ask_udp, ask_tcp):
            mesh = dns.message.from_wire(
                await ask(addr, dns.message.make_query("echo.default.mesh", "A").to_wire())
            )
            assert [r.to_text() for r in mesh.answer[0]] == [VIPS.by_service["echo.default"]]
            q = dns.message.make_query("example.test", "A")
            fwd = dns.message.from_wire(await ask(addr, q.to_wire()))
            assert fwd.id == q.id and [r.to_text() for r in fwd.answer[0]] == ["192.0.2.1"]
        nx = dns.message.from_wire(await ask_udp(addr, dns.message.make_query("x.y.mesh", "A").to_wire()))
        assert nx.rcode() == dns.rcode.NXDOMAIN
        bad = await ask_udp(addr, b"\x12\x34\x01\x00" + b"\x00\x01" + b"\x00" * 6 + b"\xff")
        assert bad[:2] == b"\x12\x34" and bad[3] & 0xF == dns.rcode.FORMERR
        assert (value(counter, "mesh"), value(counter, "forwarded"), value(counter, "nxdomain")) == (2, 2, 1)
        assert value(counter, "formerr") == 1
        nursery.cancel_scope.cancel()


async def test_silent_upstreams_give_servfail_within_the_timeout() -> None:
    silent = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await silent.bind(("127.0.0.1", 0))  # bound, never answers
    dead = Address("127.0.0.1", silent.getsockname()[1])
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(server((dead, dead)).serve)
        start = trio.current_time()
        reply = dns.message.from_wire(
            await ask_udp(addr, dns.message.make_query("example.test", "A").to_wire())
        )
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert trio.current_time() - start < 2.0  # two upstreams x 200 ms
        nursery.cancel_scope.cancel()
    silent.close()


def test_resolv_conf_nameservers() -> None:
    text = "# generated\nsearch home.arpa\nnameserver 192.0.2.53\nnameserver fe80::1%eth0 # link-local\noptions ndots:2\n"
    assert resolv_conf_upstreams(text) == [Address("192.0.2.53", 53), Address("fe80::1", 53)]
