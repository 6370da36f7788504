"""Certificate rotation under trio's autojump clock: a day of renewals without a day of waiting."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from meshd.identity.ca import IssuedCert, LocalCA, write_issued
from meshd.identity.manager import CertDirSource, IdentityError, IdentityManager, LocalCASource
from meshd.identity.spiffe import SpiffeId

ECHO = SpiffeId("home.arpa", "default", "echo")
EPOCH = datetime(2026, 11, 27, tzinfo=UTC)


def trio_wall_clock() -> datetime:
    """Wall time that advances with the (autojumping) trio clock."""
    return EPOCH + timedelta(seconds=trio.current_time())


class FlakySource:
    """A LocalCASource that fails while `broken` is set (the CA is unreachable)."""

    def __init__(self, ca_dir: Path, ttl: timedelta) -> None:
        self.inner = LocalCASource(ca_dir, ttl)
        self.broken = False
        self.calls = 0

    def describe(self) -> str:
        return "flaky"

    async def fetch(self, identity: SpiffeId, now: datetime) -> IssuedCert:
        self.calls += 1
        if self.broken:
            raise IdentityError("CA unreachable")
        return await self.inner.fetch(identity, now)


@pytest.fixture
def ca_at_epoch(tmp_path: Path) -> LocalCA:
    return LocalCA.init(tmp_path / "ca", "home.arpa", now=EPOCH - timedelta(days=1))


async def test_renews_at_half_life(ca_at_epoch: LocalCA, tmp_path: Path, autojump_clock: object) -> None:
    source = FlakySource(tmp_path / "ca", timedelta(hours=24))
    mgr = IdentityManager(source, [ECHO], wall_clock=trio_wall_clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr.run)
        first = mgr.certificate(ECHO)
        assert first.not_after - first.not_before == timedelta(hours=24, minutes=5)  # 5 min clock skew
        await trio.sleep(11 * 3600)  # before half-life: no renewal yet
        assert mgr.certificate(ECHO) is first
        await trio.sleep(2 * 3600)
        second = mgr.certificate(ECHO)
        assert second is not first and second.not_after > first.not_after
        # Three days later: a renewal every ~12 h, and never an expired certificate in hand.
        for _ in range(6 * 24):
            await trio.sleep(1800)
            assert mgr.certificate(ECHO).not_after > trio_wall_clock()
        assert mgr.statistics()[str(ECHO)].renewals >= 6
        nursery.cancel_scope.cancel()


async def test_failed_renewal_keeps_the_valid_certificate_and_backs_off(
    ca_at_epoch: LocalCA, tmp_path: Path, autojump_clock: object
) -> None:
    source = FlakySource(tmp_path / "ca", timedelta(hours=24))
    mgr = IdentityManager(source, [ECHO], wall_clock=trio_wall_clock, retry_initial=1.0, retry_max=600.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr.run)
        first = mgr.certificate(ECHO)
        source.broken = True
        await trio.sleep(13 * 3600)  # past half-life, renewals failing
        assert mgr.certificate(ECHO) is first
        status = mgr.statistics()[str(ECHO)]
        assert status.failures >= 5 and status.last_error == "CA unreachable"
        calls = source.calls
        await trio.sleep(600)
        assert source.calls - calls <= 3  # backoff: not a busy loop
        source.broken = False
        await trio.sleep(700)  # the next retry succeeds
        assert mgr.certificate(ECHO) is not first
        assert mgr.statistics()[str(ECHO)].last_error is None
        nursery.cancel_scope.cancel()


async def test_generation_changes_on_renewal(
    ca_at_epoch: LocalCA, tmp_path: Path, autojump_clock: object
) -> None:
    mgr = IdentityManager(
        LocalCASource(tmp_path / "ca", timedelta(hours=1)), [ECHO], wall_clock=trio_wall_clock
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr.run)
        gen = mgr.generation
        await mgr.wait_changed()
        assert mgr.generation == gen + 1
        nursery.cancel_scope.cancel()


async def test_start_fails_loudly_without_a_ca(tmp_path: Path) -> None:
    mgr = IdentityManager(LocalCASource(tmp_path / "missing", timedelta(hours=1)), [ECHO])
    with pytest.raises(
        IdentityError, match=re.escape("cannot get a certificate for spiffe://home.arpa/ns/default/sa/echo")
    ):
        await mgr.run()


async def test_cert_dir_source_reads_and_checks(ca: LocalCA, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    write_issued(ca.issue(ECHO), certs / "default.echo")
    source = CertDirSource(certs)
    now = datetime.now(UTC)
    assert (await source.fetch(ECHO, now)).spiffe_id == ECHO
    with pytest.raises(IdentityError, match="expired"):
        await source.fetch(ECHO, now + timedelta(days=2))
    # A folder holding someone else's certificate is refused.
    write_issued(ca.issue(SpiffeId("home.arpa", "default", "other")), certs / "default.echo")
    with pytest.raises(IdentityError, match=re.escape("expected spiffe://home.arpa/ns/default/sa/echo")):
        await source.fetch(ECHO, now)


async def test_add_identities_while_running(
    ca_at_epoch: LocalCA, tmp_path: Path, autojump_clock: object
) -> None:
    db = SpiffeId("home.arpa", "default", "db")
    source = FlakySource(tmp_path / "ca", timedelta(hours=2))
    mgr = IdentityManager(source, [ECHO], wall_clock=trio_wall_clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr.run)
        assert not mgr.has(db)
        source.broken = True
        with pytest.raises(IdentityError):
            await mgr.add([db])
        assert not mgr.has(db)  # nothing half-added
        source.broken = False
        await mgr.add([db, ECHO])
        first = mgr.certificate(db)
        await trio.sleep(3600 + 60)  # the added identity renews like the others
        assert mgr.certificate(db) is not first
        nursery.cancel_scope.cancel()


async def test_cert_dir_replacement_is_picked_up_before_half_life(
    ca: LocalCA, tmp_path: Path, autojump_clock: object
) -> None:
    certs = tmp_path / "certs"
    write_issued(ca.issue(ECHO, ttl=timedelta(hours=24)), certs / "default.echo")
    mgr = IdentityManager(CertDirSource(certs), [ECHO])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(mgr.run)
            first = mgr.certificate(ECHO)
            write_issued(ca.issue(ECHO, ttl=timedelta(hours=48)), certs / "default.echo")
            await mgr.wait_changed()  # within one watch interval, not at half-life 12 hours on
            assert mgr.certificate(ECHO).not_after > first.not_after
            nursery.cancel_scope.cancel()
