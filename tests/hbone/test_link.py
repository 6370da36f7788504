"""The connection driver on its own, over a plaintext socketpair and trio's virtual clock."""

from __future__ import annotations

import socket
from typing import Any

import trio

from meshd.hbone._link import HboneLink
from meshd.hbone.connection import HboneConnection, Role
from meshd.hbone.wire import Wire
from tests.support.hbone_mesh import SERVER_ID


def client_link(sock: socket.socket, **options: Any) -> HboneLink:
    """A client link on `sock` to SERVER_ID at 127.0.0.1:15008, with these HboneLink options."""
    return HboneLink(
        Wire(sock),
        HboneConnection(Role.CLIENT),
        peer_identity=SERVER_ID,
        peer_address=("127.0.0.1", 15008),
        **options,
    )


async def test_unanswered_ping_fails_the_link_after_the_timeout(autojump_clock: trio.abc.Clock) -> None:
    ours, silent_peer = socket.socketpair()
    link = client_link(ours, ping_interval=10.0, ping_timeout=20.0)
    start = trio.current_time()
    with trio.fail_after(60):
        await link.run()
    assert link.failure is not None and "PING" in link.failure
    assert 30.0 <= trio.current_time() - start < 31.0
    silent_peer.close()


async def test_idle_link_closes_itself(autojump_clock: trio.abc.Clock) -> None:
    ours, peer = socket.socketpair()
    link = client_link(ours, ping_interval=None, idle_timeout=60.0)
    start = trio.current_time()
    with trio.fail_after(120):
        await link.run()
    assert link.failure is None  # a clean, idle close: GOAWAY then hang up
    assert 60.0 <= trio.current_time() - start < 61.0
    peer.close()
