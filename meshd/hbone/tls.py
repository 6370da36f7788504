"""TLS for HBONE: mutual TLS 1.3, ALPN h2, no SNI, SPIFFE identities from URI SANs.

Must never know: HTTP/2, trio, sockets, where certificates come from (the caller hands PEM bytes, or a
provider callable that returns a fresh context so a renewed certificate applies to new connections).

Python's ssl module can only load a key from a path. The PEM goes through an anonymous pipe read via
/dev/fd, so no key file ever touches a filesystem; a 0600 file in a private temp dir, deleted at once,
is the fallback where /dev/fd is unavailable. Python has no API to restrict TLS 1.3 cipher suites
(OpenSSL also offers ChaCha20), so `check_cipher` enforces ztunnel's two AES-GCM suites after the
handshake.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509

from meshd.hbone.errors import PeerIdentityError
from meshd.identity.spiffe import InvalidSpiffeId, SpiffeId, spiffe_id_from_cert

__all__ = [
    "ALLOWED_CIPHERS",
    "ALPN",
    "CONTROL_SNI",
    "ClientContextProvider",
    "PeerIdentityError",
    "ServerContextProvider",
    "StaticCertificates",
    "check_cipher",
    "client_context",
    "peer_identity",
    "require_identity",
    "require_trust_domain",
    "server_context",
]

# The SNI of meshd's own control requests (catalog fetch, enrollment): the server answers with the
# node identity. Tunnels send no SNI, as ztunnel.
CONTROL_SNI = "node.meshd.internal"

ALPN = "h2"
ALLOWED_CIPHERS = frozenset({"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"})
_PIPE_LIMIT = 60 * 1024  # a pipe holds 64 KiB; bigger PEMs take the temp-file path

ServerContextProvider = Callable[[str], ssl.SSLContext]  # gets the local IP the client dialled
ClientContextProvider = Callable[[SpiffeId], ssl.SSLContext]


class _HasPeerCert(Protocol):
    def getpeercert(self, binary_form: bool = ...) -> Any: ...


@contextlib.contextmanager
def _pem_path(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read `data` from once, gone when the block ends."""
    if len(data) <= _PIPE_LIMIT and os.path.isdir("/dev/fd"):
        r, w = os.pipe()
        try:
            os.write(w, data)
            os.close(w)
            w = -1
            yield f"/dev/fd/{r}"
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        return
    with tempfile.TemporaryDirectory(prefix="meshd-tls-") as d:  # mkdtemp is 0700
        path = os.path.join(d, "pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path


def load_cert_chain_pem(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """`ctx.load_cert_chain` from PEM bytes held in memory (the key never lands in a lasting file)."""
    with _pem_path(cert_pem) as cert_path, _pem_path(key_pem) as key_path:
        ctx.load_cert_chain(cert_path, key_path)


def _configure(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([ALPN])
    ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    load_cert_chain_pem(ctx, cert_pem, key_pem)
    return ctx


def server_context(cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> ssl.SSLContext:
    """Context for the HBONE listener: TLS 1.3, h2, client certificate required (from `ca_pem`)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.num_tickets = 0  # no resumption: every connection authenticates with its certificate
    return _configure(ctx, cert_pem, key_pem, ca_pem)


def client_context(cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> ssl.SSLContext:
    """Context for HBONE clients: TLS 1.3, h2, server certificate verified against `ca_pem`.

    Identities are SPIFFE URIs, not host names: check_hostname is off and the caller must compare
    `peer_identity()` with the destination's expected identity (`require_identity`). Use it with
    server_hostname=None so no SNI is sent.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    return _configure(ctx, cert_pem, key_pem, ca_pem)


def peer_identity(ssl_stream: _HasPeerCert) -> SpiffeId:
    """The SPIFFE ID of the peer's leaf certificate (its single spiffe:// URI SAN).

    Works on `Wire`, `trio.SSLStream`, `ssl.SSLObject` and `ssl.SSLSocket` after the handshake.
    """
    der = ssl_stream.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("peer presented no certificate")
    try:
        return spiffe_id_from_cert(x509.load_der_x509_certificate(der))
    except (InvalidSpiffeId, ValueError) as e:
        raise PeerIdentityError(f"peer certificate has no usable SPIFFE identity: {e}") from None


def require_identity(actual: SpiffeId, expected: SpiffeId) -> None:
    """Client side: the server must be exactly who the catalog says serves that destination."""
    if actual != expected:
        raise PeerIdentityError(
            f"server presented {actual.uri}, expected {expected.uri} "
            "(is the catalog stale, or is another workload answering on that address?)"
        )


def require_one_of(actual: SpiffeId, expected: frozenset[SpiffeId]) -> None:
    """Client side, when the hop before the server picks it (double HBONE to a service hostname: the
    gateway chooses the endpoint): the server must be one of the identities serving that service, as
    ztunnel checks the service's SANs (`final_sans: upstream.service_sans()`)."""
    if actual not in expected:
        names = ", ".join(sorted(i.uri for i in expected))
        raise PeerIdentityError(
            f"server presented {actual.uri}, expected one of the service's identities ({names})"
        )


def require_trust_domain(actual: SpiffeId, trust_domain: str) -> None:
    """Server side: clients must come from our trust domain; authorization policy decides the rest."""
    if actual.trust_domain != trust_domain:
        raise PeerIdentityError(f"client {actual.uri} is outside trust domain {trust_domain!r}")


def check_cipher(cipher: tuple[str, str, int] | None) -> None:
    """Refuse a negotiated suite outside ztunnel's set (pass `ssl_stream.cipher()`)."""
    if cipher is None or cipher[0] not in ALLOWED_CIPHERS:
        name = cipher[0] if cipher else "none"
        raise PeerIdentityError(f"TLS cipher suite {name} is not allowed (want AES-GCM)")


@dataclass(frozen=True, slots=True)
class StaticCertificates:
    """Context providers over fixed PEMs, built once (contexts are costly: build them per renewal, not
    per connection). Swap the object, or write your own provider, to rotate."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def __repr__(self) -> str:  # never show key material
        return "StaticCertificates(...)"

    def server_provider(self) -> ServerContextProvider:
        ctx = server_context(self.cert_pem, self.key_pem, self.ca_pem)
        return lambda _local_ip: ctx

    def client_provider(self) -> ClientContextProvider:
        ctx = client_context(self.cert_pem, self.key_pem, self.ca_pem)
        return lambda _source: ctx
