"""A fake meshd peer: a real `HboneServer` with a node certificate from the mesh CA, answering
`GET /meshd/v1/catalog` with whatever the test sets (`body`), or with a body that never ends
(`endless`). It runs trio in a thread of the test process; every request it serves is counted."""

from __future__ import annotations

import threading
from typing import Any

import trio

from meshd.discovery.catalog import CATALOG_PATH
from meshd.hbone.server import HboneServer, InboundRequest, ServerReply
from meshd.hbone.tls import server_context
from meshd.identity.ca import IssuedCert


class FakePeer:
    def __init__(self, ip: str, issued: IssuedCert, trust_domain: str) -> None:
        self.ip = ip
        self.body = b"{}"
        self.endless = False
        self.served = 0  # catalog requests answered
        self.streamed = 0  # bytes of endless bodies written
        self._lock = threading.Lock()
        ctx = server_context(issued.cert_pem, issued.key_pem, issued.ca_pem)
        self._server = HboneServer(lambda _ip: ctx, trust_domain, self._handle)
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: trio.run(self._main), name="fake-peer", daemon=True)

    def set(self, body: bytes | None = None, *, endless: bool = False) -> int:
        """Serve `body` (or an endless body) from now on; returns the request count so far."""
        with self._lock:
            self.body = body if body is not None else b""
            self.endless = endless
            return self.served

    async def _handle(self, req: InboundRequest, reply: ServerReply) -> None:
        if req.method != "GET" or req.path != CATALOG_PATH:
            await reply.refuse(503, "a fake peer: no tunnels here")
            return
        with self._lock:
            body, endless = self.body, self.endless
            self.served += 1
        if not endless:
            await reply.respond(200, [("content-type", "application/json")], body)
            return
        stream = await reply.accept()  # 200, no content-length, then bytes until the client gives up
        chunk = b'{"version": 1, "pad": "' + b"x" * (1 << 16)
        while True:
            await stream.send_all(chunk)
            self.streamed += len(chunk)
            chunk = b"x" * (1 << 16)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._server.serve, self.ip, 15008)
                self._ready.set()

    def __enter__(self) -> FakePeer:
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("the fake peer did not start listening")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._token is not None and self._scope is not None:
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)
