"""The hooks meshd calls on plugins (pluggy project `meshd`; every hook is prefixed `meshd_`).

A plugin is a module or object with functions marked `@hookimpl` (from `meshd.plugins`), registered
by meshd itself (the built-ins) or found through the `meshd` entry-point group of an installed
package. Hooks run at start-up and policy load, never per request: the per-request work is done by
the filters that `meshd_filter_types` offers (see `meshd.plugins.filters` and docs/plugins.md).
pluggy is synchronous; a hook may return an awaitable, which meshd awaits (`inspect.isawaitable`).
"""

from __future__ import annotations

from typing import Any

import pluggy

from meshd.plugins.filters import FilterType, HttpRequest, LocalResponse

PROJECT = "meshd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def meshd_filter_types() -> list[FilterType]:
    """The L7 filters this plugin offers, by name (used as `filters = [{ name = ... }]` in routes).

    Called when the plugin manager is built and at every policy load. Filter names are unique across
    plugins; a clash is an error naming both plugins.

    :return: filter types (name, settings dataclass, factory building one filter per route)
    """
    raise NotImplementedError  # pragma: no cover


@hookspec(historic=True)
def meshd_startup(config: Any) -> None:
    """meshd has loaded its configuration and is starting (also called on a plugin registered later).

    :param config: the effective `meshd.config.model.Config` (frozen; do not keep secrets from it)
    """


@hookspec
def meshd_access_log(record: dict[str, Any]) -> None:
    """One access-log record (a request at a waypoint, a connection at a node) was written.

    Runs after the response; must not block (return an awaitable to do I/O in meshd's event loop).

    :param record: the JSON-ready access-log fields (`src.addr`, `response_code`, `response_flags`, ...)
    """


@hookspec(firstresult=True)
def meshd_no_route(request: HttpRequest, service: str | None) -> LocalResponse | None:
    """A request matched no route: the first plugin to return a LocalResponse answers it.

    With no answer, the waypoint replies 404 with response flag `NR`.

    :param request: the request (headers only; do not read the body)
    :param service: the destination service (`name.namespace`) if known
    :return: the response to send, or None to leave the decision to other plugins / the default
    """
