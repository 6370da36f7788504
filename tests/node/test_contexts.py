"""TLS contexts follow certificate renewal: new connections use the new certificate, no restart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio

from meshd.identity.ca import LocalCA
from meshd.identity.manager import IdentityManager, LocalCASource
from meshd.identity.spiffe import SpiffeId
from meshd.node.contexts import TlsContexts

NODE = SpiffeId.node("home.arpa", "beta")
ECHO = SpiffeId("home.arpa", "default", "echo")
EPOCH = datetime(2026, 11, 27, tzinfo=UTC)


async def test_contexts_are_cached_until_a_renewal(tmp_path: Path, autojump_clock: object) -> None:
    LocalCA.init(tmp_path / "ca", "home.arpa", now=EPOCH - timedelta(days=1))
    mgr = IdentityManager(
        LocalCASource(tmp_path / "ca", timedelta(hours=1)),
        [NODE, ECHO],
        wall_clock=lambda: EPOCH + timedelta(seconds=trio.current_time()),
    )
    contexts = TlsContexts(mgr, NODE, lambda ip: ECHO if ip == "127.0.0.3" else NODE)
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr.run)
        server, client = contexts.server_for_ip("127.0.0.3"), contexts.client(ECHO)
        assert contexts.server_for_ip("127.0.0.3") is server and contexts.client(ECHO) is client
        assert contexts.server_for_ip("127.0.0.1") is not server  # the node's own certificate
        assert server.sni_callback is not None  # control SNI switches to the node certificate
        await mgr.wait_changed()
        assert contexts.server_for_ip("127.0.0.3") is not server
        assert contexts.client(ECHO) is not client
        nursery.cancel_scope.cancel()
