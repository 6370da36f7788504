"""SPIFFE identities: parsing, formatting, and extraction from certificates.

Pure: no I/O. Two spellings are accepted wherever a user writes an identity:
the full URI `spiffe://<td>/ns/<ns>/sa/<sa>` and Istio's principal form `<td>/ns/<ns>/sa/<sa>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

# DNS-label-ish trust domain (SPIFFE allows lowercase letters, digits, '.', '-', '_').
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
NODE_NAMESPACE = "meshd-system"


class InvalidSpiffeId(ValueError):
    """The text is not a SPIFFE ID of the form meshd uses."""


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse `spiffe://td/ns/NS/sa/SA`; raise InvalidSpiffeId with a reason otherwise."""
        if not text.startswith("spiffe://"):
            raise InvalidSpiffeId(f"{text!r} does not start with spiffe://")
        return cls._parse_path(text[len("spiffe://") :], text)

    @classmethod
    def parse_principal(cls, text: str) -> SpiffeId:
        """Parse Istio's principal spelling `td/ns/NS/sa/SA` (the spiffe:// form is accepted too)."""
        if text.startswith("spiffe://"):
            return cls.parse(text)
        return cls._parse_path(text, text)

    @classmethod
    def _parse_path(cls, path: str, original: str) -> SpiffeId:
        parts = path.split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise InvalidSpiffeId(
                f"{original!r} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<sa>"
            )
        td, _, ns, _, sa = parts
        if not _TRUST_DOMAIN.match(td):
            raise InvalidSpiffeId(
                f"{original!r}: trust domain {td!r} must be lowercase letters, digits, '.', '-', '_'"
            )
        for label, seg in (("namespace", ns), ("service account", sa)):
            if not _SEGMENT.match(seg):
                raise InvalidSpiffeId(
                    f"{original!r}: {label} {seg!r} is empty or has characters outside [A-Za-z0-9._-]"
                )
        return cls(td, ns, sa)

    @classmethod
    def node(cls, trust_domain: str, node_name: str) -> SpiffeId:
        """The identity of a meshd node itself."""
        return cls(trust_domain, NODE_NAMESPACE, f"node-{node_name}")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """Istio's spelling, as written in authorization policies."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def is_node(self) -> bool:
        return self.namespace == NODE_NAMESPACE and self.service_account.startswith("node-")

    def __str__(self) -> str:
        return self.uri


def validate_trust_domain(td: str) -> str:
    if not td or not _TRUST_DOMAIN.match(td):
        raise InvalidSpiffeId(
            f"trust domain {td!r} must be non-empty lowercase letters, digits, '.', '-', '_'"
        )
    return td


def spiffe_uris(cert: x509.Certificate) -> list[str]:
    """All spiffe:// URI SANs of a certificate."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]


def spiffe_id_from_cert(cert: x509.Certificate) -> SpiffeId:
    """The one SPIFFE workload ID of a leaf certificate; raise InvalidSpiffeId if there is not exactly one."""
    uris = spiffe_uris(cert)
    if len(uris) != 1:
        raise InvalidSpiffeId(f"certificate has {len(uris)} spiffe:// URI SANs, expected exactly one")
    return SpiffeId.parse(uris[0])
