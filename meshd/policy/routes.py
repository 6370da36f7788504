"""Routes as the policy folder gives them: each route's filter settings validated (FILE:LINE) and its
filter instances built, once per load (DESIGN: "Filter chains are built when policy loads").

What a route *does* (matching, backends, the chain around the filters) is the waypoint's business:
meshd/waypoint/router.py compiles `LoadedRoute`s into its Router. Nothing here matches a request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshd.config.schema import KeyPath, _Converter
from meshd.config.toml_lines import KeyLines
from meshd.errors import Problem
from meshd.plugins.filters import BoundFilter
from meshd.policy.model import FilterRef, Located, Origin, Route

if TYPE_CHECKING:
    from meshd.plugins.manager import RegisteredFilter


@dataclass(frozen=True)
class LoadedRoute:
    """A route with its origin and its filters, built and ready to be chained."""

    located: Located[Route]
    filters: tuple[BoundFilter, ...]


def referenced_files(routes: Sequence[LoadedRoute]) -> list[Path]:
    """Files the routes' filter settings name (a wasm filter's `module`): a change to one is a policy
    change, so the daemon's reload (SIGHUP or the file watcher) notices it like an edited policy file."""
    out: list[Path] = []
    for loaded in routes:
        for ref in loaded.located.value.filters:
            settings = ref.settings
            if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
                out += [
                    v
                    for f in dataclasses.fields(settings)
                    if isinstance(v := getattr(settings, f.name), Path)
                ]
    return sorted(set(out))


def split_filter_settings(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[tuple[int, int], Any]]:
    """Take `route[i].filters[j].settings` out of a parsed policy file (the schema module cannot type
    them: each filter has its own settings class). Returns (the rest, settings by (i, j))."""
    routes = raw.get("route")
    if not isinstance(routes, list):
        return raw, {}
    out = dict(raw)
    out["route"] = new_routes = []
    settings: dict[tuple[int, int], Any] = {}
    for i, route in enumerate(routes):
        if isinstance(route, dict) and isinstance(route.get("filters"), list):
            original = route["filters"]
            route = dict(route)
            route["filters"] = filters = []
            for j, f in enumerate(original):
                if isinstance(f, dict) and "settings" in f:
                    f = dict(f)
                    settings[(i, j)] = f.pop("settings")
                filters.append(f)
        new_routes.append(route)
    return out, settings


@dataclass(frozen=True)
class RouteFile:
    """One policy file's routes, as `load_policy_dir` read them."""

    name: str
    routes: tuple[Route, ...]
    settings: Mapping[tuple[int, int], Any]
    lines: KeyLines
    base_dir: Path


def load_routes(
    files: Sequence[RouteFile], filter_types: Callable[[], Mapping[str, RegisteredFilter]]
) -> tuple[list[LoadedRoute], list[Problem]]:
    """Validate every route's filters (unknown names, settings, factories) and build their instances.

    `filter_types` is called only if some route names a filter. Problems carry FILE:LINE.
    """
    problems: list[Problem] = []
    loaded: list[LoadedRoute] = []
    registry: Mapping[str, RegisteredFilter] | None = None
    for f in files:
        for i, route in enumerate(f.routes):
            base: KeyPath = ("route", i)
            refs: list[FilterRef] = []
            bound: list[BoundFilter] = []
            for j, ref in enumerate(route.filters):
                where: KeyPath = (*base, "filters", j)
                if registry is None:
                    registry = filter_types()
                reg = registry.get(ref.name)
                if reg is None:
                    known = ", ".join(sorted(registry)) or "none"
                    problems.append(
                        Problem(
                            f.name,
                            f.lines.line_of(where),
                            f"unknown filter {ref.name!r}",
                            f"known filters: {known}",
                        )
                    )
                    continue
                raw = f.settings.get((i, j))
                settings, issues = _settings(reg, raw, (*where, "settings"), f.base_dir)
                problems += [Problem(f.name, f.lines.line_of(p), m, h) for p, m, h in issues]
                if issues:
                    continue
                try:
                    instance = reg.type.factory(settings)
                except (ValueError, TypeError) as exc:
                    problems.append(
                        Problem(
                            f.name,
                            f.lines.line_of(where),
                            f"filter {ref.name!r}: {exc}",
                            f"plugin {reg.plugin}",
                        )
                    )
                    continue
                refs.append(replace(ref, settings=settings))
                bound.append(BoundFilter(ref.name, reg.plugin, instance))
            origin = Origin(f.name, f.lines.line_of(base))
            spec = replace(route, filters=tuple(refs))
            loaded.append(LoadedRoute(Located(spec, origin), tuple(bound)))
    return loaded, problems


def _settings(
    reg: RegisteredFilter, raw: Any, path: KeyPath, base_dir: Path
) -> tuple[Any, list[tuple[KeyPath, str, str | None]]]:
    cls = reg.type.settings
    if cls is None:
        if raw:
            return None, [(path, f"filter {reg.type.name!r} takes no settings", "remove settings")]
        return None, []
    if raw is None:
        raw = {}
    conv = _Converter(base_dir)
    if not isinstance(raw, dict):
        return None, [
            (path, f"settings of filter {reg.type.name!r} must be a table", "write settings = { ... }")
        ]
    obj = conv.table(cls, raw, path)
    issues = [(i.path, f"filter {reg.type.name!r}: {i.message}", i.hint) for i in conv.issues]
    return obj, issues
