"""Every hookspec has a test named after it; plus the manager's loud failures."""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import pytest

from meshd.plugins import hookimpl, hookspecs
from meshd.plugins.filters import Filter, FilterType, HttpRequest, LocalResponse
from meshd.plugins.manager import PluginError, filter_types, make_plugin_manager, plugin_infos


def test_every_hookspec_is_prefixed_documented_and_tested() -> None:
    specs = [n for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, "meshd_spec")]
    assert specs and all(n.startswith("meshd_") for n in specs)
    for name in specs:
        assert ":param" in (vars(hookspecs)[name].__doc__ or "") or name == "meshd_filter_types"
        assert f"test_{name}" in globals(), f"no test for hook {name}"


def test_meshd_filter_types() -> None:
    pm = make_plugin_manager(load_entry_points=False)
    types = filter_types(pm)
    assert set(types) == {"retries", "timeout", "ratelimit", "fault", "headers"}
    assert types["ratelimit"].plugin == "meshd.ratelimit"

    class Dup:
        @hookimpl
        def meshd_filter_types(self) -> list[FilterType]:
            return [FilterType("headers", lambda s: Filter())]

    pm.register(Dup(), name="dup")
    with pytest.raises(PluginError, match=r"'headers' is offered by both 'meshd\.headers' and 'dup'"):
        filter_types(pm)


def test_meshd_startup() -> None:
    pm = make_plugin_manager(load_entry_points=False)
    pm.hook.meshd_startup.call_historic(kwargs={"config": SimpleNamespace(role="waypoint")})
    seen: list[str] = []

    class Late:
        @hookimpl
        def meshd_startup(self, config: Any) -> None:
            seen.append(config.role)

    pm.register(Late())  # historic: a plugin registered after start-up still hears about it
    assert seen == ["waypoint"]


async def test_meshd_access_log() -> None:
    pm = make_plugin_manager(load_entry_points=False)
    records: list[dict[str, Any]] = []

    class Sink:
        @hookimpl
        def meshd_access_log(self, record: dict[str, Any]) -> Any:
            async def write() -> None:
                records.append(record)

            return write()  # hooks may return awaitables; the caller awaits them

    pm.register(Sink())
    for result in pm.hook.meshd_access_log(record={"response_code": 200}):
        if inspect.isawaitable(result):
            await result
    assert records == [{"response_code": 200}]


def test_meshd_no_route() -> None:
    pm = make_plugin_manager(load_entry_points=False)
    req = HttpRequest("GET", "/nowhere", "echo.default")
    assert pm.hook.meshd_no_route(request=req, service="echo.default") is None

    class Teapot:
        @hookimpl
        def meshd_no_route(self, request: HttpRequest, service: str | None) -> LocalResponse | None:
            return LocalResponse(418) if request.path == "/nowhere" else None

    pm.register(Teapot())
    assert pm.hook.meshd_no_route(request=req, service=None) == LocalResponse(418)  # firstresult


def test_misspelt_hook_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    class Typo:
        @hookimpl
        def meshd_filter_type(self) -> list[FilterType]:  # missing "s"
            return []

    def load(self: Any, group: str, name: str | None = None) -> int:
        self.register(Typo(), name="typo")
        return 1

    monkeypatch.setattr("pluggy.PluginManager.load_setuptools_entrypoints", load)
    with pytest.raises(PluginError, match="meshd_filter_type"):
        make_plugin_manager()


def test_plugin_infos_lists_builtins() -> None:
    infos = plugin_infos(make_plugin_manager(load_entry_points=False))
    assert [(i.name, i.source, i.filters) for i in infos][:2] == [
        ("meshd.retries", "builtin", ("retries",)),
        ("meshd.timeout", "builtin", ("timeout",)),
    ]
