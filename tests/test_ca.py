"""The mesh CA library, on real files, checked with cryptography and with the openssl binary."""

from __future__ import annotations

import dataclasses
import re
import shutil
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from meshd.identity.ca import (
    CAError,
    LocalCA,
    describe_certificate,
    load_pem_certificates,
    read_issued,
    verify_chain,
    write_issued,
)
from meshd.identity.spiffe import SpiffeId, spiffe_id_from_cert

TD = "mesh.local"
WEB = SpiffeId(TD, "default", "web")
T0 = datetime(2030, 1, 1, tzinfo=UTC)

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leaf_of(pem: bytes) -> x509.Certificate:
    return load_pem_certificates(pem)[0]


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    return LocalCA.init(tmp_path / "ca", TD)


# --- init / load ----------------------------------------------------------------------------------


def test_init_writes_root_with_ca_profile(tmp_path: Path) -> None:
    d = tmp_path / "nested" / "ca"
    local = LocalCA.init(d, TD, now=T0)
    assert mode(d) == 0o700
    assert mode(d / "ca.key") == 0o600
    assert (d / "ca.crt").read_bytes() == local.cert_pem
    cert = local.cert
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "meshd"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"meshd root CA {TD}"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}"]
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, ec.SECP256R1)
    assert cert.not_valid_after_utc == T0 + timedelta(days=3650)
    cert.verify_directly_issued_by(cert)


def test_key_file_is_never_world_readable_even_with_permissive_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0)
    try:
        LocalCA.init(tmp_path / "ca", TD)
    finally:
        os.umask(old)
    assert mode(tmp_path / "ca" / "ca.key") == 0o600
    assert not [p for p in (tmp_path / "ca").iterdir() if p.name.startswith(".")], "temp files left behind"


def test_load_round_trip(ca: LocalCA, tmp_path: Path) -> None:
    again = LocalCA.load(tmp_path / "ca")
    assert again.trust_domain == TD
    assert again.cert == ca.cert
    issued = again.issue(WEB)
    verify_chain(leaf_of(issued.cert_pem), [ca.cert])


def test_init_refuses_existing_key_unless_forced(ca: LocalCA, tmp_path: Path) -> None:
    with pytest.raises(CAError, match=r"already exists.*--force"):
        LocalCA.init(tmp_path / "ca", TD)
    assert LocalCA.load(tmp_path / "ca").cert == ca.cert  # untouched
    replaced = LocalCA.init(tmp_path / "ca", TD, force=True)
    assert replaced.cert != ca.cert
    assert LocalCA.load(tmp_path / "ca").cert == replaced.cert
    assert mode(tmp_path / "ca" / "ca.key") == 0o600


@pytest.mark.parametrize("td", ["", "Mesh.Local", "mesh/local", "spiffe://mesh.local", "a b"])
def test_init_refuses_bad_trust_domain(tmp_path: Path, td: str) -> None:
    with pytest.raises(CAError, match="trust domain"):
        LocalCA.init(tmp_path / "ca", td)
    assert not (tmp_path / "ca" / "ca.key").exists()


def test_init_refuses_file_where_directory_expected(tmp_path: Path) -> None:
    (tmp_path / "ca").write_text("not a dir")
    with pytest.raises(CAError, match="not a directory"):
        LocalCA.init(tmp_path / "ca", TD)


def test_load_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CAError, match=r"does not exist.*meshd ca init"):
        LocalCA.load(tmp_path / "nope")


def test_load_file_where_directory_expected(tmp_path: Path) -> None:
    (tmp_path / "ca").write_text("x")
    with pytest.raises(CAError, match="is not a directory"):
        LocalCA.load(tmp_path / "ca")


@pytest.mark.parametrize("name", ["ca.crt", "ca.key"])
def test_load_missing_file(ca: LocalCA, tmp_path: Path, name: str) -> None:
    (tmp_path / "ca" / name).unlink()
    with pytest.raises(CAError, match=f"{name} does not exist"):
        LocalCA.load(tmp_path / "ca")


def test_load_directory_where_file_expected(ca: LocalCA, tmp_path: Path) -> None:
    (tmp_path / "ca" / "ca.key").unlink()
    (tmp_path / "ca" / "ca.key").mkdir()
    with pytest.raises(CAError, match="is a directory"):
        LocalCA.load(tmp_path / "ca")


def test_load_corrupt_key(ca: LocalCA, tmp_path: Path) -> None:
    (tmp_path / "ca" / "ca.key").write_bytes(
        b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n"
    )
    with pytest.raises(CAError, match="not a readable PEM private key") as e:
        LocalCA.load(tmp_path / "ca")
    assert "garbage" not in str(e.value)


