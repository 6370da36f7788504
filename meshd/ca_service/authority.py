"""Who may get which certificate: the CA service's decisions, with every issuance and refusal logged.

Rules:
- Enrollment needs a valid token (see `token`): it certifies the node identity the token names and
  records the node with the workloads the token lists. The token is marked used in the same locked
  transaction that checks it, so two concurrent uses cannot both succeed.
- A node (authenticated by its node certificate over mTLS) may renew its own node identity and get
  certificates for the workloads it is authorized for: those of its token, plus those of the CA's
  `[ca.nodes.NAME] workloads` table. A revoked node gets nothing (its certificates die at expiry).
- Only the public key of a CSR is used; the identity comes from these rules, never from the CSR.
No trio here: it runs in the event loop between awaits (a signature costs well under a millisecond).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from meshd.ca_service.store import CaStore, NodeRecord
from meshd.ca_service.token import TokenClaims, TokenError, fingerprint, mint, verify
from meshd.identity.ca import CAError, IssuedCert, LocalCA, trust_bundle
from meshd.identity.spiffe import InvalidSpiffeId, SpiffeId

log = logging.getLogger("meshd.ca")

NodeTable = Callable[[], Mapping[str, Sequence[str]]]  # node name -> "ns/sa" workloads (from config)


class Refused(Exception):
    """The CA refuses the request; the message says why (it is also logged on the CA)."""


@dataclass(frozen=True)
class Enrolled:
    node: str
    issued: IssuedCert  # the node certificate (no key: the key stayed on the node)


def workload_id(trust_domain: str, text: str) -> SpiffeId:
    """`ns/sa` -> the workload's SPIFFE ID; InvalidSpiffeId if malformed."""
    ns, sep, sa = text.partition("/")
    if not sep:
        raise InvalidSpiffeId(f"{text!r} is not namespace/service-account")
    return SpiffeId.parse(f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}")


class CaAuthority:
    def __init__(
        self,
        directory: Path,
        ttl: timedelta,
        node_table: NodeTable = dict,
        count: Callable[[str, str], None] = lambda kind, result: None,
    ) -> None:
        self.directory = Path(directory)
        self.ttl = ttl
        self.node_table = node_table
        self.store = CaStore(self.directory)
        self.count = count  # (kind: enroll | sign, result: issued | refused) -> metrics

    def ca(self) -> LocalCA:
        """Loaded per request: a rotation on disk applies at once."""
        return LocalCA.load(self.directory)

    def bundle(self) -> bytes:
        return trust_bundle(self.directory)

    # ---- CLI side --------------------------------------------------------------------------------
    def mint_token(
        self, node: str, workloads: Sequence[str], ttl: timedelta, address: str, *, now: float | None = None
    ) -> str:
        ca = self.ca()
        for w in workloads:
            try:
                workload_id(ca.trust_domain, w)
            except InvalidSpiffeId as exc:
                raise CAError(
                    f"--workloads: {exc} (write namespace/service-account, e.g. default/echo)"
                ) from None
        claims = TokenClaims(
            id=secrets.token_hex(16),
            node=node,
            workloads=tuple(workloads),
            expires=int((time.time() if now is None else now) + ttl.total_seconds()),
            fingerprint=fingerprint(ca.cert),
            address=address,
            trust_domain=ca.trust_domain,
        )
        return mint(self.store.token_key(create=True), claims)

    def revoke(self, node: str, *, undo: bool = False) -> None:
        with self.store.transaction() as state:
            rec = state.nodes.get(node)
            if rec is None:
                if undo:
                    raise CAError(f"node {node!r} was never enrolled here")
                rec = state.nodes[node] = NodeRecord()
            rec.revoked = not undo
        log.warning("CA: node %s %s", node, "reinstated" if undo else "revoked: no more renewals")

    # ---- service side ----------------------------------------------------------------------------
    def enroll(self, token_text: str, csr_pem: bytes, *, now: datetime, peer: str) -> Enrolled:
        try:
            ca = self.ca()
            key = self.store.token_key()
            with self.store.transaction() as state:
                state.used_tokens = {k: v for k, v in state.used_tokens.items() if v > now.timestamp()}
                claims = verify(
                    key,
                    token_text,
                    now=now.timestamp(),
                    used=state.used_tokens,
                    ca_fingerprint=fingerprint(ca.cert),
                )
                node_id = SpiffeId.node(ca.trust_domain, claims.node)
                issued = ca.sign_csr(csr_pem, node_id, ttl=self.ttl, now=now)
                state.used_tokens[claims.id] = claims.expires
                state.nodes[claims.node] = NodeRecord(
                    workloads=list(claims.workloads), revoked=False, enrolled_at=now.isoformat()
                )
            issued = _with_bundle(issued, self.bundle())
        except (TokenError, CAError, InvalidSpiffeId) as exc:
            log.warning("CA refused enrollment from %s: %s", peer, exc, extra={"peer": peer})
            self.count("enroll", "refused")
            raise Refused(str(exc)) from None
        self.count("enroll", "issued")
        log.info(
            "CA enrolled node %s",
            claims.node,
            extra={"peer": peer, "identity": node_id.uri, "not_after": issued.not_after.isoformat()},
        )
        return Enrolled(claims.node, issued)

    def authorized(self, node: str, trust_domain: str) -> set[SpiffeId]:
        """Identities `node` may hold: its own, its token's workloads, the config table's."""
        rec = self.store.read().nodes.get(node)
        names = list(self.node_table().get(node, ()))
        if rec is not None:
            names += rec.workloads
        out = {SpiffeId.node(trust_domain, node)} if rec is not None or node in self.node_table() else set()
        for text in names:
            try:
                out.add(workload_id(trust_domain, text))
            except InvalidSpiffeId:
                log.warning("CA: node %s lists an invalid workload %r; ignored", node, text)
        return out

    def sign(self, requester: SpiffeId, identity: SpiffeId, csr_pem: bytes, *, now: datetime) -> IssuedCert:
        """Certify `identity` for the node `requester` (authenticated by mTLS), if it is entitled."""
        where = {"node": requester.uri, "identity": identity.uri}
        try:
            if not requester.is_node:
                raise Refused(
                    f"{requester} is not a meshd node identity; only nodes may request certificates"
                )
            node = requester.service_account.removeprefix("node-")
            try:
                rec = self.store.read().nodes.get(node)
                if rec is not None and rec.revoked:
                    raise Refused(f"node {node!r} is revoked; its certificates are not renewed")
                if identity not in self.authorized(node, requester.trust_domain):
                    raise Refused(
                        f"node {node!r} is not authorized for {identity} "
                        f"(list it in the node's token --workloads, or in [ca.nodes.{node}] workloads)"
                    )
                issued = _with_bundle(
                    self.ca().sign_csr(csr_pem, identity, ttl=self.ttl, now=now), self.bundle()
                )
            except CAError as exc:  # the CA folder is unreadable, or the CSR is bad: this request fails
                raise Refused(str(exc)) from None
        except Refused as exc:
            log.warning("CA refused a certificate: %s", exc, extra=where)
            self.count("sign", "refused")
            raise
        self.count("sign", "issued")
        log.info("CA issued a certificate", extra={**where, "not_after": issued.not_after.isoformat()})
        return issued


def _with_bundle(issued: IssuedCert, bundle: bytes) -> IssuedCert:
    from dataclasses import replace

    return replace(issued, ca_pem=bundle)


def utcnow() -> datetime:
    return datetime.now(UTC)
