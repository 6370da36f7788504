"""Building the plugin manager (a factory: nothing happens at import time) and asking it for filters.

Order, as tox does it: register the built-ins, load the `meshd` entry-point group (third-party
packages), then `check_pending()`, so a plugin implementing a hook that does not exist (a typo such
as `meshd_filter_type`) fails loudly at start-up instead of being silently ignored.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, cast

import pluggy

from meshd.errors import UserFacingError
from meshd.plugins import hookspecs
from meshd.plugins.filters import FilterType

ENTRY_POINT_GROUP = "meshd"
BUILTINS = ("retries", "timeout", "ratelimit", "fault", "headers", "wasm")


@dataclass(frozen=True)
class RegisteredFilter:
    """A filter type with the plugin that offers it."""

    type: FilterType
    plugin: str


@dataclass(frozen=True)
class PluginInfo:
    name: str
    source: str  # "builtin", or "<distribution> <version>" for an entry point
    filters: tuple[str, ...]
    hooks: tuple[str, ...]


class PluginError(UserFacingError):
    """A plugin is broken (bad hook, clashing filter name, failing import)."""


def make_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the hookspecs, the built-in filters and (optionally) installed plugins."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in BUILTINS:
        module = importlib.import_module(f"meshd.plugins.{name}")
        pm.register(module, name=f"meshd.{name}")
    if load_entry_points:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as exc:
            raise PluginError(
                f"cannot load a plugin of entry-point group {ENTRY_POINT_GROUP!r}: {exc!r}"
            ) from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc} (hooks meshd knows: {', '.join(_hook_names(pm))})") from exc
    return pm


def _hook_names(pm: pluggy.PluginManager) -> list[str]:
    return sorted(n for n in vars(pm.hook) if n.startswith("meshd_"))


def filter_types(pm: pluggy.PluginManager) -> dict[str, RegisteredFilter]:
    """Every filter offered, by name; two plugins offering one name is a PluginError."""
    out: dict[str, RegisteredFilter] = {}
    for impl in pm.hook.meshd_filter_types.get_hookimpls():  # registration order
        types = cast(list[FilterType], impl.function())
        for ft in types or ():
            if not isinstance(ft, FilterType):
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: meshd_filter_types returned {ft!r}, not a FilterType"
                )
            if ft.name in out:
                raise PluginError(
                    f"filter {ft.name!r} is offered by both {out[ft.name].plugin!r} and {impl.plugin_name!r}"
                )
            out[ft.name] = RegisteredFilter(ft, impl.plugin_name)
    return out


def plugin_infos(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """The plugins loaded, in registration order, with where they come from and what they offer."""
    dists: dict[int, Any] = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    filters = filter_types(pm)
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist = dists.get(id(plugin))
        source = "builtin" if dist is None else f"{dist.project_name} {dist.version}"
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or ()))
        offered = tuple(sorted(f for f, reg in filters.items() if reg.plugin == name))
        out.append(PluginInfo(name, source, offered, hooks))
    return out


def plugins_json(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """What `meshd plugins --json` prints and the admin API's `/plugins` serves: each plugin with
    its source, hooks and filters (name -> one-line description)."""
    docs = {name: reg.type.doc for name, reg in filter_types(pm).items()}
    return [
        {
            "name": i.name,
            "source": i.source,
            "hooks": list(i.hooks),
            "filters": {f: docs[f] for f in i.filters},
        }
        for i in plugin_infos(pm)
    ]


def installed_since(running: pluggy.PluginManager) -> dict[str, str]:
    """Filters that plugins installed now offer but the running plugin manager lacks (they were
    installed after it was built): filter name -> the plugin's source. Empty if none, or if the
    installed plugins cannot be loaded (that error shows at the next start)."""
    try:
        now = make_plugin_manager()
        fresh = filter_types(now)
    except PluginError:
        return {}
    loaded = filter_types(running)
    sources = {i.name: i.source for i in plugin_infos(now)}
    return {f: sources.get(reg.plugin, reg.plugin) for f, reg in fresh.items() if f not in loaded}
