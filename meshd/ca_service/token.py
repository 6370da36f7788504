"""Enrollment tokens: minting, verification and the client's pin check. Pure: no I/O, no clock.

A token is `meshd-enroll-v1.<payload>.<mac>`, both parts base64url without padding. The payload is
JSON: `id` (random, the single-use key), `node`, `workloads` ("ns/sa" each), `exp` (unix seconds),
`fp` (SHA-256 of the CA root's DER, hex: the client pins it), `ca` (the enrollment address) and
`td` (trust domain). The MAC is HMAC-SHA256 over the payload text with a secret that never leaves the
CA folder (`token.key`). The token is a bearer secret: whoever holds it may enroll once as `node`.

Verification order (each failure has its own reason, for the CA's log and the enrolling operator):
malformed -> forged (bad MAC) -> expired -> already used -> pins another root.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Container
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

PREFIX = "meshd-enroll-v1"


class TokenError(Exception):
    """The token is refused; the message is the reason, fit for a log line and the user."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    id: str
    node: str
    workloads: tuple[str, ...]
    expires: int  # unix seconds
    fingerprint: str  # sha256 hex (lowercase, no colons) of the CA root's DER
    address: str  # enrollment endpoint HOST:PORT
    trust_domain: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lowercase hex (what a token pins)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def mint(key: bytes, claims: TokenClaims) -> str:
    payload = json.dumps(
        {
            "id": claims.id,
            "node": claims.node,
            "workloads": list(claims.workloads),
            "exp": claims.expires,
            "fp": claims.fingerprint,
            "ca": claims.address,
            "td": claims.trust_domain,
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    body = _b64(payload)
    mac = hmac.new(key, body.encode("ascii"), hashlib.sha256).digest()
    return f"{PREFIX}.{body}.{_b64(mac)}"


def _split(text: str) -> tuple[str, str]:
    parts = text.strip().split(".")
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
        raise TokenError(
            f"malformed token (expected {PREFIX}.<payload>.<mac>, as printed by `meshd ca token`)"
        )
    return parts[1], parts[2]


def decode(text: str) -> TokenClaims:
    """The claims, without checking the MAC (the enrolling client cannot: it has no key)."""
    body, _ = _split(text)
    try:
        raw = json.loads(_unb64(body))
        return TokenClaims(
            id=str(raw["id"]),
            node=str(raw["node"]),
            workloads=tuple(str(w) for w in raw["workloads"]),
            expires=int(raw["exp"]),
            fingerprint=str(raw["fp"]),
            address=str(raw["ca"]),
            trust_domain=str(raw["td"]),
        )
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise TokenError("malformed token (the payload does not decode; copy the whole token)") from None


def verify(key: bytes, text: str, *, now: float, used: Container[str], ca_fingerprint: str) -> TokenClaims:
    """The claims of a token this CA minted, unexpired, unused, pinning `ca_fingerprint`; else TokenError."""
    body, mac_text = _split(text)
    try:
        mac = _unb64(mac_text)
    except (ValueError, binascii.Error):
        raise TokenError("malformed token (the signature does not decode)") from None
    expected = hmac.new(key, body.encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise TokenError("forged token: its signature does not match this CA's token key")
    claims = decode(text)
    if now >= claims.expires:
        raise TokenError(f"token for node {claims.node!r} expired (make a new one with `meshd ca token`)")
    if claims.id in used:
        raise TokenError(f"token for node {claims.node!r} was already used (tokens are single-use)")
    if claims.fingerprint != ca_fingerprint:
        raise TokenError(
            f"token for node {claims.node!r} pins a CA root that no longer signs (the CA was rotated; "
            "make a new token)"
        )
    return claims


def check_pin(pinned: str, bundle_pem: bytes, server_leaf_der: bytes) -> x509.Certificate:
    """Client side, before the token is sent: the enrollment server's certificate must be issued by
    the root the token pins, and that root must be in the bundle the server offered. Returns the root."""
    try:
        roots = x509.load_pem_x509_certificates(bundle_pem)
        leaf = x509.load_der_x509_certificate(server_leaf_der)
    except ValueError:
        raise TokenError("the CA sent an unreadable certificate or bundle") from None
    root = next((r for r in roots if fingerprint(r) == pinned), None)
    if root is None:
        raise TokenError(
            "wrong CA fingerprint: the server's roots do not include the one the token pins "
            "(is --ca pointing at the right host? is someone in the middle?)"
        )
    try:
        leaf.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise TokenError(
            "wrong CA fingerprint: the server's certificate is not issued by the root the token pins"
        ) from None
    return root
