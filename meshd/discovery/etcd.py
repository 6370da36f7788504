"""Peers through etcd: publish our entry under a lease, watch everyone's, over etcd's v3 JSON gateway.

Rule 1 (as for mDNS): etcd is a rendezvous, never an authority. An entry read from etcd is a hint:
"node N may be at A, catalog revision R". `on_peer` hands it to the peer poller, which fetches A's
catalog over mutual TLS and keeps it only if the peer proves node identity N. A forged entry costs
a failed fetch, logged with its reason, and adds nothing.

Rule 2: etcd being down never takes anything away. While no endpoint answers, the hints we hold
stay (the poller keeps fetching those peers directly and withdraws one only when *it* stops
answering); we retry with backoff, and `meshd_etcd_connected` / `meshd status` say so. The next
listing after reconnecting is compared with what we held, and only then are vanished nodes gone.

Theory of operation: `run` loops over sessions. A session picks the next endpoint (failover in
turn), grants a lease (`lease_ttl`), writes our entry with it, lists the prefix on first contact
(`EtcdView.reset`), and then runs, in one nursery: the keepalive (every third of the TTL; a lost
lease ends the session and the next one re-grants), the publisher (our catalog revision changed ->
put), and the watch. The watch always starts from the view's revision + 1: a stream that breaks,
and the first watch of a later session, resume where the last left off (etcd replays what happened
meanwhile, lease expiries included); only a compacted revision makes us list again. Any failure
ends the session; the next one starts at the next endpoint, after a backoff (0.5 s doubling, capped
at the TTL) once every endpoint has failed. The JSON of every request and answer, and the watch
stream, are handled by the pure `meshd.discovery.etcd_wire`; this module does the I/O (httpx under
trio) and the timing.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from meshd.config.model import EtcdConfig
from meshd.discovery import etcd_wire as wire
from meshd.units import Address

log = logging.getLogger("meshd.discovery.etcd")

BACKOFF_FIRST = 0.5
REQUEST_TIMEOUT_MAX = 5.0  # one unary call; a member without quorum stalls until etcd gives up
DRAIN_TIMEOUT = 2.0  # revoking our lease on shutdown (shielded)
WILDCARDS = ("0.0.0.0", "::", "")

OnPeer = Callable[[str, Address, str], None]  # (node, HBONE address, announced revision)
OnGone = Callable[[str], None]  # (node)


class EtcdUnavailable(Exception):
    """This session with etcd ended; the message says why (the next session retries)."""


# What etcd, the network or the operator can cause; anything else is logged with its traceback.
EXPECTED_FAILURES = (
    EtcdUnavailable,
    wire.EtcdServerError,
    wire.EtcdProtocolError,
    httpx.HTTPError,
    OSError,  # ssl.SSLError, a missing password or certificate file, ...
    trio.TooSlowError,
)


@dataclass
class EtcdStatistics:
    endpoints: list[str] = field(default_factory=list)
    connected: bool = False
    endpoint: str | None = None  # the one in use (or last tried)
    since: float | None = None  # trio clock: connected, or unreachable, since
    last_error: str | None = None
    failures: int = 0
    lease: str | None = None  # hex, as etcdctl prints it
    revision: int = 0  # the store revision applied up to
    published: dict[str, str] = field(default_factory=dict)
    entries: dict[str, str] = field(default_factory=dict)  # node -> address
    ignored: dict[str, str] = field(default_factory=dict)  # key -> why
    listings: int = 0  # full listings of the prefix (first contact, or a compacted watch revision)
    watch_resumes: int = 0  # watch streams resumed from the last revision after they broke


class EtcdDiscovery:
    def __init__(
        self,
        settings: EtcdConfig,
        *,
        trust_domain: str,
        node: str,
        role: str,
        hbone: Address,
        revision: str,
        on_peer: OnPeer,
        on_gone: OnGone,
        ssl_context: Callable[[], ssl.SSLContext] | None = None,
        credentials_changed: Callable[[], Awaitable[None]] | None = None,
        on_state: Callable[[bool], None] = lambda connected: None,
    ) -> None:
        self.settings = settings
        self.prefix = settings.prefix or wire.default_prefix(trust_domain)
        self.trust_domain = trust_domain
        self.node = node
        self.role = role
        self.hbone = hbone
        self.on_peer = on_peer
        self.on_gone = on_gone
        self.ssl_context = ssl_context
        self.credentials_changed = credentials_changed
        self.on_state = on_state
        self.ttl = max(2, round(settings.lease_ttl.total_seconds()))
        self.request_timeout = min(REQUEST_TIMEOUT_MAX, max(1.0, self.ttl / 3))
        self.view = wire.EtcdView(self.prefix, trust_domain, node)
        self._revision = revision
        self._wake = trio.Event()
        self._draining = False
        self._next_endpoint = 0
        self._stats = EtcdStatistics(endpoints=list(settings.endpoints))

    # ---- called from trio by the node ----
    def set_revision(self, revision: str) -> None:
        if revision != self._revision:
            self._revision = revision
            self._wake.set()

    def drain(self) -> None:
        """Revoke our lease now: peers see our entry deleted while in-flight connections finish."""
        self._draining = True
        self._wake.set()

    def statistics(self) -> EtcdStatistics:
        self._stats.revision = self.view.revision
        self._stats.entries = {n: str(e.hbone) for n, e in sorted(self.view.entries.items())}
        self._stats.ignored = dict(self.view.ignored)
        return self._stats

    # ---- the component ----
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sessions until cancelled. Reports started at once: readiness never waits for etcd."""
        task_status.started()
        backoff, attempts = BACKOFF_FIRST, 0
        while not self._draining:
            endpoint = self.settings.endpoints[self._next_endpoint % len(self.settings.endpoints)]
            self._next_endpoint += 1
            self._stats.endpoint = endpoint
            try:
                await self._session(endpoint)
                return  # drained
            except Exception as exc:  # whatever ended the session, the next one retries
                was_connected = self._stats.connected
                self._failed(endpoint, _leaf(exc))
            if was_connected:
                backoff, attempts = BACKOFF_FIRST, 0
            attempts += 1
            if attempts % len(self.settings.endpoints):
                continue  # fail over to the next endpoint at once
            await trio.sleep(backoff)
            backoff = min(backoff * 2, float(self.ttl))

    def _failed(self, endpoint: str, exc: BaseException) -> None:
        reason = _reason(exc)
        was = self._stats.connected
        self._stats.failures += 1
        self._stats.last_error = f"{endpoint}: {reason}"
        if was or self._stats.since is None:
            self._stats.since = trio.current_time()
        self._stats.connected = False
        self._stats.lease = None
        self.on_state(False)
        if not isinstance(exc, EXPECTED_FAILURES):  # a bug of ours, not etcd's: say where
            log.error("etcd session failed unexpectedly; retrying", exc_info=exc)
        level = (
            logging.WARNING if was or self._stats.failures <= len(self.settings.endpoints) else logging.DEBUG
        )
        log.log(
            level,
            "etcd unreachable; keeping the last catalog and retrying",
            extra={"endpoint": endpoint, "error": reason},
        )

    async def _session(self, endpoint: str) -> None:
        tls = self.ssl_context() if endpoint.startswith("https:") and self.ssl_context else None
        timeout = httpx.Timeout(self.request_timeout)
        async with httpx.AsyncClient(base_url=endpoint, verify=tls or True, timeout=timeout) as client:
            call = _Caller(client)
            if self.settings.user and self.settings.password_file is not None:
                password = await trio.Path(self.settings.password_file).read_text()
                token = wire.parse_authenticate(
                    await call(wire.authenticate(self.settings.user, password.rstrip("\r\n")))
                )
                client.headers["Authorization"] = token
            advertise = await self._advertise(endpoint)
            lease = wire.parse_grant(await call(wire.grant(self.ttl)))
            self._stats.lease = f"{lease.id:x}"
            published = await self._publish(call, lease.id, advertise)
            if self.view.revision == 0:
                await self._list(call)  # first contact; later sessions resume the watch instead
            self._stats.connected, self._stats.since, self._stats.last_error = True, trio.current_time(), None
            self.on_state(True)
            log.info(
                "etcd connected",
                extra={"endpoint": endpoint, "lease": f"{lease.id:x}", "peers": len(self.view.entries)},
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keepalive, call, lease.id)
                nursery.start_soon(self._watch, client, call)
                if self.credentials_changed is not None and tls is not None:
                    nursery.start_soon(self._reconnect_on_new_credentials)
                while True:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    if self._draining:
                        with trio.CancelScope(shield=True), trio.move_on_after(DRAIN_TIMEOUT):
                            await call(wire.revoke(lease.id))
                            log.info("etcd entry withdrawn (lease revoked)")
                        nursery.cancel_scope.cancel()
                        return
                    if self._revision != published:
                        published = await self._publish(call, lease.id, advertise)

    async def _advertise(self, endpoint: str) -> Address:
        """Where peers dial us: etcd.advertise, else listen.hbone, else our address towards etcd."""
        if self.settings.advertise is not None:
            return self.settings.advertise
        if self.hbone.host not in WILDCARDS:
            return self.hbone
        parts = urlsplit(endpoint)
        host, port = parts.hostname or "", parts.port or 2379
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        with trio.socket.socket(family, socket.SOCK_DGRAM) as probe:
            await probe.connect(sockaddr)  # UDP: no packet leaves; the kernel picks the route
            local = probe.getsockname()[0]
        return Address(str(local), self.hbone.port)

    async def _publish(self, call: _Caller, lease: int, advertise: Address) -> str:
        revision = self._revision
        entry = wire.NodeEntry(self.trust_domain, self.node, self.role, advertise, revision)
        await call(wire.put(wire.node_key(self.prefix, self.node), entry.encode(), lease))
        self._stats.published = {"key": wire.node_key(self.prefix, self.node).decode(), **_entry_text(entry)}
        log.debug("etcd entry published", extra={"revision": revision})
        return revision

    async def _keepalive(self, call: _Caller, lease: int) -> None:
        while True:
            await trio.sleep(self.ttl / 3)
            answer = wire.parse_keepalive(await call(wire.keepalive(lease)))
            if answer.ttl <= 0:
                raise EtcdUnavailable(f"lease {lease:x} expired before its keepalive (etcd was out of reach)")

    async def _reconnect_on_new_credentials(self) -> None:
        assert self.credentials_changed is not None
        await self.credentials_changed()
        raise EtcdUnavailable("certificate renewed; reconnecting with it")

    async def _watch(self, client: httpx.AsyncClient, call: _Caller) -> None:
        """Follow the prefix from the view's revision. A stream that breaks resumes from the last
        revision applied (after a short pause); a compacted revision means listing again."""
        pause = BACKOFF_FIRST
        while True:
            request = wire.watch_create(self.prefix.encode(), self.view.revision + 1)
            try:
                compacted = await self._stream(client, request)
            except (httpx.TransportError, wire.EtcdProtocolError) as exc:
                compacted, why = None, _reason(exc)
            else:
                why = "stream ended"
            if compacted is not None:
                log.info("etcd watch revision compacted; listing again", extra={"compacted": compacted})
                await self._list(call)
                continue
            self._stats.watch_resumes += 1
            log.info(
                "etcd watch broke; resuming", extra={"from_revision": self.view.revision + 1, "error": why}
            )
            await trio.sleep(pause)  # the keepalive ends the session if etcd itself is gone
            pause = min(pause * 2, self.ttl / 3)

    async def _list(self, call: _Caller) -> None:
        self._stats.listings += 1
        self._report(self.view.reset(wire.parse_range(await call(wire.range_prefix(self.prefix.encode())))))

    async def _stream(self, client: httpx.AsyncClient, request: wire.Request) -> int | None:
        """One watch stream; returns the compact revision if etcd cancelled it for compaction,
        None if the stream just ended; raises on a cancelled watch or a bad message."""
        path, body = request
        decoder = wire.WatchDecoder()
        # hasleader: the member ends the watch when it loses its leader, instead of going silent.
        headers = {"Grpc-Metadata-hasleader": "true"}
        timeout = httpx.Timeout(self.request_timeout, read=None)
        async with client.stream("POST", path, json=body, headers=headers, timeout=timeout) as resp:
            if resp.status_code != 200:
                text = (await resp.aread())[:300].decode(errors="replace")
                raise EtcdUnavailable(f"watch answered HTTP {resp.status_code}: {text}")
            async for chunk in resp.aiter_raw():
                for event in decoder.feed(chunk):
                    done = self._on_watch_event(event)
                    if done is not None:
                        return done
            for event in decoder.close():
                done = self._on_watch_event(event)
                if done is not None:
                    return done
        return None

    def _on_watch_event(self, event: wire.WatchEvent) -> int | None:
        if isinstance(event, wire.WatchChanges):
            self._report(self.view.apply(event))
        elif isinstance(event, wire.WatchCompacted):
            return event.compact_revision
        elif isinstance(event, wire.WatchCanceled):
            raise EtcdUnavailable(f"watch cancelled by etcd: {event.reason}")
        return None

    def _report(self, hints: list[wire.Hint]) -> None:
        for hint in hints:
            if isinstance(hint, wire.Seen):
                log.info(
                    "etcd peer seen",
                    extra={"node": hint.node, "address": str(hint.address), "revision": hint.revision},
                )
                self.on_peer(hint.node, hint.address, hint.revision)
            elif isinstance(hint, wire.Gone):
                log.info("etcd peer gone (entry deleted or lease expired)", extra={"node": hint.node})
                self.on_gone(hint.node)
            else:
                log.warning("etcd entry ignored", extra={"key": hint.key, "reason": hint.reason})


