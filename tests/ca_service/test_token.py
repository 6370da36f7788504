"""Enrollment tokens, pure: minted, verified, and refused as forged, expired, reused or mis-pinned."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization

from meshd.ca_service.token import TokenClaims, TokenError, check_pin, decode, fingerprint, mint, verify
from meshd.identity.ca import LocalCA
from meshd.identity.spiffe import SpiffeId

KEY = b"k" * 32
NOW = 1_800_000_000.0


def claims(**kw: object) -> TokenClaims:
    base: dict[str, object] = dict(
        id="abc123",
        node="beta",
        workloads=("default/echo",),
        expires=int(NOW) + 3600,
        fingerprint="f" * 64,
        address="10.0.0.1:15012",
        trust_domain="home.arpa",
    )
    base.update(kw)
    return TokenClaims(**base)  # type: ignore[arg-type]


def test_round_trip() -> None:
    token = mint(KEY, claims())
    assert decode(token) == claims()
    assert verify(KEY, token, now=NOW, used=set(), ca_fingerprint="f" * 64) == claims()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda t: t.replace("meshd-enroll-v1", "other"), "malformed token"),
        (lambda t: t.rsplit(".", 1)[0], "malformed token"),
        (lambda t: "meshd-enroll-v1.!!!.xx", "forged token"),
        (lambda t: t[:-3] + ("AAA" if not t.endswith("AAA") else "BBB"), "forged token"),
        (lambda t: mint(b"x" * 32, claims()), "forged token"),
        # a payload edited to name another node keeps the old MAC: forged
        (
            lambda t: (
                mint(KEY, claims(node="evil")).split(".")[0]
                + "."
                + mint(KEY, claims(node="evil")).split(".")[1]
                + "."
                + t.split(".")[2]
            ),
            "forged token",
        ),
    ],
    ids=["prefix", "truncated", "garbage", "mac-edited", "other-key", "payload-edited"],
)
def test_malformed_and_forged_tokens_are_refused(mutate: object, reason: str) -> None:
    token = mutate(mint(KEY, claims()))  # type: ignore[operator]
    with pytest.raises(TokenError, match=reason):
        verify(KEY, token, now=NOW, used=set(), ca_fingerprint="f" * 64)


def test_expired_token_is_refused() -> None:
    token = mint(KEY, claims(expires=int(NOW) - 1))
    with pytest.raises(TokenError, match="expired"):
        verify(KEY, token, now=NOW, used=set(), ca_fingerprint="f" * 64)


def test_used_token_is_refused() -> None:
    token = mint(KEY, claims())
    with pytest.raises(TokenError, match="already used"):
        verify(KEY, token, now=NOW, used={"abc123"}, ca_fingerprint="f" * 64)


def test_token_pinning_another_root_is_refused_by_the_ca() -> None:
    token = mint(KEY, claims())
    with pytest.raises(TokenError, match="no longer signs"):
        verify(KEY, token, now=NOW, used=set(), ca_fingerprint="e" * 64)


def test_client_pin_check(tmp_path: object) -> None:
    from pathlib import Path

    d = Path(str(tmp_path))
    ca = LocalCA.init(d / "ca", "home.arpa")
    other = LocalCA.init(d / "other", "home.arpa")
    node = SpiffeId.node("home.arpa", "ca-host")
    leaf = ca.issue(node, ttl=timedelta(hours=1))
    leaf_der = leaf_der_of(leaf.cert_pem)
    assert check_pin(fingerprint(ca.cert), ca.cert_pem, leaf_der) == ca.cert
    # wrong fingerprint: the root the token pins is not among the server's roots
    with pytest.raises(TokenError, match="wrong CA fingerprint"):
        check_pin(fingerprint(other.cert), ca.cert_pem, leaf_der)
    # a server that offers the pinned root (public) but holds a certificate from another root
    imposter = other.issue(node, ttl=timedelta(hours=1))
    with pytest.raises(TokenError, match="not issued by the root the token pins"):
        check_pin(fingerprint(ca.cert), ca.cert_pem + other.cert_pem, leaf_der_of(imposter.cert_pem))


def leaf_der_of(chain_pem: bytes) -> bytes:
    from cryptography import x509

    return x509.load_pem_x509_certificates(chain_pem)[0].public_bytes(serialization.Encoding.DER)
