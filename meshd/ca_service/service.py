"""The CA service's two endpoints on the CA host (`[ca] serve = true`).

1. Enrollment, `ca.listen` (default port 15012): TLS 1.3 with a server certificate freshly issued by
   the signing root (so the client can check it against the root fingerprint its token pins); no
   client certificate. Messages are in `meshd.ca_service.wire`.
2. CSRs over HBONE (port 15008, mTLS: the client is authenticated by its node certificate). The HBONE
   request path carries no request bodies, so a CSR travels in the query of a GET:
   `GET /meshd/v1/ca/sign?id=<spiffe uri>&csr=<base64url DER>` -> 200 JSON {"cert", "bundle"}, or
   403 with the reason; `GET /meshd/v1/ca/bundle` -> 200 the trust bundle (PEM). A P-256 CSR is
   about 300 bytes of DER, far below the 64 KiB header list limit.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import ssl
import urllib.parse
from collections.abc import Callable
from datetime import datetime, timedelta

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshd.ca_service import wire
from meshd.ca_service.authority import CaAuthority, Refused
from meshd.hbone.server import InboundRequest, ServerReply
from meshd.hbone.tls import _pem_path
from meshd.identity.ca import CAError
from meshd.identity.spiffe import InvalidSpiffeId, SpiffeId
from meshd.listeners import open_listeners, peer_of, per_connection
from meshd.units import Address

log = logging.getLogger("meshd.ca")

CA_PATH_PREFIX = "/meshd/v1/ca/"
SIGN_PATH = "/meshd/v1/ca/sign"
BUNDLE_PATH = "/meshd/v1/ca/bundle"
ENROLL_TIMEOUT = 10.0
SERVER_CERT_TTL = timedelta(hours=1)


def csr_to_query(identity: SpiffeId, csr_der: bytes) -> str:
    csr = base64.urlsafe_b64encode(csr_der).rstrip(b"=").decode()
    return f"{SIGN_PATH}?{urllib.parse.urlencode({'id': identity.uri, 'csr': csr})}"


def csr_from_query(path: str) -> tuple[SpiffeId, bytes]:
    """The (identity, CSR PEM) of a sign request; ValueError with a reason if malformed."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
    try:
        (ident,), (csr_text,) = query["id"], query["csr"]
        identity = SpiffeId.parse(ident)
        der = base64.urlsafe_b64decode(csr_text + "=" * (-len(csr_text) % 4))
        csr = x509.load_der_x509_csr(der)
    except (KeyError, ValueError, InvalidSpiffeId, binascii.Error) as exc:
        raise ValueError(f"bad CSR request: {exc or 'id and csr are required'}") from None
    return identity, csr.public_bytes(serialization.Encoding.PEM)


class CaService:
    def __init__(
        self,
        authority: CaAuthority,
        node_identity: SpiffeId,
        hbone_port: int,
        *,
        wall_clock: Callable[[], datetime],
    ) -> None:
        self.authority = authority
        self.node_identity = node_identity
        self.hbone_port = hbone_port
        self.wall_clock = wall_clock

    # ---- HBONE (mTLS) ----------------------------------------------------------------------------
    async def handle_request(self, req: InboundRequest, reply: ServerReply) -> None:
        path = urllib.parse.urlsplit(req.path or "").path
        if req.method != "GET" or path not in (SIGN_PATH, BUNDLE_PATH):
            await reply.refuse(404, f"no CA endpoint {req.method} {path} (GET {SIGN_PATH} or {BUNDLE_PATH})")
            return
        if path == BUNDLE_PATH:
            try:
                bundle = self.authority.bundle()
            except CAError as exc:
                await reply.refuse(503, str(exc))
                return
            await reply.respond(200, [("content-type", "application/x-pem-file")], bundle)
            return
        try:
            identity, csr_pem = csr_from_query(req.path or "")
        except ValueError as exc:
            await reply.refuse(400, str(exc))
            return
        try:
            issued = self.authority.sign(req.peer_identity, identity, csr_pem, now=self.wall_clock())
        except Refused as exc:
            await reply.refuse(403, str(exc))
            return
        body = json.dumps({"cert": issued.cert_pem.decode(), "bundle": issued.ca_pem.decode()}).encode()
        await reply.respond(200, [("content-type", "application/json")], body)

    # ---- enrollment (TLS, one-time token) --------------------------------------------------------
    async def serve_enrollment(
        self,
        address: Address,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await open_listeners("ca.listen", address)
        sockname = listeners[0].socket.getsockname()
        log.info("CA enrollment listening on %s:%d", sockname[0], sockname[1])
        await trio.serve_listeners(
            per_connection(self._handle_enrollment, "CA enrollment"), listeners, task_status=task_status
        )

    def _server_context(self) -> ssl.SSLContext:
        issued = self.authority.ca().issue(self.node_identity, ttl=SERVER_CERT_TTL, now=self.wall_clock())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.num_tickets = 0
        with _pem_path(issued.cert_pem) as cert_path, _pem_path(issued.key_pem) as key_path:
            ctx.load_cert_chain(cert_path, key_path)
        return ctx

    async def _handle_enrollment(self, tcp: trio.SocketStream) -> None:
        address = peer_of(tcp)
        if address is None:
            await trio.aclose_forcefully(tcp)
            return
        peer = f"{address[0]}:{address[1]}"
        try:
            tls = trio.SSLStream(tcp, self._server_context(), server_side=True)
        except CAError as exc:
            log.error("CA enrollment endpoint cannot load the CA: %s", exc)
            await trio.aclose_forcefully(tcp)
            return
        try:
            with trio.fail_after(ENROLL_TIMEOUT):
                await tls.do_handshake()
                try:
                    bundle = self.authority.bundle()
                except CAError as exc:  # the client still hears why, not a closed connection
                    log.error("CA enrollment from %s failed: %s", peer, exc)
                    await wire.send(tls, {"ok": False, "error": f"the CA cannot read its folder: {exc}"})
                    return
                await wire.send(tls, {"bundle": bundle.decode(), "v": 1})
                request = await wire.receive(tls)
                token, csr = request.get("token"), request.get("csr")
                if not isinstance(token, str) or not isinstance(csr, str):
                    await wire.send(tls, {"ok": False, "error": "bad request: token and csr are required"})
                    return
                try:
                    enrolled = self.authority.enroll(token, csr.encode(), now=self.wall_clock(), peer=peer)
                except Refused as exc:
                    await wire.send(tls, {"ok": False, "error": str(exc)})
                    return
                await wire.send(
                    tls,
                    {
                        "ok": True,
                        "cert": enrolled.issued.cert_pem.decode(),
                        "bundle": enrolled.issued.ca_pem.decode(),
                        "ca_identity": self.node_identity.uri,
                        "hbone_port": self.hbone_port,
                    },
                )
        except (trio.BrokenResourceError, trio.TooSlowError, wire.WireError) as exc:
            log.info("CA enrollment connection from %s failed: %s", peer, exc or type(exc).__name__)
        finally:
            await trio.aclose_forcefully(tls)