def test_load_corrupt_cert(ca: LocalCA, tmp_path: Path) -> None:
    (tmp_path / "ca" / "ca.crt").write_bytes(b"hello")
    with pytest.raises(CAError, match="no valid PEM certificate"):
        LocalCA.load(tmp_path / "ca")


def test_load_key_not_matching_cert(tmp_path: Path) -> None:
    LocalCA.init(tmp_path / "a", TD)
    LocalCA.init(tmp_path / "b", TD)
    shutil.copy(tmp_path / "b" / "ca.key", tmp_path / "a" / "ca.key")
    with pytest.raises(CAError, match="does not match"):
        LocalCA.load(tmp_path / "a")


def test_load_rsa_key_refused(ca: LocalCA, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ca" / "ca.key").write_bytes(pem)
    with pytest.raises(CAError, match="not an ECDSA P-256 key"):
        LocalCA.load(tmp_path / "ca")


def test_load_refuses_leaf_as_ca(ca: LocalCA, tmp_path: Path) -> None:
    issued = ca.issue(WEB)
    d = tmp_path / "fake"
    d.mkdir()
    (d / "ca.crt").write_bytes(issued.cert_pem)
    (d / "ca.key").write_bytes(issued.key_pem)
    with pytest.raises(CAError, match="not a CA certificate"):
        LocalCA.load(d)


# --- issue ----------------------------------------------------------------------------------------


def test_issue_leaf_profile(ca: LocalCA) -> None:
    issued = ca.issue(WEB, ttl=timedelta(hours=1), now=datetime.now(UTC))
    chain = load_pem_certificates(issued.cert_pem)
    assert len(chain) == 2 and chain[1] == ca.cert
    assert issued.ca_pem == ca.cert_pem
    leaf = chain[0]
    assert spiffe_id_from_cert(leaf) == WEB == issued.spiffe_id
    assert len(leaf.subject) == 0
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(WEB.uri)]
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert 0 < leaf.serial_number < 2**159
    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert issued.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert key.public_key() == leaf.public_key()
    assert issued.not_before.tzinfo is not None and issued.not_after.tzinfo is not None


def test_issue_times(ca: LocalCA) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    issued = ca.issue(WEB, ttl=timedelta(hours=24), now=now)
    assert issued.not_before == now - timedelta(minutes=5)
    assert issued.not_after == now + timedelta(hours=24)


def test_serials_are_random_and_distinct(ca: LocalCA) -> None:
    serials = {leaf_of(ca.issue(WEB).cert_pem).serial_number for _ in range(20)}
    assert len(serials) == 20
    assert max(serials).bit_length() > 140


def test_ttl_capped_at_root_expiry(tmp_path: Path) -> None:
    local = LocalCA.init(tmp_path / "ca", TD, now=T0, validity=timedelta(days=1))
    issued = local.issue(WEB, ttl=timedelta(days=30), now=T0 + timedelta(hours=12))
    assert issued.not_after == local.cert.not_valid_after_utc == T0 + timedelta(days=1)
    assert leaf_of(issued.cert_pem).not_valid_after_utc == issued.not_after


def test_issue_refuses_after_root_expiry(tmp_path: Path) -> None:
    local = LocalCA.init(tmp_path / "ca", TD, now=T0, validity=timedelta(days=1))
    with pytest.raises(CAError, match="root expired"):
        local.issue(WEB, now=T0 + timedelta(days=2))


def test_issue_refuses_other_trust_domain(ca: LocalCA) -> None:
    with pytest.raises(CAError, match=re.escape("outside this CA's trust domain 'mesh.local'")):
        ca.issue(SpiffeId("evil.example", "default", "web"))


@pytest.mark.parametrize("ttl", [timedelta(0), timedelta(seconds=-1)])
def test_issue_refuses_non_positive_ttl(ca: LocalCA, ttl: timedelta) -> None:
    with pytest.raises(CAError, match="positive"):
        ca.issue(WEB, ttl=ttl)


def test_issue_requires_aware_now(ca: LocalCA) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        ca.issue(WEB, now=datetime(2030, 1, 1))


def test_repr_never_shows_keys(ca: LocalCA) -> None:
    issued = ca.issue(WEB)
    assert b"PRIVATE" not in repr(issued).encode()
    assert "PRIVATE" not in repr(ca)


