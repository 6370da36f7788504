"""The CA's decisions without sockets: enrollment, per-node authorization, revocation (under the
autojump clock, driving a real IdentityManager), and root rotation of a CA folder."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshd.ca_service import rotation
from meshd.ca_service.authority import CaAuthority, Refused
from meshd.ca_service.client import _checked, new_key_and_csr
from meshd.identity.ca import IssuedCert, LocalCA, trust_bundle, verify_chain
from meshd.identity.manager import IdentityError, IdentityManager
from meshd.identity.spiffe import SpiffeId

TD = "home.arpa"
BETA = SpiffeId.node(TD, "beta")
ECHO = SpiffeId(TD, "default", "echo")
OTHER = SpiffeId(TD, "default", "payments")
EPOCH = datetime.now(UTC).replace(microsecond=0)


def csr() -> tuple[object, bytes]:
    key, der = new_key_and_csr()
    return key, x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def authority(tmp_path: Path) -> CaAuthority:
    LocalCA.init(tmp_path / "ca", TD)
    return CaAuthority(tmp_path / "ca", timedelta(hours=24))


def enroll_beta(authority: CaAuthority, workloads: tuple[str, ...] = ("default/echo",)) -> str:
    token = authority.mint_token("beta", workloads, timedelta(hours=1), "127.0.0.1:15012")
    authority.enroll(token, csr()[1], now=EPOCH, peer="test")
    return token


def test_enrollment_certifies_the_node_and_a_token_works_once(
    authority: CaAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    token = authority.mint_token("beta", ["default/echo"], timedelta(hours=1), "127.0.0.1:15012")
    enrolled = authority.enroll(token, csr()[1], now=EPOCH, peer="10.0.0.9:1234")
    leaf = x509.load_pem_x509_certificates(enrolled.issued.cert_pem)[0]
    assert enrolled.node == "beta"
    assert (
        SpiffeId.parse(
            leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier
            )[0]
        )
        == BETA
    )
    with caplog.at_level(logging.WARNING, "meshd.ca"), pytest.raises(Refused, match="already used"):
        authority.enroll(token, csr()[1], now=EPOCH, peer="10.0.0.9:1235")
    assert "CA refused enrollment from 10.0.0.9:1235: token for node 'beta' was already used" in caplog.text


def test_expired_token_is_refused(authority: CaAuthority) -> None:
    token = authority.mint_token("beta", [], timedelta(minutes=5), "x:1")
    with pytest.raises(Refused, match="expired"):
        authority.enroll(token, csr()[1], now=datetime.now(UTC) + timedelta(minutes=6), peer="test")


def test_a_node_gets_only_the_identities_it_is_authorized_for(
    authority: CaAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    enroll_beta(authority)
    _key, pem = csr()
    with caplog.at_level(logging.INFO, "meshd.ca"):
        issued = authority.sign(BETA, ECHO, pem, now=EPOCH)
    verify_chain(
        x509.load_pem_x509_certificates(issued.cert_pem)[0], x509.load_pem_x509_certificates(issued.ca_pem)
    )
    with caplog.at_level(logging.INFO, "meshd.ca"), pytest.raises(Refused, match="not authorized for"):
        authority.sign(BETA, OTHER, csr()[1], now=EPOCH)
    assert (
        "CA refused a certificate: node 'beta' is not authorized for spiffe://home.arpa/ns/default/sa/payments"
        in caplog.text
    )
    assert "CA issued a certificate" in caplog.text
    # a workload identity may not ask; an unknown node may not ask
    with pytest.raises(Refused, match="not a meshd node identity"):
        authority.sign(ECHO, ECHO, csr()[1], now=EPOCH)
    with pytest.raises(Refused, match="not authorized"):
        authority.sign(SpiffeId.node(TD, "gamma"), SpiffeId.node(TD, "gamma"), csr()[1], now=EPOCH)
    # the CA's [ca.nodes.beta] table adds identities
    authority.node_table = lambda: {"beta": ("default/payments",)}
    authority.sign(BETA, OTHER, csr()[1], now=EPOCH)


class DirectSource:
    """What EnrolledSource does, minus the network: a fresh key, a CSR, the CA's decision."""

    def __init__(self, authority: CaAuthority) -> None:
        self.authority = authority

    def describe(self) -> str:
        return "direct"

    async def fetch(self, identity: SpiffeId, now: datetime) -> IssuedCert:
        key, pem = csr()
        try:
            issued = self.authority.sign(BETA, identity, pem, now=now)
        except Refused as exc:
            raise IdentityError(str(exc)) from None
        return _checked(issued.cert_pem, issued.ca_pem, key, identity, now)  # type: ignore[arg-type]


async def test_revocation_stops_renewal_and_certificates_die_at_expiry(
    authority: CaAuthority, autojump_clock: object
) -> None:
    enroll_beta(authority)

    def wall() -> datetime:
        return EPOCH + timedelta(seconds=trio.current_time())

    mgr = IdentityManager(DirectSource(authority), [BETA, ECHO], wall_clock=wall)
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr.run)
        await trio.sleep(13 * 3600)
        stats = mgr.statistics()
        assert stats[ECHO.uri].renewals == 1 and stats[BETA.uri].renewals == 1
        held = mgr.certificate(ECHO)
        authority.revoke("beta")
        await trio.sleep(3 * 24 * 3600)
        stats = mgr.statistics()
        assert stats[ECHO.uri].renewals == 1  # no renewal since the revocation
        assert stats[ECHO.uri].failures > 3
        assert "revoked" in (stats[ECHO.uri].last_error or "")
        assert mgr.certificate(ECHO) is held and held.not_after < wall()  # it died at expiry
        # reinstated: the next retry succeeds
        authority.revoke("beta", undo=True)
        await trio.sleep(3600)
        assert mgr.statistics()[ECHO.uri].renewals == 2
        nursery.cancel_scope.cancel()


def _roots(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def test_rotation_publishes_then_signs_then_retires(authority: CaAuthority, tmp_path: Path) -> None:
    d = tmp_path / "ca"
    old = LocalCA.load(d)
    token = authority.mint_token("beta", ["default/echo"], timedelta(hours=1), "x:1")
    new = rotation.prepare(d)
    assert _roots(trust_bundle(d)) == [old.cert, new.cert]  # both trusted; old still signs
    enrolled = authority.enroll(token, csr()[1], now=EPOCH, peer="t")
    assert _roots(enrolled.issued.cert_pem)[0].issuer == old.cert.subject
    _roots(enrolled.issued.cert_pem)[0].verify_directly_issued_by(old.cert)
    with pytest.raises(Exception, match="already prepared"):
        rotation.prepare(d)
    stale = authority.mint_token("beta", [], timedelta(hours=1), "x:1")
    rotation.activate(d)
    assert LocalCA.load(d).cert == new.cert
    assert _roots(trust_bundle(d)) == [new.cert, old.cert]
    issued = authority.sign(BETA, ECHO, csr()[1], now=EPOCH)
    _roots(issued.cert_pem)[0].verify_directly_issued_by(new.cert)
    assert _roots(issued.ca_pem) == [new.cert, old.cert]
    with pytest.raises(Refused, match="no longer signs"):
        authority.enroll(stale, csr()[1], now=EPOCH, peer="t")
    rotation.retire(d)
    assert _roots(trust_bundle(d)) == [new.cert]
    assert not (d / "previous").exists() and not (d / "next").exists()
