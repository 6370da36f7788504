"""The node side of the CA service: `meshd enroll`, and `EnrolledSource`, the CertSource of a node
that enrolled (`identity.state_dir`).

Keys are made here and never leave the node: the CA gets a CSR. The state directory holds the node's
`cert.pem`, `key.pem` (0600), `ca.crt` (the trust bundle) and `enrollment.json` (the CA's identity and
HBONE address). Workload keys live in memory only; a restart asks for fresh certificates.
"""

from __future__ import annotations

import json
import logging
import ssl
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshd.ca_service import wire
from meshd.ca_service.service import BUNDLE_PATH, csr_to_query
from meshd.ca_service.token import TokenError, check_pin, decode
from meshd.hbone.errors import HboneConnectError, PeerIdentityError
from meshd.hbone.pool import HbonePool
from meshd.hbone.tls import CONTROL_SNI, client_context
from meshd.identity.ca import (
    CAError,
    IssuedCert,
    _key_pem,
    _make_dir,
    _write_file,
    load_pem_certificates,
    read_issued,
    verify_chain,
    write_issued,
)
from meshd.identity.manager import IdentityError
from meshd.identity.spiffe import InvalidSpiffeId, SpiffeId, spiffe_id_from_cert
from meshd.units import Address

log = logging.getLogger("meshd.identity")

ENROLLMENT_FILE = "enrollment.json"
REQUEST_TIMEOUT = 15.0


class EnrollError(Exception):
    """Enrollment failed; the message says why (and what to do)."""


def new_key_and_csr() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh P-256 key and a CSR (DER) for it. The CA ignores the CSR's subject: it names the identity."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.DER)


def _checked(
    cert_pem: bytes,
    bundle_pem: bytes,
    key: ec.EllipticCurvePrivateKey,
    want: SpiffeId,
    now: datetime | None = None,
) -> IssuedCert:
    """What the CA sent must be for our key, our identity, and verify against the bundle it sent."""
    try:
        chain = load_pem_certificates(cert_pem)
        roots = load_pem_certificates(bundle_pem)
        leaf = chain[0]
        if leaf.public_key() != key.public_key():
            raise CAError("the CA returned a certificate for another key")
        got = spiffe_id_from_cert(leaf)
        if got != want:
            raise CAError(f"the CA returned a certificate for {got}, asked for {want}")
        verify_chain(leaf, roots, now=now)
    except InvalidSpiffeId as exc:
        raise CAError(f"the CA returned a certificate without a usable SPIFFE ID: {exc}") from None
    return IssuedCert(
        spiffe_id=want,
        cert_pem=cert_pem,
        key_pem=_key_pem(key),
        ca_pem=bundle_pem,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
    )


@dataclass(frozen=True)
class Enrollment:
    node: str
    ca_identity: SpiffeId
    ca_hbone: Address
    not_after: datetime


def write_enrollment(state_dir: Path, issued: IssuedCert, ca_identity: SpiffeId, ca_hbone: Address) -> None:
    _make_dir(state_dir, "state directory")
    write_issued(issued, state_dir)
    meta = {"ca_identity": ca_identity.uri, "ca_hbone": str(ca_hbone)}
    _write_file(state_dir / ENROLLMENT_FILE, json.dumps(meta, indent=2).encode() + b"\n", 0o644)


def read_enrollment(state_dir: Path) -> tuple[SpiffeId, Address]:
    path = state_dir / ENROLLMENT_FILE
    try:
        meta = json.loads(path.read_text())
        return SpiffeId.parse(meta["ca_identity"]), Address.parse(meta["ca_hbone"])
    except FileNotFoundError:
        raise CAError(
            f"{path} does not exist: this host has not enrolled (run `meshd enroll --token ...`)"
        ) from None
    except (OSError, ValueError, KeyError, InvalidSpiffeId) as exc:
        raise CAError(f"{path} is unreadable: {exc} (enroll again with a new token)") from None


async def enroll(token: str, state_dir: Path, ca: Address | None = None) -> Enrollment:
    """Enroll this host: pin-check the CA, send the token and a CSR, write the state directory."""
    try:
        claims = decode(token)
    except TokenError as exc:
        raise EnrollError(str(exc)) from None
    where = ca or Address.parse(claims.address)
    key, csr_der = new_key_and_csr()
    csr_pem = x509.load_der_x509_csr(csr_der).public_bytes(serialization.Encoding.PEM)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # verified below against the pinned root, before the token is sent
    try:
        with trio.fail_after(REQUEST_TIMEOUT):
            tcp = await trio.open_tcp_stream(where.host, where.port)
            tls = trio.SSLStream(tcp, ctx, server_hostname=None)
            async with tls:
                await tls.do_handshake()
                greeting = await wire.receive(tls)
                if "bundle" not in greeting and not greeting.get("ok", True):
                    raise EnrollError(f"the CA at {where} failed: {greeting.get('error', 'no reason given')}")
                leaf_der = tls.getpeercert(binary_form=True)
                bundle = str(greeting.get("bundle", "")).encode()
                check_pin(claims.fingerprint, bundle, leaf_der or b"")
                await wire.send(tls, {"token": token, "csr": csr_pem.decode()})
                answer = await wire.receive(tls)
    except TokenError as exc:
        raise EnrollError(f"{where}: {exc}") from None
    except trio.TooSlowError:
        raise EnrollError(
            f"{where} did not answer within {REQUEST_TIMEOUT:g} s (is port {where.port} open?)"
        ) from None
    except (OSError, trio.BrokenResourceError, wire.WireError) as exc:
        if isinstance(exc, trio.BrokenResourceError | wire.WireError) and not str(exc):
            raise EnrollError(
                f"the CA at {where} closed the connection without an answer (its log says why)"
            ) from None
        raise EnrollError(
            f"cannot enroll with {where}: {exc} (is the CA's meshd running with [ca] serve = true?)"
        ) from None
    if not answer.get("ok"):
        raise EnrollError(f"the CA refused: {answer.get('error', 'no reason given')}")
    node_id = SpiffeId.node(claims.trust_domain, claims.node)
    try:
        issued = _checked(str(answer["cert"]).encode(), str(answer["bundle"]).encode(), key, node_id)
        ca_identity = SpiffeId.parse(str(answer["ca_identity"]))
        ca_hbone = Address(where.host, int(answer["hbone_port"]))
        write_enrollment(state_dir, issued, ca_identity, ca_hbone)
    except (CAError, KeyError, ValueError, InvalidSpiffeId) as exc:
        raise EnrollError(f"bad answer from the CA: {exc}") from None
    return Enrollment(claims.node, ca_identity, ca_hbone, issued.not_after)