def test_leaf_passes_strict_x509_verification_api(ca: LocalCA) -> None:
    """cryptography's WebPKI-style verifier (like rustls's) accepts the profile as a client cert."""
    leaf = leaf_of(ca.issue(WEB).cert_pem)
    verifier = PolicyBuilder().store(Store([ca.cert])).build_client_verifier()
    verified = verifier.verify(leaf, [])
    assert verified.subjects == [x509.UniformResourceIdentifier(WEB.uri)]


# --- sign_csr -------------------------------------------------------------------------------------


def make_csr(key: ec.EllipticCurvePrivateKey, uri: str = "spiffe://ignored/ns/x/sa/y") -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "requested")]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def test_sign_csr_happy_path(ca: LocalCA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.sign_csr(make_csr(key), WEB, ttl=timedelta(hours=2))
    assert issued.key_pem == b""
    leaf = leaf_of(issued.cert_pem)
    assert leaf.public_key() == key.public_key()
    assert spiffe_id_from_cert(leaf) == WEB  # the requested SAN is ignored
    assert len(leaf.subject) == 0  # so is the requested subject
    verify_chain(leaf, [ca.cert])


def test_sign_csr_bad_signature(ca: LocalCA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_pem_x509_csr(make_csr(key))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # flip a bit inside the ECDSA signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CAError, match="signature does not verify"):
        ca.sign_csr(tampered, WEB)


def test_sign_csr_tampered_body(ca: LocalCA) -> None:
    """Swap the public key for another one: the CSR no longer proves possession."""
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    der = x509.load_pem_x509_csr(make_csr(key)).public_bytes(serialization.Encoding.DER)
    pub = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    opub = other.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert der.count(pub) == 1
    tampered = x509.load_der_x509_csr(der.replace(pub, opub)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CAError, match="signature does not verify"):
        ca.sign_csr(tampered, WEB)


def test_sign_csr_garbage_and_wrong_curve_and_wrong_domain(ca: LocalCA) -> None:
    with pytest.raises(CAError, match="not a valid PEM certificate signing request"):
        ca.sign_csr(b"nonsense", WEB)
    with pytest.raises(CAError, match="P-256"):
        ca.sign_csr(make_csr(ec.generate_private_key(ec.SECP384R1())), WEB)
    with pytest.raises(CAError, match="outside this CA's trust domain"):
        ca.sign_csr(make_csr(ec.generate_private_key(ec.SECP256R1())), SpiffeId("other", "a", "b"))


# --- write_issued / read_issued -------------------------------------------------------------------


def test_write_read_round_trip(ca: LocalCA, tmp_path: Path) -> None:
    issued = ca.issue(WEB)
    out = tmp_path / "out" / "web"
    write_issued(issued, out)
    assert mode(out) == 0o700
    assert mode(out / "key.pem") == 0o600
    back = read_issued(out)
    assert back == issued
    # rewriting (rotation) replaces files in place and keeps the key 0600
    again = ca.issue(WEB)
    write_issued(again, out)
    assert read_issued(out) == again
    assert mode(out / "key.pem") == 0o600
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "cert.pem", "key.pem"]


def test_write_issued_refuses_result_without_key(ca: LocalCA, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.sign_csr(make_csr(key), WEB)
    with pytest.raises(CAError, match="no private key"):
        write_issued(issued, tmp_path / "out")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_issued(dataclasses.replace(issued, key_pem=pem), tmp_path / "out")
    assert read_issued(tmp_path / "out").spiffe_id == WEB


def test_read_issued_errors(ca: LocalCA, tmp_path: Path) -> None:
    with pytest.raises(CAError, match="does not exist"):
        read_issued(tmp_path / "missing")
    a, b = tmp_path / "a", tmp_path / "b"
    write_issued(ca.issue(WEB), a)
    write_issued(ca.issue(WEB), b)
    shutil.copy(b / "key.pem", a / "key.pem")
    with pytest.raises(CAError, match="does not match"):
        read_issued(a)
    (b / "ca.crt").unlink()
    with pytest.raises(CAError, match=r"ca\.crt does not exist"):
        read_issued(b)


def test_read_issued_without_spiffe_id(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plain")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(T0)
        .not_valid_after(T0 + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    d = tmp_path / "plain"
    d.mkdir()
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(CAError, match="no usable SPIFFE ID"):
        read_issued(d)


# --- verify_chain / describe ----------------------------------------------------------------------


def test_verify_chain_refuses_other_ca(ca: LocalCA, tmp_path: Path) -> None:
    other = LocalCA.init(tmp_path / "other", TD)  # same trust domain, same subject name, different key
    leaf = leaf_of(other.issue(WEB).cert_pem)
    with pytest.raises(CAError, match="not issued by any of the 1 trusted root"):
        verify_chain(leaf, [ca.cert])
    verify_chain(leaf, [ca.cert, other.cert])  # a bundle with both roots accepts it


def test_verify_chain_refuses_expired_and_not_yet_valid(ca: LocalCA) -> None:
    now = datetime.now(UTC)
    leaf = leaf_of(ca.issue(WEB, ttl=timedelta(hours=1), now=now).cert_pem)
    verify_chain(leaf, [ca.cert], now=now + timedelta(minutes=30))
    with pytest.raises(CAError, match="expired"):
        verify_chain(leaf, [ca.cert], now=now + timedelta(hours=2))
    with pytest.raises(CAError, match="not valid before"):
        verify_chain(leaf, [ca.cert], now=now - timedelta(hours=1))


def test_verify_chain_refuses_empty_bundle(ca: LocalCA) -> None:
    with pytest.raises(CAError, match="no root"):
        verify_chain(leaf_of(ca.issue(WEB).cert_pem), [])


def test_describe_certificate(ca: LocalCA) -> None:
    leaf = leaf_of(ca.issue(WEB).cert_pem)
    info = describe_certificate(leaf)
    assert info.spiffe_id == WEB.uri
    assert info.subject == ""
    assert info.issuer == f"CN=meshd root CA {TD},O=meshd"
    assert not info.is_ca and info.serial == leaf.serial_number
    assert info.fingerprint_sha256 == leaf.fingerprint(hashes.SHA256()).hex(":").upper()
    root = describe_certificate(ca.cert)
    assert root.is_ca and root.spiffe_id == f"spiffe://{TD}"


def test_load_pem_certificates_refuses_garbage() -> None:
    with pytest.raises(CAError, match="no valid PEM certificate"):
        load_pem_certificates(b"")


# --- openssl agrees -------------------------------------------------------------------------------


@needs_openssl
def test_openssl_verifies_issued_chain(ca: LocalCA, tmp_path: Path) -> None:
    out = tmp_path / "web"
    write_issued(ca.issue(WEB), out)
    ca_file = tmp_path / "ca" / "ca.crt"
    r = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_file), str(out / "cert.pem")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(": OK")
    for purpose in ("sslclient", "sslserver"):
        r = subprocess.run(
            ["openssl", "verify", "-purpose", purpose, "-CAfile", str(ca_file), str(out / "cert.pem")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert r.returncode == 0, (purpose, r.stdout, r.stderr)
    r = subprocess.run(
        ["openssl", "x509", "-in", str(out / "cert.pem"), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "critical" in r.stdout
    assert f"URI:{WEB.uri}" in r.stdout
    r = subprocess.run(
        ["openssl", "x509", "-in", str(out / "cert.pem"), "-noout", "-fingerprint", "-sha256"],
        capture_output=True,
        text=True,
        check=True,
    )
    fp = describe_certificate(leaf_of((out / "cert.pem").read_bytes())).fingerprint_sha256
    assert r.stdout.strip().split("=", 1)[1] == fp
    # the key file is the leaf's key, as openssl sees it
    pub_from_key = subprocess.run(
        ["openssl", "pkey", "-in", str(out / "key.pem"), "-pubout"], capture_output=True, check=True
    ).stdout
    pub_from_cert = subprocess.run(
        ["openssl", "x509", "-in", str(out / "cert.pem"), "-noout", "-pubkey"],
        capture_output=True,
        check=True,
    ).stdout
    assert pub_from_key == pub_from_cert


@needs_openssl
def test_openssl_rejects_leaf_from_other_ca(ca: LocalCA, tmp_path: Path) -> None:
    other = LocalCA.init(tmp_path / "other", TD)
    write_issued(other.issue(WEB), tmp_path / "web")
    r = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "ca" / "ca.crt"), str(tmp_path / "web" / "cert.pem")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode != 0


@needs_openssl
def test_sign_csr_from_openssl(ca: LocalCA, tmp_path: Path) -> None:
    """A CSR made by openssl (the key stays with openssl) is certified and verifies."""
    key, csr = tmp_path / "k.pem", tmp_path / "r.csr"
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=node", "-out", str(csr)],
        check=True,
        capture_output=True,
    )
    issued = ca.sign_csr(csr.read_bytes(), WEB)
    (tmp_path / "cert.pem").write_bytes(issued.cert_pem)
    r = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "ca" / "ca.crt"), str(tmp_path / "cert.pem")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