class _Caller:
    """One unary gateway call: POST the JSON body, return the parsed answer (errors included:
    etcd_wire turns them into EtcdServerError)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def __call__(self, request: wire.Request) -> Any:
        path, body = request
        resp = await self.client.post(path, json=body)
        try:
            return resp.json()
        except ValueError:
            raise EtcdUnavailable(
                f"{path} answered HTTP {resp.status_code} without JSON: {resp.text[:200]!r}"
            ) from None


def _entry_text(entry: wire.NodeEntry) -> dict[str, str]:
    return {"node": entry.node, "hbone": str(entry.hbone), "revision": entry.revision}


def _leaf(exc: Exception) -> Exception:
    """The first real error inside trio's exception groups (a session's tasks fail together)."""
    while isinstance(exc, ExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {exc} (is etcd running there, and its client port open?)"
    if isinstance(exc, wire.EtcdServerError) and "permission denied" in exc.message:
        return f"{exc} (etcd RBAC: may this node's user write {exc.message!r}? see docs/discovery.md)"
    if isinstance(exc, EtcdUnavailable) and "CommonName of client" in str(exc):
        return (
            f"{exc} (with auth enabled, etcd's JSON gateway refuses client certificates that carry a "
            "CommonName: leave discovery.etcd.cert unset to use this node's mesh certificate, which has none)"
        )
    text = str(exc) or type(exc).__name__
    return (
        text if isinstance(exc, EtcdUnavailable | wire.EtcdServerError) else f"{type(exc).__name__}: {text}"
    )
