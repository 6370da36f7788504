"""The meshd daemon: wires components into one nursery, owns readiness, signals and drain.

Each component is started with `nursery.start(...)` and holds a readiness guard until it reports
started; `/healthz/ready` says yes only after every guard is released. SIGTERM/SIGINT drain
(stop accepting, let in-flight work finish up to `drain_timeout`) and exit 0; SIGHUP reloads
policy (a bad file keeps the previous policy in force).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import trio

from meshd import __version__
from meshd.ca_service.wiring import CaWiring
from meshd.config.load import load_config
from meshd.config.model import Config, UpstreamConfig
from meshd.config.schema import to_plain
from meshd.dashboard import Dashboard
from meshd.dataplane.state import NodeState
from meshd.discovery.catalog import local_catalog, merge
from meshd.errors import ConfigError
from meshd.heap import keep_large_buffers, settle_after_start
from meshd.identity.manager import IdentityError, IdentityManager
from meshd.identity.spiffe import SpiffeId
from meshd.listeners import ListenError
from meshd.log import set_level
from meshd.node.proxy import NodeProxy
from meshd.observe.accesslog import ConnectionTelemetry
from meshd.observe.admin import admin_routes
from meshd.observe.http import HttpServer, Request, Response
from meshd.observe.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from meshd.observe.metrics import Metrics
from meshd.observe.tracing import Tracer
from meshd.plugins.manager import filter_types, installed_since, make_plugin_manager, plugin_infos
from meshd.plugins.wasm import WasmFilter
from meshd.policy.load import load_policy_dir
from meshd.policy.query import ExplainQuery, answer
from meshd.policy.routes import referenced_files
from meshd.readiness import Readiness
from meshd.reload import ReloadOutcome, plan_reload
from meshd.sdnotify import Notifier
from meshd.waypoint.explain import explain_request

log = logging.getLogger("meshd")

WATCH_INTERVAL = 2.0  # seconds between checks of the config file and policy folder for changes
WASM_TICK_IDLE = 0.25  # the wasm tick task looks again this often when no plugin asked for a tick sooner (a reload may add one)


def workload_identity(config: Config, name: str) -> SpiffeId:
    w = next(w for w in config.workloads if w.name == name)
    return SpiffeId(config.trust_domain, w.namespace, w.sa)


def local_identities(config: Config) -> list[SpiffeId]:
    """The node's own identity first, then every local workload's."""
    ids = [SpiffeId.node(config.trust_domain, config.node_name)]
    ids += [SpiffeId(config.trust_domain, w.namespace, w.sa) for w in config.workloads]
    return list(dict.fromkeys(ids))


class Daemon:
    def __init__(
        self, config: Config, *, config_path: Path | None = None, overrides: Sequence[str] = ()
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = tuple(overrides)  # re-applied on every reload
        self._reload_lock = trio.Lock()
        self.metrics = Metrics()
        self.systemd = Notifier()
        self._stop = trio.Event()
        self._drain_hooks: list[Callable[[], None]] = []
        self.readiness = Readiness()
        self.started_at = time.time()
        self.ca = CaWiring(
            config,
            lambda: self.config,
            lambda kind, result: self.metrics.ca_requests.labels(kind, result).inc(),
        )
        self.identities = IdentityManager(self.ca.cert_source(), local_identities(config))
        self.plugins = make_plugin_manager()
        self.plugins.hook.meshd_startup.call_historic(kwargs={"config": config})
        policy, warnings = load_policy_dir(
            config.policy.dir,
            role=config.role,
            filter_types=filter_types(self.plugins),
            trust_domain=config.trust_domain,
        )
        for w in warnings:
            log.warning("policy: %s", w.format())
        self.tracer = Tracer(
            config.tracing,
            self.metrics,
            {
                "service.name": config.node_name,
                "service.version": __version__,
                "meshd.role": config.role,
                "host.name": config.node_name,
            },
        )
        self.state = NodeState(
            config=config,
            identities=self.identities,
            metrics=self.metrics,
            telemetry=ConnectionTelemetry(self.metrics, access_log=config.log.access_log, tracer=self.tracer),
            catalog=merge(local_catalog(config)),
            policy=policy,
            track_inflight=self.track_inflight,
            tracer=self.tracer,
        )
        self.node = NodeProxy(self.state, self.plugins)
        self.node.inbound.ca_handler = self.ca.hbone_handler
        self.on_drain(self.node.drain)
        self.bound: dict[str, str] = {}
        self._inflight = 0
        self._idle = trio.Event()
        self._idle.set()
        self.metrics.add_collect_hook(self._refresh_gauges)
        self.last_reload: ReloadOutcome | None = None
        self.last_refused_reload: ReloadOutcome | None = None  # kept until a later reload applies
        self._files_seen = self._files_fingerprint()
        self.dashboard = Dashboard(self)
        self.node.inbound.control = self.dashboard.control

    # ---- lifecycle -----------------------------------------------------------------------------
    async def run(self) -> int:
        if not keep_large_buffers():
            log.info("C library has no glibc mallopt: large buffers use its default allocation")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_signals)
            nursery.start_soon(self.systemd.keep_alive)
            nursery.start_soon(self._watch_files)
            if self.config.role == "waypoint":
                nursery.start_soon(self._drive_wasm_ticks)
            await self._start_component(nursery, "readiness", self._serve_readiness)
            await self._start_component(nursery, "metrics", self._serve_metrics)
            await self._start_component(nursery, "admin", self._serve_admin)
            await self._start_component(nursery, "identity", self.identities.run)
            await self._start_component(nursery, "dashboard", self.dashboard.sample)
            if self.tracer.enabled:
                await self._start_component(nursery, "tracing", self.tracer.run)
            await self._start_component(nursery, "node", self.node.run, self.readiness)
            if self.ca.service is not None:
                await self._start_component(nursery, "ca", self.ca.serve_enrollment)
            nursery.start_soon(self.ca.watch_bundle, self.identities)
            self.readiness.seal()
            settle_after_start()  # before the first request: start-up objects leave the collector's walk
            self.metrics.ready.set(1)
            self.systemd.ready(f"{self.config.role} {self.config.node_name} ready")
            log.info(
                "meshd ready",
                extra={"role": self.config.role, "node": self.config.node_name, "version": __version__},
            )
            await self._stop.wait()
            self.systemd.stopping()
            await self._drain()
            nursery.cancel_scope.cancel()
        self.systemd.close()
        log.info("meshd stopped")
        return 0

    async def _start_component(
        self, nursery: trio.Nursery, name: str, start: Callable[..., Awaitable[Any]], *args: Any
    ) -> Any:
        guard = self.readiness.register(name)
        result = await nursery.start(start, *args)
        guard.release()
        return result

    def stop(self) -> None:
        self._stop.set()

    def on_drain(self, hook: Callable[[], None]) -> None:
        """Components register how they stop accepting new work."""
        self._drain_hooks.append(hook)

    async def _drain(self) -> None:
        log.info("draining", extra={"timeout_s": self.config.drain_timeout.total_seconds()})
        self.metrics.ready.set(0)
        for hook in self._drain_hooks:
            hook()
        with trio.move_on_after(self.config.drain_timeout.total_seconds()) as scope:
            await self._idle.wait()
        if scope.cancelled_caught:
            log.warning("drain timeout: closing %d in-flight connection(s)", self._inflight)

    @property
    def inflight(self) -> int:
        """Connections (and waypoint tunnels) being proxied now."""
        return self._inflight

    def track_inflight(self, delta: int) -> None:
        self._inflight += delta
        if self._inflight == 0:
            self._idle.set()
        elif self._idle.is_set():
            self._idle = trio.Event()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload("SIGHUP")
                else:
                    log.info("received %s", signal.Signals(signum).name)
                    self.stop()

    async def reload(self, why: str) -> bool:
        """Re-read the config file and the policy folder. Everything is parsed and validated first;
        on any problem nothing changes (every error is logged with FILE:LINE and counted). Otherwise
        the new config, policy and catalog are swapped in at once and upstream listeners are added or
        removed; open connections are not cut, unchanged listeners are not rebound."""
        async with self._reload_lock:
            self.systemd.reloading()  # also when there is nothing to do: systemd waits for READY=1
            try:
                # The files as this reload reads them: the watcher must not reload them a second time
                # (an edit + SIGHUP used to reload twice: once for the signal, once for the mtime).
                seen = self._files_fingerprint()
                refused = self.last_refused_reload
                if seen == self._files_seen and not (refused and refused.external and why == "SIGHUP"):
                    # Already read as they are (by the watcher, or a SIGHUP that held the lock): one
                    # edit is one reload. SIGHUP retries a reload refused for an outside cause (the CA
                    # said no, a port was taken): that may have changed.
                    log.info("%s: config and policy unchanged since they were last read; nothing to do", why)
                    return True
                self._files_seen = seen
                outcome = await self._reload(why)
                if outcome.applied:  # the new policy may name other files (wasm modules): watch those
                    self._files_seen = self._files_fingerprint()
            finally:
                self.systemd.ready("reloaded")
            self.last_reload = outcome
            self.last_refused_reload = None if outcome.applied else outcome
            self.metrics.config_reloads.labels("success" if outcome.applied else "failure").inc()
            return outcome.applied

    async def _reload(self, why: str) -> ReloadOutcome:
        def rejected(problems: Iterable[str], *, external: bool = False) -> ReloadOutcome:
            listed = tuple(problems)
            for p in listed:
                log.error("reload rejected, the running config and policy stay in force: %s", p)
            return ReloadOutcome(time.time(), why, applied=False, problems=listed, external=external)

        try:
            new = load_config(self.config_path, self.overrides) if self.config_path else self.config
            policy, warnings = load_policy_dir(
                new.policy.dir,
                role=new.role,
                filter_types=filter_types(self.plugins),
                trust_domain=new.trust_domain,
            )
        except ConfigError as exc:
            problems = [p.format() for p in exc.problems]
            new_filters = installed_since(self.plugins)
            if new_filters:  # an "unknown filter" may be one of these: say what would make it known
                offered = ", ".join(f"{f!r} ({src})" for f, src in sorted(new_filters.items()))
                problems.append(
                    f"{self.config_path or 'config'}: filters {offered} come from plugins installed after meshd "
                    "started; meshd loads plugins at start (restart it, e.g. `systemctl restart meshd`, to use them)"
                )
            return rejected(problems)
        plan = plan_reload(self.config, new)
        try:
            await self.identities.add(plan.identities_added)
        except IdentityError as exc:
            return rejected([f"{self.config_path or 'config'}: {exc}"], external=True)
        added: list[UpstreamConfig] = []
        for up in plan.upstreams_added:
            try:
                await self.node.start_upstream(up)
            except ListenError as exc:
                for started in added:
                    self.node.stop_upstream(started)
                return rejected([f"{self.config_path or 'config'}: {exc}"], external=True)
            added.append(up)
        for up in plan.upstreams_removed:
            self.node.stop_upstream(up)
        for w in warnings:
            log.warning("policy: %s", w.format())
        for key in plan.restart_needed:
            log.warning("config: %r changed; it takes effect after a restart (kept as it was)", key)
        self.config = self.state.config = plan.config
        self.state.policy = policy
        self.state.telemetry.access_log = plan.config.log.access_log
        set_level(plan.config.log.level)
        self.node.rebuild_catalog()
        log.info("config and policy reloaded", extra={"trigger": why})
        return ReloadOutcome(time.time(), why, applied=True)

    async def _drive_wasm_ticks(self) -> None:
        """proxy-wasm tick timers (`proxy_set_tick_period_milliseconds`) of the wasm filters in force."""
        while True:
            delay = WASM_TICK_IDLE
            for route in self.state.policy.loaded_routes:
                for bound in route.filters:
                    if isinstance(bound.filter, WasmFilter):
                        delay = min(delay, bound.filter.tick())
            await trio.sleep(max(delay, 0.001))

    async def _watch_files(self) -> None:
        """Reload when the config file or a policy file changes (polled: no inotify dependency)."""
        while True:
            await trio.sleep(WATCH_INTERVAL)
            if self._files_fingerprint() != self._files_seen:
                await self.reload("file change")

    def _files_fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        paths = [self.config_path] if self.config_path else []
        policy_dir = self.config.policy.dir
        if policy_dir is not None and policy_dir.is_dir():
            paths += sorted(policy_dir.glob("*.toml"))
        paths += referenced_files(self.state.policy.loaded_routes)  # e.g. wasm modules
        out = []
        for p in paths:
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((str(p), st.st_mtime_ns, st.st_size))
        return tuple(out)

    # ---- endpoints -----------------------------------------------------------------------------
    async def _serve_readiness(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        def ready(_: Request) -> Response:
            if self.readiness.ready and not self._stop.is_set():
                return Response.text(200, "ready\n")
            pending = ", ".join(self.readiness.pending) or "draining"
            return Response.text(503, f"not ready: {pending}\n")

        await self._serve("readiness", {"/healthz/ready": ready}, task_status)

    async def _serve_metrics(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        def metrics(_: Request) -> Response:
            return Response(200, self.metrics.exposition(), METRICS_CONTENT_TYPE)

        await self._serve("metrics", {"/metrics": metrics, "/stats/prometheus": metrics}, task_status)

    async def _serve_admin(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._serve("admin", admin_routes(self), task_status)

    async def _serve(self, name: str, routes: dict[str, Any], task_status: trio.TaskStatus[None]) -> None:
        address = getattr(self.config.listen, name)
        server = HttpServer(name, routes)

        async def serve(*, task_status: trio.TaskStatus[Any]) -> None:
            await server.serve(address, task_status=task_status)

        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve)
            self.bound[name] = str(bound)
            task_status.started()

    # ---- state for admin and metrics -----------------------------------------------------------
    def _refresh_gauges(self) -> None:
        for ident, status in self.identities.statistics().items():
            self.metrics.cert_expiry.labels(ident).set(status.certificate.not_after.timestamp())

    def config_dump(self) -> dict[str, Any]:
        certs = {
            ident: {
                "not_before": s.certificate.not_before.isoformat(),
                "not_after": s.certificate.not_after.isoformat(),
                "renewals": s.renewals,
                "failures": s.failures,
                "last_error": s.last_error,
            }
            for ident, s in self.identities.statistics().items()
        }
        return {
            "version": __version__,
            "role": self.config.role,
            "node_name": self.config.node_name,
            "config_file": str(self.config_path.resolve()) if self.config_path else None,
            "overrides": list(self.overrides),
            "uptime_s": round(time.time() - self.started_at, 1),
            "trio_tasks": trio.lowlevel.current_statistics().tasks_living,  # read by bench/soak.py
            "ready": self.readiness.ready,
            "reload": {
                "last": self.last_reload.to_json() if self.last_reload else None,
                "refused": self.last_refused_reload.to_json() if self.last_refused_reload else None,
            },
            "listeners": self.bound,
            "tracing": self.tracer.statistics(),
            "config": to_plain(self.config),
            "certificates": certs,
            "policy": self.state.policy.config_dump(),
            "plugins": [
                {"name": p.name, "source": p.source, "filters": list(p.filters), "hooks": list(p.hooks)}
                for p in plugin_infos(self.plugins)
            ],
            "connections": {
                "proxied": self._inflight,
                "hbone_inbound": dataclasses.asdict(self.node.server.statistics()),
                "pool": dataclasses.asdict(self.node.pool.statistics()),
            },
            **self.node.config_dump(),
        }

    def set_log_level(self, level: str) -> None:
        set_level(level)

    def explain(self, query: ExplainQuery) -> list[dict[str, Any]]:
        """`GET /policy/explain`: as this daemon decides now (after reloads), with its merged catalog.
        A waypoint explains an HTTP request with its route; a node says which waypoint decides."""
        state = self.state
        waypoint = self.node.waypoint
        if waypoint is not None:
            return explain_request(
                state.catalog,
                state.policy,
                self.config.node_name,
                waypoint.vips,
                query,
                waypoint.pipeline.router,
            )
        catalog = state.catalog

        def waypoint_of(key: str) -> str | None:
            svc = catalog.services.get(key)
            if svc is None or svc.waypoint is None:
                return None
            where = catalog.node(svc.waypoint)
            at = f"HBONE {where[1]}:{where[0].hbone.port}" if where else "not in the catalog"
            return f"{svc.waypoint!r} (bound by {catalog.bindings.get(key, 'service')}; {at})"

        return [a.to_json() for a in answer(self.config, state.policy, query, catalog, waypoint_of)]
