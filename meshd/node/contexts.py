"""TLS contexts built from the identity manager's certificates, rebuilt when a certificate renews.

Building a context costs a few milliseconds (parsing keys and the bundle), so contexts are cached
per identity and certificate generation: a renewal takes effect for the next new connection,
while open connections keep the context they were made with.

Server side, the certificate is chosen per accepted connection by the address the client dialled
(see meshd.discovery.catalog, "tunnel identity rule"); a client that sends the control SNI (only
meshd's own catalog fetch does; tunnels send no SNI, as ztunnel) gets the node's identity.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from meshd.hbone.tls import CONTROL_SNI, client_context, server_context
from meshd.identity.manager import IdentityManager
from meshd.identity.spiffe import SpiffeId


class TlsContexts:
    def __init__(
        self, identities: IdentityManager, node_identity: SpiffeId, identity_for_ip: Callable[[str], SpiffeId]
    ) -> None:
        self.identities = identities
        self.node_identity = node_identity
        self.identity_for_ip = identity_for_ip
        self._server: dict[SpiffeId, tuple[int, ssl.SSLContext]] = {}
        self._client: dict[SpiffeId, tuple[int, ssl.SSLContext]] = {}

    def _fresh(
        self, cache: dict[SpiffeId, tuple[int, ssl.SSLContext]], identity: SpiffeId
    ) -> ssl.SSLContext | None:
        hit = cache.get(identity)
        return hit[1] if hit and hit[0] == self.identities.generation else None

    def server(self, identity: SpiffeId) -> ssl.SSLContext:
        ctx = self._fresh(self._server, identity)
        if ctx is None:
            cert = self.identities.certificate(identity)
            ctx = server_context(cert.cert_pem, cert.key_pem, cert.ca_pem)
            if identity != self.node_identity:
                ctx.sni_callback = self._switch_to_node
            self._server[identity] = (self.identities.generation, ctx)
        return ctx

    def server_for_ip(self, local_ip: str) -> ssl.SSLContext:
        return self.server(self.identity_for_ip(local_ip))

    def _switch_to_node(
        self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        if server_name == CONTROL_SNI:
            sslobj.context = self.server(self.node_identity)

    def client(self, source: SpiffeId) -> ssl.SSLContext:
        ctx = self._fresh(self._client, source)
        if ctx is None:
            cert = self.identities.certificate(source)
            ctx = client_context(cert.cert_pem, cert.key_pem, cert.ca_pem)
            self._client[source] = (self.identities.generation, ctx)
        return ctx