class EnrolledSource:
    """CertSource for an enrolled node: CSRs to the CA over HBONE, authenticated by the node certificate."""

    def __init__(self, state_dir: Path, node_identity: SpiffeId, ca_server: Address | None = None) -> None:
        self.state_dir = state_dir
        self.node_identity = node_identity
        self.ca_server = ca_server
        self._node: IssuedCert | None = None

    def describe(self) -> str:
        return f"the CA service (enrolled in {self.state_dir})"

    def _node_cert(self) -> IssuedCert:
        if self._node is None:
            issued = read_issued(self.state_dir)
            if issued.spiffe_id != self.node_identity:
                raise CAError(
                    f"{self.state_dir} is enrolled as {issued.spiffe_id}, but this node is {self.node_identity} "
                    "(set node_name to the enrolled name, or enroll again)"
                )
            self._node = issued
        return self._node

    async def fetch(self, identity: SpiffeId, now: datetime) -> IssuedCert:
        try:
            node = self._node_cert()
            if identity == self.node_identity and self._node is not None and now < _half_life(node):
                return node  # fresh from enrollment (or the last renewal): no need to ask
            if node.not_after <= now:
                raise CAError(
                    f"the node certificate in {self.state_dir} expired at {node.not_after.isoformat()}: "
                    "it cannot authenticate to the CA any more (enroll again with a new token)"
                )
            key, csr_der = new_key_and_csr()
            status, body = await self._get(node, csr_to_query(identity, csr_der))
            if status != 200:
                raise CAError(f"the CA refused {identity}: {body.decode(errors='replace')}")
            answer = json.loads(body)
            issued = _checked(answer["cert"].encode(), answer["bundle"].encode(), key, identity, now)
        except (CAError, ValueError, KeyError, TypeError) as exc:
            raise IdentityError(str(exc)) from None
        if identity == self.node_identity:
            ca_identity, ca_hbone = read_enrollment(self.state_dir)
            write_enrollment(self.state_dir, issued, ca_identity, ca_hbone)
            self._node = issued
        return issued

    async def fetch_bundle(self) -> bytes:
        try:
            node = self._node_cert()
            status, body = await self._get(node, BUNDLE_PATH)
            if status != 200:
                raise CAError(f"the CA answered {status}: {body[:200].decode(errors='replace')}")
            load_pem_certificates(body)
        except CAError as exc:
            raise IdentityError(str(exc)) from None
        return body

    async def _get(self, node: IssuedCert, path: str) -> tuple[int, bytes]:
        """A GET to the CA over a one-off mTLS connection, as the node; the CA must be who enrolled us."""
        ca_identity, recorded = read_enrollment(self.state_dir)
        address = self.ca_server or recorded
        ctx = client_context(node.cert_pem, node.key_pem, node.ca_pem)
        pool = HbonePool(lambda _source: ctx, connect_timeout=REQUEST_TIMEOUT)
        problem: str | None = None
        async with trio.open_nursery() as nursery:  # the pool lives only for this one request
            await nursery.start(pool.run)
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    status, _, body, peer = await pool.get_control(
                        self.node_identity, (address.host, address.port), path, server_hostname=CONTROL_SNI
                    )
            except (HboneConnectError, PeerIdentityError) as exc:
                problem = f"CA at {address} unreachable: {exc}"
            except trio.TooSlowError:
                problem = f"CA at {address} did not answer within {REQUEST_TIMEOUT:g} s"
            finally:
                nursery.cancel_scope.cancel()
        if problem is not None:
            raise CAError(problem)
        if peer != ca_identity:
            raise CAError(f"{address} presented {peer}, not the CA {ca_identity} this node enrolled with")
        return status, body


def _half_life(cert: IssuedCert) -> datetime:
    return cert.not_before + (cert.not_after - cert.not_before) / 2


def with_bundle(issued: IssuedCert, bundle: bytes) -> IssuedCert:
    return replace(issued, ca_pem=bundle)
