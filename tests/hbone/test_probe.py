"""A request on a pooled connection that gets no reply: the pool PINGs the connection; a live peer
(slow to answer) is waited for, a silent one (a partition) fails the connection and the request
moves to a new one. Keep-alive PINGs are off here, so without the probe the request would wait
forever (the test's deadline would fail it).

The probe's timings are shortened for the test (module constants, not a network path)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from meshd.hbone import pool as pool_module
from meshd.hbone.server import InboundRequest, ServerReply
from meshd.hbone.tls import StaticCertificates
from tests.support.hbone_mesh import CLIENT_ID, SERVER_ID, echo, running_mesh


@pytest.fixture(autouse=True)
def quick_probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(pool_module, "PROBE_AFTER", 0.1)
    monkeypatch.setattr(pool_module, "PROBE_TIMEOUT", 0.5)
    yield


class FreezableRelay:
    """TCP relay in front of the server. `freeze()` stops moving bytes on the connections it has (both
    ways, sockets left open: what a partition looks like to both ends); later connections flow."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.frozen: list[trio.CancelScope] = []

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        address = listeners[0].socket.getsockname()
        async with trio.open_nursery() as nursery:
            task_status.started((address[0], address[1]))
            await trio.serve_listeners(self._relay, listeners, handler_nursery=nursery)

    async def _relay(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream(*self.target)
        scope = trio.CancelScope()
        self.frozen.append(scope)
        with scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_copy, client, server)
                nursery.start_soon(_copy, server, client)
        await trio.sleep_forever()  # frozen: hold both sockets open, move nothing

    def freeze(self) -> None:
        for scope in self.frozen:
            scope.cancel()


async def _copy(a: trio.SocketStream, b: trio.SocketStream) -> None:
    while data := await a.receive_some():
        await b.send_all(data)


async def test_a_silent_connection_is_failed_and_the_request_moves_to_a_new_one(
    server_certs: StaticCertificates, client_certs: StaticCertificates
) -> None:
    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, echo, ping_interval=None) as mesh:
            relay = FreezableRelay(mesh.address)
            address = await mesh.nursery.start(relay.serve)
            first = await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, address, "10.0.0.1:80")
            await first.send_all(b"before")
            assert await first.receive_some() == b"before"
            relay.freeze()
            second = await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, address, "10.0.0.1:80")
            await second.send_all(b"after")
            assert await second.receive_some() == b"after"
            assert mesh.pool.statistics().connects == 2
            with pytest.raises(trio.BrokenResourceError):  # the silent connection was failed
                await first.send_all(b"lost")
                await first.receive_some()
            await second.aclose()
            mesh.nursery.cancel_scope.cancel()


async def test_a_slow_but_live_peer_is_waited_for(
    server_certs: StaticCertificates, client_certs: StaticCertificates
) -> None:
    async def slow_echo(req: InboundRequest, reply: ServerReply) -> None:
        await trio.sleep(1.0)  # ten probe intervals: every PING is answered meanwhile
        await echo(req, reply)

    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, slow_echo, ping_interval=None) as mesh:
            tunnel = await mesh.tunnel()
            await tunnel.send_all(b"patience")  # type: ignore[attr-defined]
            assert await tunnel.receive_some() == b"patience"  # type: ignore[attr-defined]
            assert mesh.pool.statistics().connects == 1
            await tunnel.aclose()  # type: ignore[attr-defined]
            mesh.nursery.cancel_scope.cancel()
