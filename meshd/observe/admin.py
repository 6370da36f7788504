"""Admin endpoints (127.0.0.1:15000): /config_dump, /logging, /policy/explain, /quitquitquit, and the
dashboard (meshd/dashboard.py: the page at / with this daemon's status rendered in it, and /api/)."""

from __future__ import annotations

import html
import ipaddress
import logging
import tracemalloc
from collections.abc import Callable
from typing import Any, Protocol

import pluggy

from meshd.observe.http import Request, Response
from meshd.plugins.manager import plugins_json
from meshd.policy.query import ExplainQuery, NotServedHere, QueryError

LEVELS = ("debug", "info", "warning", "error")


class DashboardRoutes(Protocol):
    """The dashboard's page and /api/ endpoints (meshd/dashboard.py), around this server's status."""

    def routes(self, status_html: Callable[[], str]) -> dict[str, Callable[[Request], Any]]: ...


class AdminView(Protocol):
    """What the admin endpoints read and do: the daemon answers to it, and the admin server knows
    nothing else of the daemon (so observe stays below the daemon that composes it)."""

    plugins: pluggy.PluginManager

    @property
    def dashboard(self) -> DashboardRoutes: ...

    def config_dump(self) -> dict[str, Any]: ...
    def set_log_level(self, level: str) -> None: ...
    def stop(self) -> None: ...
    def explain(self, query: ExplainQuery) -> list[dict[str, Any]]: ...


def _host_is_literal(host: str) -> bool:
    """`Host` names an IP literal or localhost (with any port): what a browser sends for the loopback
    admin port, and never what a DNS-rebinding page sends (its own name)."""
    # "[v6]:port", "v4:port", "name:port" (or without the port)
    name = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0].lower()
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def browser_guard(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """The admin port has no authentication and now serves a page a browser keeps open: refuse a
    browser's request whose `Host` is a DNS name (a rebinding attack reading /api/* or /config_dump),
    and a POST from a page of another origin (a cross-site form stopping the daemon with
    /quitquitquit). Only browsers are steered by other sites' pages: other clients (curl, meshd's
    CLI, scripts) are not checked."""

    def guarded(req: Request) -> Any:
        host = req.headers.get("host", "")
        headers = req.headers
        browser = "sec-fetch-mode" in headers or (headers.get("user-agent") or "").startswith("Mozilla/")
        if browser and host and not _host_is_literal(host):
            return Response.text(403, f"the admin API answers to its IP address or localhost, not {host!r}\n")
        origin = req.headers.get("origin")
        if req.method not in ("GET", "HEAD") and origin is not None:
            allowed = origin.removeprefix("http://")
            if origin == allowed or allowed.rstrip("/") != host:
                return Response.text(403, f"a request from the page {origin!r} may not change this meshd\n")
        return handler(req)

    return guarded


def _refused_reload(refused: dict[str, Any] | None) -> str:
    if not refused:
        return ""
    items = "".join(f"<li><code>{html.escape(p)}</code></li>" for p in refused["problems"])
    return (
        f"<h2>Reload refused</h2><p>at {html.escape(refused['at'])} ({html.escape(refused['trigger'])}); "
        f"the config and policy from before stay in force:</p><ul>{items}</ul>"
    )


def admin_routes(daemon: AdminView) -> dict[str, Callable[[Request], Response]]:
    def config_dump(_: Request) -> Response:
        return Response.json(200, daemon.config_dump())

    def logging_level(req: Request) -> Response:
        level = (req.query.get("level") or [""])[0].lower()
        if req.method != "POST" and level:
            return Response.text(405, "use POST /logging?level=debug|info|warning|error\n")
        if not level:
            return Response.text(200, f"level: {logging.getLevelName(logging.getLogger().level).lower()}\n")
        if level not in LEVELS:
            return Response.text(400, f"unknown level {level!r} (one of {', '.join(LEVELS)})\n")
        daemon.set_log_level(level)
        return Response.text(200, f"level: {level}\n")

    def quit_(req: Request) -> Response:
        if req.method != "POST":
            return Response.text(405, "use POST /quitquitquit\n")
        daemon.stop()
        return Response.text(200, "draining and exiting\n")

    def policy_explain(req: Request) -> Response:
        """`meshd policy explain --admin`: answered with the policy in force now (after reloads)."""
        try:
            results = daemon.explain(ExplainQuery.from_params(req.query))
        except QueryError as exc:
            why = {"error": str(exc), "param": exc.param, "not_served_here": isinstance(exc, NotServedHere)}
            return Response.json(400, why)
        return Response.json(200, {"results": results})

    snapshots: list[tracemalloc.Snapshot] = []

    def debug_memory(_: Request) -> Response:
        """Where Python memory is allocated, and what grew since the previous call. Only when meshd
        runs with PYTHONTRACEMALLOC=N (tracing costs CPU and memory, so it is never on by default).
        Taking the snapshot pauses the daemon (a second or more under load): a debugging aid."""
        if not tracemalloc.is_tracing():
            return Response.text(404, "start meshd with PYTHONTRACEMALLOC=10 to trace allocations\n")
        snap = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>"))
        )
        current, peak = tracemalloc.get_traced_memory()
        lines = [f"traced: {current / 2**20:.1f} MiB now, {peak / 2**20:.1f} MiB peak", "", "largest:"]
        lines += [f"  {stat}" for stat in snap.statistics("lineno")[:25]]
        if snapshots:
            lines += ["", "grown since the previous call:"]
            lines += [f"  {d}" for d in snap.compare_to(snapshots[-1], "lineno")[:25] if d.size_diff > 0]
        snapshots[:] = [snap]
        return Response.text(200, "\n".join(lines) + "\n")

    def plugins(_: Request) -> Response:
        """`meshd plugins --admin`: what the running daemon loaded (not what is installed now)."""
        return Response.json(200, plugins_json(daemon.plugins))

    def status_html() -> str:
        """The server-rendered head of the dashboard page (it reads without JavaScript too)."""
        dump = daemon.config_dump()
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(v['not_after'])}</td></tr>"
            for k, v in dump["certificates"].items()
        )
        return (
            f"<p>role <b>{html.escape(dump['role'])}</b>, node <b>{html.escape(dump['node_name'])}</b>, "
            f"version {html.escape(dump['version'])}, {'ready' if dump['ready'] else 'not ready'}</p>"
            f"{_refused_reload(dump['reload']['refused'])}"
            f"<h2>Certificates</h2><table><tr><th>identity</th><th>expires</th></tr>{rows}</table>"
            '<p><a href="/config_dump">/config_dump</a></p>'
        )

    routes: dict[str, Callable[[Request], Any]] = {
        "/config_dump": config_dump,
        "/debug/memory": debug_memory,
        "/logging": logging_level,
        "/plugins": plugins,
        "/policy/explain": policy_explain,
        "/quitquitquit": quit_,
        **daemon.dashboard.routes(status_html),  # "/" and /api/...
    }
    return {path: browser_guard(handler) for path, handler in routes.items()}
