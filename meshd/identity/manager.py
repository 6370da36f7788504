"""Keeps a valid certificate for every identity this meshd speaks for.

Theory of operation: each identity gets one certificate at start (start-up fails loudly if it
cannot), then a renewal loop that wakes at the certificate's half-life, asks the source for a new
one and swaps it in. A failed renewal keeps the current certificate and retries with exponential
backoff (capped, and never sleeping past expiry). Wall-clock time (certificate validity) and the
trio clock (sleeping) are both injected, so tests drive a day of renewals with `autojump_clock`.

Consumers (TLS contexts) read `certificate(id)` when they build a context and compare `generation`
to notice a renewal: new connections use the new certificate, open ones keep theirs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import trio

from meshd.errors import UserFacingError
from meshd.identity.ca import CAError, IssuedCert, LocalCA, read_issued, trust_bundle
from meshd.identity.spiffe import SpiffeId

log = logging.getLogger("meshd.identity")

WallClock = Callable[[], datetime]
WATCH_INTERVAL = 5.0  # seconds between checks of a cert_dir for replaced certificate files


def system_wall_clock() -> datetime:
    return datetime.now(UTC)


class IdentityError(UserFacingError):
    """A certificate could not be obtained; the message says why and what to do."""


class CertSource(Protocol):
    def describe(self) -> str: ...

    async def fetch(self, identity: SpiffeId, now: datetime) -> IssuedCert: ...


class LocalCASource:
    """Issues from a CA folder on this host (`identity.ca_dir`): single-host and demo set-ups."""

    def __init__(self, ca_dir: Path, ttl: timedelta) -> None:
        self.ca_dir = ca_dir
        self.ttl = ttl

    def describe(self) -> str:
        return f"local CA {self.ca_dir}"

    async def fetch(self, identity: SpiffeId, now: datetime) -> IssuedCert:
        # Re-read each time: a CA rotated on disk is picked up at the next renewal. This is sync
        # file I/O plus one P-256 key: well under a millisecond, so not worth a worker thread.
        try:
            issued = LocalCA.load(self.ca_dir).issue(identity, ttl=self.ttl, now=now)
            # The bundle holds every trusted root (two during a rotation), not only the signing one.
            return dataclasses.replace(issued, ca_pem=trust_bundle(self.ca_dir))
        except CAError as exc:
            raise IdentityError(str(exc)) from None


class CertDirSource:
    """Reads certificates issued elsewhere: `cert_dir/<namespace>.<sa>/{cert.pem,key.pem,ca.crt}`."""

    def __init__(self, cert_dir: Path) -> None:
        self.cert_dir = cert_dir
        self._seen: dict[SpiffeId, tuple[tuple[str, int, int], ...]] = {}

    def describe(self) -> str:
        return f"certificate folder {self.cert_dir}"

    def folder(self, identity: SpiffeId) -> Path:
        return self.cert_dir / f"{identity.namespace}.{identity.service_account}"

    def changed(self, identity: SpiffeId) -> bool:
        """Have the identity's files changed since the last call (or the last fetch)?"""
        now = self._fingerprint(identity)
        before = self._seen.get(identity)
        self._seen[identity] = now
        return before is not None and now != before

    def _fingerprint(self, identity: SpiffeId) -> tuple[tuple[str, int, int], ...]:
        out = []
        for name in ("cert.pem", "key.pem", "ca.crt"):
            try:
                st = (self.folder(identity) / name).stat()
            except OSError:
                continue
            out.append((name, st.st_mtime_ns, st.st_size))
        return tuple(out)

    async def fetch(self, identity: SpiffeId, now: datetime) -> IssuedCert:
        folder = self.folder(identity)
        self._seen[identity] = self._fingerprint(identity)
        try:
            issued = read_issued(folder)
        except CAError as exc:
            raise IdentityError(str(exc)) from None  # the CA error already names the file
        if issued.spiffe_id != identity:
            raise IdentityError(f"{folder}/cert.pem is for {issued.spiffe_id}, expected {identity}")
        if issued.not_after <= now:
            raise IdentityError(f"{folder}/cert.pem expired at {issued.not_after.isoformat()} (replace it)")
        return issued


@dataclass
class IdentityStatus:
    certificate: IssuedCert
    renewals: int = 0
    failures: int = 0
    last_error: str | None = None


