"""Every hookspec has a test named after it; plus the manager's loud failures."""

from __future__ import annotations

import dataclasses
import inspect
import re
from types import SimpleNamespace
from typing import Any

import pytest

from meshd.plugins import hookimpl, hookspecs
from meshd.plugins.filters import Filter, FilterType, HttpRequest, LocalResponse
from meshd.plugins.manager import PluginError, filter_types, make_plugin_manager, plugin_infos
from tests.support.paths import REPO


def test_every_hookspec_is_prefixed_documented_and_tested() -> None:
    specs = [n for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, "meshd_spec")]
    assert specs and all(n.startswith("meshd_") for n in specs)
    for name in specs:
        assert ":param" in (vars(hookspecs)[name].__doc__ or "") or name == "meshd_filter_types"
        assert f"test_{name}" in globals(), f"no test for hook {name}"


def test_meshd_filter_types() -> None:
    pm = make_plugin_manager(load_entry_points=False)
    types = filter_types(pm)
    assert set(types) == {"retries", "timeout", "ratelimit", "fault", "headers", "wasm"}
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


def test_docs_describe_every_attribute_of_what_a_filter_gets() -> None:
    """docs/plugins.md, "What a filter gets": every public field, property and method of the objects
    handed to a filter is named there, so the reference cannot silently fall behind the code."""
    from meshd.plugins import filters as f

    text = (REPO / "docs" / "plugins.md").read_text()
    section = text[text.index("### What a filter gets") : text.index("### Settings, validated at load")]
    for cls in (f.HttpRequest, f.HttpResponse, f.Headers, f.LocalResponse, f.FilterContext, f.RequestInfo):
        assert f"`{cls.__name__}" in section, cls
        names = {fl.name for fl in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        names |= {n for n, _ in inspect.getmembers(cls) if not n.startswith("_")}
        names -= {"to_response"}  # meshd's own use, not a filter's
        for name in sorted(names):
            assert re.search(rf"`[^`]*\b{name}\b[^`]*`", section), (
                f"{cls.__name__}.{name} is not in docs/plugins.md"
            )
    for name in ("size", "complete", "replayable", "read", "chunks"):  # RequestBody, as request.body
        assert re.search(rf"`[^`]*\b{name}\b[^`]*`", section), f"RequestBody.{name} is not in docs/plugins.md"
