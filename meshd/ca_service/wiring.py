"""What the daemon needs from this package, chosen from the config in one place.

- the CertSource: enrolled (`identity.state_dir`) or whatever `source_for` picks (ca_dir / cert_dir);
- the CA service when `[ca] serve = true` (the HBONE handler and the enrollment listener);
- the trust-bundle watcher: every `identity.bundle_refresh`, re-read the bundle (from the CA over
  HBONE when enrolled, from the CA folder in ca_dir mode) and hand a changed one to the identity
  manager, so a rotation reaches new connections without waiting for a renewal.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from meshd.ca_service.authority import CaAuthority
from meshd.ca_service.client import EnrolledSource
from meshd.ca_service.service import CaService
from meshd.config.model import Config
from meshd.hbone.server import Handler
from meshd.identity.ca import CAError, trust_bundle
from meshd.identity.manager import CertSource, IdentityError, IdentityManager, source_for, system_wall_clock
from meshd.identity.spiffe import SpiffeId

log = logging.getLogger("meshd.identity")


class CaWiring:
    def __init__(
        self,
        config: Config,
        config_now: Callable[[], Config] | None = None,
        count: Callable[[str, str], None] = lambda kind, result: None,
    ) -> None:
        self.config = config
        current = config_now or (lambda: config)
        node = SpiffeId.node(config.trust_domain, config.node_name)
        ident = config.identity
        self.enrolled: EnrolledSource | None = None
        if ident.state_dir is not None:
            self.enrolled = EnrolledSource(ident.state_dir, node, ident.ca_server)
        self.service: CaService | None = None
        if config.ca.serve and config.ca.dir is not None:
            authority = CaAuthority(
                config.ca.dir,
                config.ca.cert_ttl,
                lambda: {name: n.workloads for name, n in current().ca.nodes.items()},
                count,
            )
            self.service = CaService(authority, node, config.listen.hbone.port, wall_clock=system_wall_clock)

    def cert_source(self) -> CertSource:
        if self.enrolled is not None:
            return self.enrolled
        ident = self.config.identity
        return source_for(ident.ca_dir, ident.cert_dir, ident.cert_ttl)

    @property
    def hbone_handler(self) -> Handler | None:
        return self.service.handle_request if self.service is not None else None

    async def serve_enrollment(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert self.service is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(self.service.serve_enrollment, self.config.ca.listen)
            task_status.started()

    def _bundle_reader(self) -> Callable[[], Awaitable[bytes]] | None:
        if self.enrolled is not None:
            return self.enrolled.fetch_bundle
        ca_dir = self.config.identity.ca_dir
        if ca_dir is None:
            return None

        async def read() -> bytes:
            try:
                return trust_bundle(ca_dir)
            except CAError as exc:
                raise IdentityError(str(exc)) from None

        return read

    async def watch_bundle(self, identities: IdentityManager) -> None:
        read = self._bundle_reader()
        if read is None:
            return
        interval = self.config.identity.bundle_refresh.total_seconds()
        while True:
            await trio.sleep(interval)
            try:
                bundle = await read()
            except IdentityError as exc:
                log.warning("cannot refresh the trust bundle; keeping the current one: %s", exc)
                continue
            if identities.update_bundle(bundle):
                log.info("trust bundle updated", extra={"roots": bundle.count(b"BEGIN CERTIFICATE")})
