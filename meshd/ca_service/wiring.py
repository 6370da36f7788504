"""What the daemon needs from this package, chosen from the config in one place.

- the CertSource: enrolled (`identity.state_dir`) or whatever `source_for` picks (ca_dir / cert_dir);
- the CA service when `[ca] serve = true` (the HBONE handler and the enrollment listener);
- the trust-bundle watcher: every `identity.bundle_refresh`, re-read the bundle (from the CA over
  HBONE when enrolled, from the CA folder in ca_dir mode) and hand a changed one to the identity
  manager, so a rotation reaches new connections without waiting for a renewal.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from meshd.ca_service.authority import CaAuthority
from meshd.ca_service.client import EnrolledSource, read_enrollment
from meshd.ca_service.service import CaService
from meshd.config.model import Config
from meshd.hbone.server import Handler
from meshd.identity.ca import CAError, LocalCA, read_issued, trust_bundle
from meshd.identity.manager import (
    CertDirSource,
    CertSource,
    IdentityError,
    IdentityManager,
    source_for,
    system_wall_clock,
)
from meshd.identity.spiffe import SpiffeId

log = logging.getLogger("meshd.identity")


@dataclass(frozen=True)
class SourceProblem:
    key: str  # the config key at fault, e.g. "identity.cert_dir"
    message: str
    hint: str


def identity_source_problems(config: Config, identities: Sequence[SpiffeId]) -> list[SourceProblem]:
    """What would stop the daemon getting its certificates from the configured identity source:
    the folder `meshd config check` reads before a start would fail on it. Each with the way out for
    that mode."""
    ident = config.identity
    td = config.trust_domain
    out: list[SourceProblem] = []
    if ident.ca_dir is not None:
        try:
            ca = LocalCA.load(ident.ca_dir)
            if ca.trust_domain != td:
                out.append(
                    SourceProblem(
                        "identity.ca_dir",
                        f"identity.ca_dir is a CA for {ca.trust_domain!r}, but trust_domain is {td!r}",
                        "make them the same",
                    )
                )
        except CAError as exc:
            out.append(
                SourceProblem(
                    "identity.ca_dir",
                    f"identity.ca_dir: {exc}",
                    f"make one with `meshd ca init --dir {ident.ca_dir} --trust-domain {td}`",
                )
            )
    if ident.cert_dir is not None:
        source = CertDirSource(ident.cert_dir)
        for identity in identities:
            folder = source.folder(identity)
            try:
                issued = read_issued(folder)
                problem = (
                    "" if issued.spiffe_id == identity else f"{folder}/cert.pem is for {issued.spiffe_id}"
                )
            except CAError as exc:
                problem = str(exc).split(" (issue one with", 1)[0]  # our own hint below fits this mode
            if problem:
                out.append(
                    SourceProblem(
                        "identity.cert_dir",
                        f"identity.cert_dir: no usable certificate for {identity}: {problem}",
                        f"put cert.pem, key.pem and ca.crt issued for {identity.uri} in {folder}/ "
                        f"(e.g. `meshd ca issue --dir CA --id {identity.uri} --out {folder}`)",
                    )
                )
    if ident.state_dir is not None:
        enroll_hint = (
            f"enroll this host: `meshd enroll --token-file FILE --state-dir {ident.state_dir}` "
            "with a token from `meshd ca token` on the CA host"
        )
        node = SpiffeId.node(td, config.node_name)
        try:
            read_enrollment(ident.state_dir)
            issued = read_issued(ident.state_dir)
            if issued.spiffe_id != node:
                out.append(
                    SourceProblem(
                        "identity.state_dir",
                        f"identity.state_dir {ident.state_dir} is enrolled as {issued.spiffe_id}, "
                        f"but this node is {node}",
                        f"set node_name to the enrolled name, or {enroll_hint}",
                    )
                )
        except CAError as exc:
            problem = str(exc).split(" (", 1)[0]
            out.append(SourceProblem("identity.state_dir", f"identity.state_dir: {problem}", enroll_hint))
    return out


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
