"""The mesh CA: a local root that issues short-lived SPIFFE workload certificates.

Theory of operation
-------------------
A CA is a directory holding `ca.crt` (the self-signed root, also the trust bundle) and `ca.key`
(its ECDSA P-256 key, mode 0600). The root names its trust domain in a URI SAN `spiffe://<td>`;
`LocalCA.load` reads the trust domain back from there, so the directory is all the state there is.

Every leaf has the same profile whether its key was made here (`issue`) or on the node (`sign_csr`):
an empty subject, a critical SAN with exactly one `spiffe://` URI, CA=false, digitalSignature,
serverAuth+clientAuth, AKI/SKI, a random 159-bit serial, and a lifetime that starts five minutes in
the past (clock skew) and never outlasts the root.

Rules: key material is never logged or put in an exception message. Private keys are written through
`os.open(..., 0o600)` into a temporary file that is renamed into place, so a key file is never
world-readable, not even briefly, and readers never see a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshd.identity.spiffe import (
    InvalidSpiffeId,
    SpiffeId,
    spiffe_id_from_cert,
    spiffe_uris,
    validate_trust_domain,
)

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
BUNDLE_FILE = "ca.crt"

CLOCK_SKEW = timedelta(minutes=5)
DEFAULT_TTL = timedelta(hours=24)
DEFAULT_ROOT_VALIDITY = timedelta(days=3650)


class CAError(Exception):
    """A CA operation failed. The message is for the user: what is wrong (what to do)."""


@dataclass(frozen=True)
class IssuedCert:
    spiffe_id: SpiffeId
    cert_pem: bytes  # leaf certificate followed by the CA certificate (the chain)
    key_pem: bytes  # PKCS#8 PEM, unencrypted, ECDSA P-256; b"" when issued from a CSR
    ca_pem: bytes  # trust bundle: the root certificate(s) PEM
    not_before: datetime  # tz-aware UTC
    not_after: datetime  # tz-aware UTC

    def __repr__(self) -> str:  # never show key material, even in a debugger or a failed assert
        return (
            f"IssuedCert(spiffe_id={self.spiffe_id.uri!r}, not_before={self.not_before.isoformat()}, "
            f"not_after={self.not_after.isoformat()})"
        )


@dataclass(frozen=True)
class CertificateInfo:
    spiffe_id: str | None  # the spiffe:// URI SAN(s), comma-separated if there are several
    subject: str
    issuer: str
    not_before: datetime
    not_after: datetime
    fingerprint_sha256: str  # AB:CD:..., like `openssl x509 -fingerprint -sha256`
    is_ca: bool
    serial: int


# --- small helpers --------------------------------------------------------------------------------


def _utcnow(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (use datetime.now(UTC))")
    return now.astimezone(UTC)


def _read(path: Path, what: str, hint: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CAError(f"{what} {path} does not exist ({hint})") from None
    except IsADirectoryError:
        raise CAError(f"{what} {path} is a directory, not a file ({hint})") from None
    except OSError as e:
        raise CAError(
            f"cannot read {what} {path}: {e.strerror} (check the path and its permissions)"
        ) from None


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a fresh temp file created with `mode` by os.open, then rename it over `path`.

    The file never exists with looser permissions than `mode` (0600 for keys), and readers see either
    the old content or the new, never a half-written file.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # os.open's mode is filtered by the umask; set exactly what we mean
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _make_dir(directory: Path, what: str) -> None:
    if directory.exists() and not directory.is_dir():
        raise CAError(f"{what} {directory} exists but is not a directory (choose another path)")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise CAError(
            f"cannot create {what} {directory}: {e.strerror} (check the path and its permissions)"
        ) from None


def _require_dir(directory: Path, what: str, hint: str) -> None:
    if not directory.exists():
        raise CAError(f"{what} {directory} does not exist ({hint})")
    if not directory.is_dir():
        raise CAError(f"{what} {directory} is not a directory ({hint})")


def _load_key(data: bytes, path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CAError(f"private key {path} is encrypted (meshd needs an unencrypted PKCS#8 key)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CAError(
            f"{path} is not a readable PEM private key (the file is corrupt or of another kind)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CAError(f"private key {path} is not an ECDSA P-256 key (meshd uses P-256 keys only)")
    return key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """All certificates in a PEM blob, in order. CAError if there is none or one is malformed."""
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CAError(
            "no valid PEM certificate found (expected '-----BEGIN CERTIFICATE-----' blocks; "
            "the file may be corrupt, DER-encoded, or a key)"
        ) from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def describe_certificate(cert: x509.Certificate) -> CertificateInfo:
    uris = spiffe_uris(cert)
    return CertificateInfo(
        spiffe_id=", ".join(uris) if uris else None,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        is_ca=_is_ca(cert),
        serial=cert.serial_number,
    )


def _validity_error(cert: x509.Certificate, now: datetime, what: str) -> str | None:
    if now < cert.not_valid_before_utc:
        return (
            f"{what} is not valid before {cert.not_valid_before_utc.isoformat()} "
            "(check the clock on this host and on the CA)"
        )
    if now > cert.not_valid_after_utc:
        return f"{what} expired at {cert.not_valid_after_utc.isoformat()} (issue a new one)"
    return None


def verify_chain(
    leaf: x509.Certificate, roots: list[x509.Certificate], *, now: datetime | None = None
) -> None:
    """Raise CAError unless `leaf` is signed directly by one of `roots` and both are valid at `now`."""
    at = _utcnow(now)
    if not roots:
        raise CAError("the trust bundle holds no root certificate (pass the CA's ca.crt)")
    for root in roots:
        try:
            leaf.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        problem = _validity_error(leaf, at, "certificate") or _validity_error(root, at, "root certificate")
        if problem:
            raise CAError(problem)
        return
    raise CAError(
        f"certificate (issuer {leaf.issuer.rfc4514_string()!r}) was not issued by any of the "
        f"{len(roots)} trusted root(s) (it comes from another CA; issue it from this mesh's CA "
        "or add that CA's root to the trust bundle)"
    )


# --- the CA ---------------------------------------------------------------------------------------


class LocalCA:
    """A root CA kept in a directory (`ca.crt`, `ca.key`)."""

    trust_domain: str
    cert: x509.Certificate
    cert_pem: bytes

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, trust_domain: str) -> None:
        self.cert = cert
        self.cert_pem = _cert_pem(cert)
        self.trust_domain = trust_domain
        self._key = key

    def __repr__(self) -> str:
        end = self.cert.not_valid_after_utc.isoformat()
        return f"LocalCA(trust_domain={self.trust_domain!r}, not_after={end})"

    @classmethod
    def init(
        cls,
        directory: Path,
        trust_domain: str,
        *,
        force: bool = False,
        now: datetime | None = None,
        validity: timedelta = DEFAULT_ROOT_VALIDITY,
    ) -> LocalCA:
        """Create a new self-signed root in `directory` and write ca.crt and ca.key (0600)."""
        try:
            validate_trust_domain(trust_domain)
        except InvalidSpiffeId as e:
            raise CAError(f"{e} (e.g. --trust-domain mesh.local)") from None
        if validity <= timedelta(0):
            raise CAError("root validity must be positive (e.g. 3650 days)")
        at = _utcnow(now)
        directory = Path(directory)
        _make_dir(directory, "CA directory")
        key_path = directory / CA_KEY_FILE
        if key_path.exists() and not force:
            raise CAError(
                f"a CA key already exists at {key_path} (use it as it is, or pass --force to replace it; "
                "certificates issued by the old root will stop verifying)"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshd"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"meshd root CA {trust_domain}"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(at - CLOCK_SKEW)
            .not_valid_after(at + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        try:
            _write_file(key_path, _key_pem(key), 0o600)
            _write_file(directory / CA_CERT_FILE, _cert_pem(cert), 0o644)
        except OSError as e:
            raise CAError(
                f"cannot write the CA into {directory}: {e.strerror} (check the directory's permissions)"
            ) from None
        return cls(cert, key, trust_domain)

    @classmethod
    def load(cls, directory: Path) -> LocalCA:
        """Load the CA from `directory`; CAError says what is missing or inconsistent."""
        directory = Path(directory)
        hint = f"create a CA with: meshd ca init --dir {directory} --trust-domain <td>"
        _require_dir(directory, "CA directory", hint)
        cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        cert_data = _read(cert_path, "CA certificate", hint)
        key_data = _read(key_path, "CA key", hint)
        try:
            certs = load_pem_certificates(cert_data)
        except CAError as e:
            raise CAError(f"{cert_path}: {e}") from None
        cert = certs[0]
        key = _load_key(key_data, key_path)
        if key.public_key() != cert.public_key():
            raise CAError(
                f"CA key {key_path} does not match the certificate {cert_path} "
                "(restore the matching pair from backup, or re-create the CA with --force)"
            )
        if not _is_ca(cert):
            raise CAError(
                f"{cert_path} is not a CA certificate (point --dir at a directory made by 'meshd ca init')"
            )
        roots = [u for u in spiffe_uris(cert) if u.count("/") == 2]
        if len(roots) != 1:
            raise CAError(
                f"{cert_path} does not name its trust domain in a spiffe://<td> URI SAN "
                "(point --dir at a directory made by 'meshd ca init')"
            )
        trust_domain = roots[0].removeprefix("spiffe://")
        try:
            validate_trust_domain(trust_domain)
        except InvalidSpiffeId as e:
            raise CAError(f"{cert_path}: {e} (re-create the CA with a valid trust domain)") from None
        return cls(cert, key, trust_domain)

    def issue(
        self, spiffe_id: SpiffeId, *, ttl: timedelta = DEFAULT_TTL, now: datetime | None = None
    ) -> IssuedCert:
        """A fresh P-256 key and a leaf certificate for `spiffe_id`."""
        self._check_request(spiffe_id, ttl)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign_leaf(key.public_key(), spiffe_id, ttl, _utcnow(now))
        return self._issued(spiffe_id, cert, _key_pem(key))

    def sign_csr(
        self,
        csr_pem: bytes,
        spiffe_id: SpiffeId,
        *,
        ttl: timedelta = DEFAULT_TTL,
        now: datetime | None = None,
    ) -> IssuedCert:
        """Certify the key in a PKCS#10 CSR for `spiffe_id` (the key never leaves the requester).

        The CSR only contributes its public key: the subject, SANs and extensions it asks for are
        ignored, because the identity comes from the caller, who must have authenticated the requester.
        """
        self._check_request(spiffe_id, ttl)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise CAError(
                "the CSR is not a valid PEM certificate signing request (send a PKCS#10 PEM CSR)"
            ) from None
        try:
            signature_ok = csr.is_signature_valid
        except (ValueError, UnsupportedAlgorithm):
            signature_ok = False
        if not signature_ok:
            raise CAError(
                "the CSR's signature does not verify (the CSR was altered or signed with another key)"
            )
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise CAError("the CSR's key is not an ECDSA P-256 key (generate the key with P-256)")
        cert = self._sign_leaf(public_key, spiffe_id, ttl, _utcnow(now))
        return self._issued(spiffe_id, cert, b"")

    def _check_request(self, spiffe_id: SpiffeId, ttl: timedelta) -> None:
        if spiffe_id.trust_domain != self.trust_domain:
            raise CAError(
                f"{spiffe_id.uri} is outside this CA's trust domain {self.trust_domain!r} "
                f"(use an ID of the form spiffe://{self.trust_domain}/ns/<namespace>/sa/<sa>)"
            )
        if ttl <= timedelta(0):
            raise CAError("the certificate lifetime must be positive (e.g. 24h)")

    def _sign_leaf(
        self, public_key: ec.EllipticCurvePublicKey, spiffe_id: SpiffeId, ttl: timedelta, now: datetime
    ) -> x509.Certificate:
        root_end = self.cert.not_valid_after_utc
        if now >= root_end:
            raise CAError(
                f"the CA root expired at {root_end.isoformat()} "
                "(create a new CA with 'meshd ca init --force')"
            )
        not_before = max(now - CLOCK_SKEW, self.cert.not_valid_before_utc)
        not_after = min(now + ttl, root_end)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id.uri)]), critical=True
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )

    def _issued(self, spiffe_id: SpiffeId, cert: x509.Certificate, key_pem: bytes) -> IssuedCert:
        return IssuedCert(
            spiffe_id=spiffe_id,
            cert_pem=_cert_pem(cert) + self.cert_pem,
            key_pem=key_pem,
            ca_pem=self.cert_pem,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )


# --- trust bundle (several roots during a rotation) ------------------------------------------------

NEXT_DIR = "next"  # a root being introduced: trusted, not yet signing (`meshd ca rotate prepare`)
PREVIOUS_DIR = "previous"  # the root being retired: trusted, no longer signing (key deleted)


def trust_bundle(directory: Path) -> bytes:
    """The roots a CA directory asks nodes to trust: `ca.crt` (the signing root), then `next/ca.crt`
    and `previous/ca.crt` when a rotation is under way. Each is PEM; missing extras are skipped."""
    directory = Path(directory)
    out = _read(directory / CA_CERT_FILE, "CA certificate", f"meshd ca init --dir {directory}")
    for extra in (NEXT_DIR, PREVIOUS_DIR):
        with contextlib.suppress(FileNotFoundError):
            out += (directory / extra / CA_CERT_FILE).read_bytes()
    return out


# --- issued material on disk ----------------------------------------------------------------------


def write_issued(issued: IssuedCert, outdir: Path) -> None:
    """Write cert.pem (chain), key.pem (0600) and ca.crt (bundle) into `outdir` (created 0700)."""
    if not issued.key_pem:
        raise CAError(
            "the issued certificate carries no private key (results of sign_csr have none; "
            "set key_pem to the key the CSR was made with, e.g. dataclasses.replace(issued, key_pem=...))"
        )
    outdir = Path(outdir)
    _make_dir(outdir, "output directory")
    try:
        # Key first: a reader that sees the new cert.pem finds the matching key already in place.
        _write_file(outdir / KEY_FILE, issued.key_pem, 0o600)
        _write_file(outdir / CERT_FILE, issued.cert_pem, 0o644)
        _write_file(outdir / BUNDLE_FILE, issued.ca_pem, 0o644)
    except OSError as e:
        raise CAError(
            f"cannot write certificates into {outdir}: {e.strerror} (check the directory's permissions)"
        ) from None


def read_issued(directory: Path) -> IssuedCert:
    """Read cert.pem, key.pem and ca.crt back from `directory`, checking they belong together."""
    directory = Path(directory)
    hint = (
        f"issue one with: meshd ca issue --dir <ca-dir> --id spiffe://<td>/ns/<ns>/sa/<sa> --out {directory}"
    )
    _require_dir(directory, "certificate directory", hint)
    cert_path, key_path, bundle_path = directory / CERT_FILE, directory / KEY_FILE, directory / BUNDLE_FILE
    cert_data = _read(cert_path, "certificate", hint)
    key_data = _read(key_path, "private key", hint)
    bundle_data = _read(bundle_path, "trust bundle", hint)
    try:
        chain = load_pem_certificates(cert_data)
    except CAError as e:
        raise CAError(f"{cert_path}: {e}") from None
    try:
        load_pem_certificates(bundle_data)
    except CAError as e:
        raise CAError(f"{bundle_path}: {e}") from None
    key = _load_key(key_data, key_path)
    leaf = chain[0]
    if key.public_key() != leaf.public_key():
        raise CAError(
            f"private key {key_path} does not match the certificate {cert_path} "
            "(the files come from different issuances; issue a new certificate)"
        )
    try:
        spiffe_id = spiffe_id_from_cert(leaf)
    except InvalidSpiffeId as e:
        raise CAError(f"{cert_path} has no usable SPIFFE ID: {e} (issue it with 'meshd ca issue')") from None
    return IssuedCert(
        spiffe_id=spiffe_id,
        cert_pem=cert_data,
        key_pem=key_data,
        ca_pem=bundle_data,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
    )