class IdentityManager:
    def __init__(
        self,
        source: CertSource,
        identities: Iterable[SpiffeId],
        *,
        wall_clock: WallClock = system_wall_clock,
        renew_fraction: float = 0.5,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
    ) -> None:
        self.source = source
        self.identities = tuple(dict.fromkeys(identities))
        self.wall_clock = wall_clock
        self.renew_fraction = renew_fraction
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._status: dict[SpiffeId, IdentityStatus] = {}
        self.generation = 0  # bumped on every swap: TLS context caches key on it
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    # ---- reading -------------------------------------------------------------------------------
    def certificate(self, identity: SpiffeId) -> IssuedCert:
        try:
            return self._status[identity].certificate
        except KeyError:
            raise IdentityError(f"meshd holds no certificate for {identity}") from None

    def has(self, identity: SpiffeId) -> bool:
        return identity in self._status

    def statistics(self) -> dict[str, IdentityStatus]:
        return {str(i): s for i, s in self._status.items()}

    def update_bundle(self, ca_pem: bytes) -> bool:
        """Trust a new set of roots (a CA rotation) for every held certificate; new TLS contexts pick it
        up, open connections keep theirs. Returns False if the bundle was already in use."""
        changed = False
        for status in self._status.values():
            if status.certificate.ca_pem != ca_pem:
                status.certificate = dataclasses.replace(status.certificate, ca_pem=ca_pem)
                changed = True
        if changed:
            self.generation += 1
            self._changed.set()
            self._changed = trio.Event()
        return changed

    async def wait_changed(self) -> None:
        await self._changed.wait()

    # ---- running -------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for identity in self.identities:
            try:
                self._swap(identity, await self.source.fetch(identity, self.wall_clock()), first=True)
            except IdentityError as exc:
                raise IdentityError(
                    f"cannot get a certificate for {identity} from {self.source.describe()}: {exc}"
                ) from None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for identity in self.identities:
                nursery.start_soon(self._renew_forever, identity)
            task_status.started()

    async def add(self, identities: Iterable[SpiffeId]) -> None:
        """Hold certificates for more identities (a reload added workloads); raises IdentityError,
        leaving the manager as it was, if any cannot be had."""
        if self._nursery is None:
            raise RuntimeError("IdentityManager.run() is not running")
        new = [i for i in dict.fromkeys(identities) if i not in self._status]
        issued = [(i, await self.source.fetch(i, self.wall_clock())) for i in new]
        for identity, cert in issued:
            self._swap(identity, cert, first=True)
            self._nursery.start_soon(self._renew_forever, identity)
        self.identities += tuple(new)

    def renewal_delay(self, cert: IssuedCert) -> float:
        lifetime = cert.not_after - cert.not_before
        due = cert.not_before + lifetime * self.renew_fraction
        return max(0.0, (due - self.wall_clock()).total_seconds())

    async def _wait_until_due(self, identity: SpiffeId, cert: IssuedCert) -> None:
        """Sleep until the certificate's renewal time, or until the source says its files changed
        (a cert_dir whose certificate was replaced is re-read within WATCH_INTERVAL)."""
        changed = getattr(self.source, "changed", None)
        while (delay := self.renewal_delay(cert)) > 0:
            if changed is None:
                await trio.sleep(delay)
                return
            await trio.sleep(min(delay, WATCH_INTERVAL))
            if changed(identity):
                log.info("certificate files changed; re-reading", extra={"identity": str(identity)})
                return

    async def _renew_forever(self, identity: SpiffeId) -> None:
        while True:
            status = self._status[identity]
            await self._wait_until_due(identity, status.certificate)
            backoff = self.retry_initial
            while True:
                try:
                    new = await self.source.fetch(identity, self.wall_clock())
                except IdentityError as exc:
                    status.failures += 1
                    status.last_error = str(exc)
                    left = (status.certificate.not_after - self.wall_clock()).total_seconds()
                    log.warning(
                        "certificate renewal failed; keeping the current one",
                        extra={"identity": str(identity), "error": str(exc), "expires_in_s": int(left)},
                    )
                    await trio.sleep(max(0.05, min(backoff, max(left, 0.0) / 2 or backoff)))
                    backoff = min(backoff * 2, self.retry_max)
                    continue
                self._swap(identity, new)
                break

    def _swap(self, identity: SpiffeId, cert: IssuedCert, *, first: bool = False) -> None:
        old = self._status.get(identity)
        if old is None:
            self._status[identity] = IdentityStatus(cert)
        else:
            old.certificate = cert
            old.renewals += 1
            old.last_error = None
        self.generation += 1
        self._changed.set()
        self._changed = trio.Event()
        log.info(
            "certificate issued" if first else "certificate renewed",
            extra={"identity": str(identity), "not_after": cert.not_after.isoformat()},
        )


def source_for(ca_dir: Path | None, cert_dir: Path | None, ttl: timedelta) -> CertSource:
    if ca_dir is not None:
        return LocalCASource(ca_dir, ttl)
    if cert_dir is not None:
        return CertDirSource(cert_dir)
    raise IdentityError("no identity source: set identity.ca_dir or identity.cert_dir")
