"""Built-in `wasm`: run a proxy-wasm plugin (ABI 0.2.0 / 0.2.1, as Envoy and Istio's WasmPlugin load them)
as a filter, sandboxed, beside Python filters.

    filters = [{ name = "wasm", settings = { module = "/etc/meshd/wasm/x.wasm", sha256 = "...",
                 root_id = "x", config = "...", fail_open = false } }]

The runtime is the optional `wasmtime` package (`pip install 'meshd-ambient[wasm]'`); without it a
policy naming this filter is refused at load, at the route's line, saying so. The module is compiled
once per content and instantiated per route when policy loads, so a SIGHUP that reloads policy picks up a
changed file, and a broken one (bad checksum, not wasm, imports the host lacks, a plugin that refuses its
configuration) refuses the reload with the reason while the running policy keeps the old module.

Per request the plugin gets an HTTP context: request headers, the request body (buffered while the
plugin answers StopIterationAndBuffer, up to `buffer_limit`), response headers, the response body, and
done/log/delete after the response. A failed callback (trap, fuel exhausted, proc_exit, memory limit)
fails that request: 500 with response flag `PLUGIN_ERROR` (or, with `fail_open`, the request goes on as
if the filter were absent) and `meshd_wasm_failures_total{filter,reason}` counts it; the waypoint serves on.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from meshd.config.schema import Issue
from meshd.plugins.filters import (
    CONTINUE,
    PLUGIN_ERROR,
    BodyResult,
    Filter,
    FilterContext,
    FilterType,
    HttpRequest,
    HttpResponse,
    LocalResponse,
    StepResult,
)
from meshd.plugins.hookspecs import hookimpl
from meshd.plugins.settings import doc
from meshd.plugins.wasm_abi import DataAction, LogLevel, MapType

if TYPE_CHECKING:
    from meshd.plugins.wasm_host import CallbackFailure, HttpStream, PluginConfig, PluginVM

log = logging.getLogger("meshd.plugins.wasm")

INSTALL_HINT = "install the wasm runtime: pip install 'meshd-ambient[wasm]' (PyPI wasmtime)"
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
LogLevelName = Literal["trace", "debug", "info", "warn", "error", "critical"]
_LEVELS: dict[str, int] = {"trace": 0, "debug": 1, "info": 2, "warn": 3, "error": 4, "critical": 5}


@dataclass(frozen=True)
class WasmSettings:
    module: Path = field(metadata=doc("the .wasm file (relative paths: to the policy folder)"))
    sha256: str | None = field(
        default=None, metadata=doc("pin the module's SHA-256 (hex); a mismatch refuses it")
    )
    config: str = field(default="", metadata=doc("the plugin configuration (proxy_on_configure's buffer)"))
    vm_config: str = field(default="", metadata=doc("the VM configuration (proxy_on_vm_start's buffer)"))
    root_id: str = field(default="", metadata=doc("the root context the plugin registered (Envoy's root_id)"))
    name: str | None = field(
        default=None,
        metadata=doc("the filter label in logs and metrics; default root_id, else the file's stem"),
    )
    fail_open: bool = field(default=False, metadata=doc("on a plugin failure let the request through"))
    fuel: int = field(default=20_000_000, metadata=doc("wasm instructions allowed per callback"))
    max_memory_mib: int = field(default=64, metadata=doc("linear memory limit per instance, MiB"))
    buffer_limit: int = field(
        default=1024 * 1024, metadata=doc("body bytes buffered for the plugin (413 beyond)")
    )
    log_level: LogLevelName = field(
        default="info", metadata=doc("lowest plugin log level passed to meshd's log")
    )

    def check(self) -> list[Issue]:
        issues = []
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            issues.append(Issue(("sha256",), "sha256 must be 64 hex digits", "sha256sum FILE prints it"))
        if self.fuel < 10_000:
            issues.append(
                Issue(("fuel",), f"fuel = {self.fuel} is too little to run any plugin", "leave the default")
            )
        if not 1 <= self.max_memory_mib <= 4096:
            issues.append(
                Issue(("max_memory_mib",), f"max_memory_mib = {self.max_memory_mib} is outside 1-4096")
            )
        if self.buffer_limit < 0:
            issues.append(Issue(("buffer_limit",), "buffer_limit must be 0 or more bytes"))
        return issues

    @property
    def label(self) -> str:
        return self.name or self.root_id or self.module.stem


RESTART_INTERVAL = 0.1  # seconds: at most one new VM per plugin this often (a new VM costs ~0.4 ms of CPU)


class WasmPlugin:
    """A compiled module and the VM its route's requests use: a new VM after one failed, but not more
    often than every RESTART_INTERVAL (the spec's crash-loop limit): until then requests fail with
    reason `broken` (or pass, with fail_open)."""

    def __init__(self, settings: WasmSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        try:
            from meshd.plugins import wasm_host  # the optional runtime; see the module docstring
        except ImportError as exc:
            raise ValueError(
                f"wasm filters need wasmtime, which is not installed ({exc}); {INSTALL_HINT}"
            ) from None
        self.host = wasm_host
        self.settings = settings
        self.config: PluginConfig = wasm_host.PluginConfig(
            name=settings.label,
            root_id=settings.root_id,
            vm_id="",
            configuration=settings.config.encode(),
            vm_configuration=settings.vm_config.encode(),
            fuel=settings.fuel,
            memory_limit=settings.max_memory_mib << 20,
            log_level=LogLevel(_LEVELS[settings.log_level]),
        )
        try:
            self.compiled = wasm_host.compile_module(settings.module, settings.sha256)
            self._vm: PluginVM = wasm_host.PluginVM(self.compiled, self.config)
        except wasm_host.ModuleError as exc:
            raise ValueError(str(exc)) from None
        self.restarts = 0
        self.rotations = 0  # new VMs because the old one used over half its memory
        self.clock = clock
        self._started = clock()

    @property
    def current(self) -> PluginVM:
        """The VM in use, broken or not (ticks never restart one)."""
        return self._vm

    def vm(self) -> PluginVM:
        """The VM for a new request: the current one, or a new one after a failure, or (memory) when the
        current one uses over half its memory limit. The AssemblyScript SDK 0.1.8 leaks ~40 bytes per
        context: rather than let a VM reach its limit and fail a request, new requests go to a fresh VM
        and the old one finishes its own (the plugin's state starts over, as after a crash)."""
        vm = self._vm
        if vm.broken is None:
            if 2 * vm.memory_size() <= self.config.memory_limit:
                return vm
            now = self.clock()
            if now - self._started < RESTART_INTERVAL:
                return vm
            self._started = now
            try:
                self._vm = self.host.PluginVM(self.compiled, self.config)
            except self.host.ModuleError:
                return vm  # keep serving on the old one; its limit still protects the waypoint
            self.rotations += 1
            return self._vm
        now = self.clock()
        if now - self._started < RESTART_INTERVAL:
            raise self.host.CallbackFailure(
                "broken", f"the VM failed and is not restarted yet: {self._vm.broken}"
            )
        self._started = now
        try:
            self._vm = self.host.PluginVM(self.compiled, self.config)
        except self.host.ModuleError as exc:
            raise self.host.CallbackFailure("broken", f"cannot restart the VM: {exc}") from None
        self.restarts += 1
        return self._vm


class WasmFilter(Filter):
    def __init__(self, settings: WasmSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.plugin = WasmPlugin(settings, clock=clock)
        self.settings = settings
        self._logged: set[str] = set()

    def tick(self) -> float:
        """Run the plugin's due `proxy_on_tick` (the waypoint's tick task calls this); seconds until its
        next tick, `inf` if it has none. A failed tick breaks the VM: the next request gets a new one."""
        vm = self.plugin.current
        if vm.broken is not None or vm.next_tick is None:
            return math.inf
        try:
            vm.maybe_tick()
        except self.plugin.host.CallbackFailure as failure:
            if "tick" not in self._logged:
                self._logged.add("tick")
                log.error(
                    "wasm filter %r failed in proxy_on_tick (%s): %s",
                    self.settings.label,
                    failure.reason,
                    failure,
                )
            return math.inf
        return math.inf if vm.next_tick is None else max(vm.next_tick - vm.clock(), 0.0)

    # ---- failures ------------------------------------------------------------------------------------

    def _failed(self, ctx: FilterContext, failure: CallbackFailure) -> LocalResponse | None:
        """Count and log; None when failing open (the caller passes the request on)."""
        label = self.settings.label
        ctx.info.wasm_failures.append((label, failure.reason))
        ctx.state["stream"] = None  # no more callbacks for this request
        if failure.reason not in self._logged:  # once per (filter, reason) per load; the metric counts
            self._logged.add(failure.reason)
            log.error(
                "wasm filter %r failed on route %r (%s): %s%s",
                label,
                ctx.info.route,
                failure.reason,
                failure,
                "; failing open" if self.settings.fail_open else "",
            )
        if self.settings.fail_open:
            return None
        return LocalResponse(500, body=b"wasm filter failed\n", flag=PLUGIN_ERROR)

    def _stream(self, ctx: FilterContext) -> HttpStream | None:
        stream: HttpStream | None = ctx.state.get("stream")
        return stream

    # ---- the chain's steps ---------------------------------------------------------------------------

    def on_request_headers(self, ctx: FilterContext, request: HttpRequest) -> StepResult:
        try:
            vm = self.plugin.vm()
            stream = vm.open_stream(ctx.info, request)
            ctx.state["stream"] = stream  # the only strong reference: see PluginVM.open_stream
            vm.stream_call(stream, "proxy_on_request_headers", len(request.headers) + 4, 0)
        except self.plugin.host.CallbackFailure as failure:
            return self._failed(ctx, failure) or CONTINUE
        return _take_local(stream) or CONTINUE

    def on_request_body(self, ctx: FilterContext, chunk: bytes, end: bool) -> BodyResult:
        stream = self._stream(ctx)
        if stream is None:
            return CONTINUE
        return self._body(ctx, stream, chunk, end, response=False)

    def on_response_headers(self, ctx: FilterContext, response: HttpResponse) -> StepResult:
        stream = self._stream(ctx)
        if stream is None:
            return CONTINUE
        stream.response = response
        stream.fields.pop(MapType.HTTP_RESPONSE_HEADERS, None)
        try:
            stream.vm.stream_call(stream, "proxy_on_response_headers", len(response.headers) + 1, 0)
        except self.plugin.host.CallbackFailure as failure:
            return self._failed(ctx, failure) or CONTINUE
        return _take_local(stream) or CONTINUE

    def on_response_body(self, ctx: FilterContext, chunk: bytes, end: bool) -> BodyResult:
        stream = self._stream(ctx)
        if stream is None:
            return CONTINUE
        return self._body(ctx, stream, chunk, end, response=True)

    def _body(
        self, ctx: FilterContext, stream: HttpStream, chunk: bytes, end: bool, *, response: bool
    ) -> BodyResult:
        """Buffer while the plugin pauses (StopIterationAndBuffer); release what it lets through."""
        attr = "response_body" if response else "request_body"
        seen = f"{attr}_seen"
        held: bytes = getattr(stream, attr)
        buffered = held + chunk
        if not buffered and end and not ctx.state.get(seen):
            return CONTINUE  # no body at all: Envoy does not call on_*_body for a headers-only message
        ctx.state[seen] = True
        if held and len(buffered) > self.settings.buffer_limit:  # the plugin paused: it holds the body
            setattr(stream, attr, b"")
            ctx.state["stream"] = None
            return LocalResponse(413 if not response else 500, body=b"body too large for the wasm filter\n")
        setattr(stream, attr, buffered)
        callback = "proxy_on_response_body" if response else "proxy_on_request_body"
        try:
            action = stream.vm.stream_call(stream, callback, len(buffered), int(end))
        except self.plugin.host.CallbackFailure as failure:
            local = self._failed(ctx, failure)
            setattr(stream, attr, b"")
            return local or buffered
        local = _take_local(stream)
        if local is not None:
            return local
        if (
            action in (DataAction.STOP_ITERATION_AND_BUFFER, DataAction.STOP_ITERATION_AND_WATERMARK)
            and not end
        ):
            return b""  # held in the stream's buffer until the plugin continues
        out: bytes = getattr(stream, attr)
        setattr(stream, attr, b"")
        if action == DataAction.STOP_ITERATION_NO_BUFFER and not end:
            return b""
        return out

    def on_log(self, ctx: FilterContext, record: dict[str, Any]) -> None:
        stream = self._stream(ctx)
        if stream is None:
            return
        try:
            stream.vm.close_stream(stream)
        except self.plugin.host.CallbackFailure as failure:
            self._failed(ctx, failure)


def _take_local(stream: HttpStream) -> LocalResponse | None:
    """The local response the plugin sent during the last callback (once)."""
    local, stream.local = stream.local, None
    return local


@hookimpl
def meshd_filter_types() -> list[FilterType]:
    return [
        FilterType(
            "wasm",
            WasmFilter,
            WasmSettings,
            "run a proxy-wasm plugin (ABI 0.2.x), sandboxed; needs meshd-ambient[wasm]",
        )
    ]
