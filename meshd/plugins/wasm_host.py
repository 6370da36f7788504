"""The proxy-wasm host: wasmtime around the pure ABI (`wasm_abi`). Needs the optional `wasmtime` package
(`pip install 'meshd-ambient[wasm]'`); `meshd.plugins.wasm` imports this module only when a route names a
wasm filter.

Theory of operation
  * One `wasmtime.Engine` per process, with fuel metering on. A module is compiled once per content
    (`compile_module`, cached by SHA-256), so a policy reload with an unchanged file costs a hash.
  * A `PluginVM` is one Store + Instance of a module with its own memory limit, and one root context
    (id 1): `proxy_on_context_create(1, 0)`, `proxy_on_vm_start`, `proxy_on_configure`. Each request
    gets an `HttpStream` (an HTTP context, ids from 2 up) in the VM.
  * Every call into the module gets a fresh fuel budget; running out is a trap. A trap, `proc_exit`, or
    a bug in a host function ends that callback with `CallbackFailure(reason)`, and the VM is marked
    broken: its in-flight streams fail too, and a later request gets a new VM (the plugin's own state
    is lost, as the spec's "plugin crashes" section asks; `meshd.plugins.wasm` limits how often).
    Nothing propagates to the waypoint.
  * The host functions see the request through the *effective* context (the stream whose callback is
    running, or one chosen by `proxy_set_effective_context`). A value returned to the module is copied
    into memory the module allocates (`proxy_on_memory_allocate` / `malloc`).
  * Tick timers: the waypoint's tick task calls `maybe_tick` when a tick is due (`WasmFilter.tick`),
    and a due tick also runs before the VM's next callback.

Must never know: trio, sockets, the filter chain's order (that is `meshd.plugins.wasm`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import struct
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Final

import wasmtime

from meshd.plugins import wasm_abi as abi
from meshd.plugins.filters import Headers, HttpRequest, HttpResponse, LocalResponse, RequestInfo
from meshd.plugins.wasm_abi import AbiError, Status

ffi: Any
try:  # the C API: calls without wasmtime-py's per-value boxing (see RAW); private, so optional
    from wasmtime import _ffi as ffi
except ImportError:  # pragma: no cover - a wasmtime-py without it: the public API only
    ffi = None

log = logging.getLogger("meshd.plugins.wasm")

ROOT_CONTEXT_ID: Final = 1

# wasmtime-py boxes every argument and result of every call (a FuncType and ValType objects per call):
# ~20 us a crossing, and the AssemblyScript SDK crosses ~30 times per request. RAW uses the C API's
# unchecked calls instead (raw values in a ctypes array); the signatures are checked once, at load
# (`wasm_abi.CALLBACKS`, `wasm_abi.IMPORT_MODULES`). False: wasmtime-py's public API only.
RAW: bool = ffi is not None and all(
    hasattr(ffi, name)
    for name in (
        "wasmtime_func_new_unchecked",
        "wasmtime_func_call_unchecked",
        "wasmtime_val_raw_t",
        "wasmtime_memory_data",
        "wasmtime_memory_data_size",
        "wasmtime_trap_new",
        "wasmtime_context_set_fuel",
        "dll",
    )
)
if RAW:  # the C functions themselves, without _bindings' Python wrappers (a frame per call)
    _set_fuel = ffi.dll.wasmtime_context_set_fuel
    _call_unchecked = ffi.dll.wasmtime_func_call_unchecked
    _memory_data = ffi.dll.wasmtime_memory_data
    _memory_data_size = ffi.dll.wasmtime_memory_data_size
# A raw host function's C signature with plain addresses (no ctypes POINTER objects per call).
_RAW_CALLBACK: Final = ctypes.CFUNCTYPE(
    ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t
)
_RAW_SLOT: Final = 16  # sizeof(wasmtime_val_raw_t)
_RESULT: Final = struct.Struct("<I")
_MAX_MAP: Final = max(abi.MapType)
_MAX_BUFFER: Final = max(abi.BufferType)
_NO_FINALIZER: Final = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _env: None)
_LEVELS: Final = {
    abi.LogLevel.TRACE: logging.DEBUG,
    abi.LogLevel.DEBUG: logging.DEBUG,
    abi.LogLevel.INFO: logging.INFO,
    abi.LogLevel.WARN: logging.WARNING,
    abi.LogLevel.ERROR: logging.ERROR,
    abi.LogLevel.CRITICAL: logging.CRITICAL,
}


class ModuleError(Exception):
    """A module cannot be used (unreadable, wrong checksum, not wasm, imports the host lacks, refused
    its configuration). The message says which and what to do."""


class CallbackFailure(Exception):
    """A call into the module failed; `reason` is the metric's label: fuel, trap, exit, memory, host,
    broken (an earlier failure of the same VM)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _ProcExit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"the module called proc_exit({code})")
        self.code = code


@cache
def engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.consume_fuel = True
    config.cranelift_opt_level = "speed"
    return wasmtime.Engine(config)


# ---- compiling -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledModule:
    path: Path
    sha256: str
    module: wasmtime.Module
    abi_version: str


_COMPILED: OrderedDict[str, CompiledModule] = OrderedDict()
_COMPILED_KEEP: Final = 16


def _imports(module: wasmtime.Module) -> list[abi.Import]:
    out = []
    for imp in module.imports:
        ty = imp.type
        if isinstance(ty, wasmtime.FuncType):
            out.append(
                abi.Import(
                    imp.module,
                    imp.name or "",
                    "func",
                    tuple(str(p) for p in ty.params),
                    tuple(str(r) for r in ty.results),
                )
            )
        else:
            kind = type(ty).__name__.removesuffix("Type").lower()
            out.append(abi.Import(imp.module, imp.name or "", kind))
    return out


def compile_module(path: Path, sha256: str | None = None) -> CompiledModule:
    """Read, check and compile `path` (once per content). Raises ModuleError."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModuleError(f"cannot read wasm module {str(path)!r}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256.lower():
        raise ModuleError(
            f"{path} has SHA-256 {digest}, not the {sha256} the settings pin "
            "(update sha256 after replacing the module)"
        )
    cached = _COMPILED.get(digest)
    if cached is not None and cached.path == path:
        _COMPILED.move_to_end(digest)
        return cached
    try:
        module = wasmtime.Module(engine(), data)
    except wasmtime.WasmtimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise ModuleError(f"{path} is not a valid WebAssembly module: {first}") from None
    missing = abi.missing_imports(_imports(module))
    if missing:
        raise ModuleError(f"{path} imports what this host does not provide: {'; '.join(missing)}")
    exported = [
        (e.name, tuple(str(p) for p in e.type.params), tuple(str(r) for r in e.type.results))
        for e in module.exports
        if isinstance(e.type, wasmtime.FuncType)
    ]
    wrong = abi.bad_callbacks(exported)
    if wrong:
        raise ModuleError(f"{path} exports callbacks with the wrong signature: {'; '.join(wrong)}")
    try:
        version = abi.abi_version(e.name for e in module.exports)
    except AbiError as exc:
        raise ModuleError(f"{path}: {exc}") from None
    compiled = CompiledModule(path, digest, module, version)
    _COMPILED[digest] = compiled
    while len(_COMPILED) > _COMPILED_KEEP:
        _COMPILED.popitem(last=False)
    return compiled


# ---- the header maps a plugin sees ---------------------------------------------------------------


class _Fields:
    """HTTP fields as a plugin sees them: pseudo-headers first (`:method`, `:path`, ... / `:status`),
    then the message's headers."""

    def __init__(
        self,
        headers: Headers,
        pseudo: Mapping[str, Callable[[], str]] | None = None,
        set_pseudo: Callable[[str, str], None] | None = None,
    ) -> None:
        self.headers = headers
        self.pseudo = pseudo or {}
        self.set_pseudo = set_pseudo

    def pairs(self) -> list[tuple[str, str]]:
        return [(k, get()) for k, get in self.pseudo.items()] + self.headers.items()

    def get(self, name: str) -> str | None:
        if name.startswith(":"):
            getter = self.pseudo.get(name)
            return getter() if getter is not None else None
        return self.headers.get(name)

    def add(self, name: str, value: str) -> None:
        if name.startswith(":"):
            self.replace(name, value)
        else:
            self.headers.add(name, value)

    def replace(self, name: str, value: str) -> None:
        if name.startswith(":"):
            if name in self.pseudo and self.set_pseudo is not None:
                self.set_pseudo(name, value)
            return
        self.headers.set(name, value)

    def remove(self, name: str) -> None:
        if not name.startswith(":"):
            self.headers.remove(name)

    def set_pairs(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Replace every field (the `Headers` object stays: the chain holds it)."""
        for name in {k for k, _ in self.headers.items()}:
            self.headers.remove(name)
        for name, value in pairs:
            if name.startswith(":"):
                self.replace(name, value)
            else:
                self.headers.add(name.lower(), value)


def request_fields(request: HttpRequest) -> _Fields:
    def set_pseudo(name: str, value: str) -> None:
        if name == ":method":
            request.method = value
        elif name == ":path":
            request.path = value
        elif name == ":authority":
            request.authority = value
        elif name == ":scheme":
            request.scheme = value

    return _Fields(
        request.headers,
        {
            ":method": lambda: request.method,
            ":path": lambda: request.path,
            ":authority": lambda: request.authority,
            ":scheme": lambda: request.scheme,
        },
        set_pseudo,
    )


def response_fields(response: HttpResponse) -> _Fields:
    def set_pseudo(name: str, value: str) -> None:
        if name == ":status":
            if not value.isdigit() or not 100 <= int(value) <= 599:
                raise AbiError(Status.BAD_ARGUMENT, f":status {value!r} is not a status code")
            response.status = int(value)

    return _Fields(response.headers, {":status": lambda: str(response.status)}, set_pseudo)


# ---- an HTTP context -----------------------------------------------------------------------------


@dataclass
class HttpStream:
    """One request's HTTP context in a VM: what the host functions read and change."""

    vm: PluginVM
    id: int
    info: RequestInfo
    request: HttpRequest
    response: HttpResponse | None = None
    request_body: bytes = b""  # buffered while the plugin pauses the body (StopIterationAndBuffer)
    response_body: bytes = b""
    local: LocalResponse | None = None
    closed: bool = False
    fields: dict[abi.MapType, _Fields] = field(default_factory=dict)
    finalizer: weakref.finalize | None = None  # type: ignore[type-arg]

    def map(self, kind: int) -> _Fields:
        if not 0 <= kind <= _MAX_MAP:
            raise AbiError(Status.BAD_ARGUMENT, f"unknown map type {kind}")
        fields = self.fields.get(abi.MapType(kind))
        if fields is not None:
            return fields
        if kind == abi.MapType.HTTP_REQUEST_HEADERS:
            fields = request_fields(self.request)
        elif kind == abi.MapType.HTTP_REQUEST_TRAILERS:
            fields = _Fields(self.request.trailers)
        elif kind == abi.MapType.HTTP_RESPONSE_HEADERS and self.response is not None:
            fields = response_fields(self.response)
        elif kind == abi.MapType.HTTP_RESPONSE_TRAILERS and self.response is not None:
            fields = _Fields(self.response.trailers)
        else:
            raise AbiError(Status.NOT_FOUND, f"map {abi.MapType(kind).name} is not available here")
        self.fields[abi.MapType(kind)] = fields
        return fields

    def properties(self) -> dict[tuple[str, ...], abi.PropertyValue]:
        vm, info, request = self.vm, self.info, self.request
        props = vm.plugin_properties()
        props[("route_name",)] = info.route
        props[("xds", "route_name")] = info.route
        if info.source_principal is not None:
            uri = f"spiffe://{info.source_principal}"
            props[("source", "principal")] = uri
            props[("connection", "uri_san_peer_certificate")] = uri
        props[("connection", "mtls")] = info.source_principal is not None
        if info.source_address:
            props[("source", "address")] = info.source_address
            _, _, port = info.source_address.rpartition(":")
            if port.isdigit():
                props[("source", "port")] = int(port)
        if info.destination_service:
            props[("destination", "service")] = info.destination_service
        props[("request", "path")] = request.path
        props[("request", "url_path")] = request.path_only
        props[("request", "host")] = request.authority
        props[("request", "method")] = request.method
        props[("request", "scheme")] = request.scheme
        props[("request", "headers")] = request.headers.items()
        _, _, query = request.path.partition("?")
        props[("request", "query")] = query
        for name, key in (("id", "x-request-id"), ("useragent", "user-agent"), ("referer", "referer")):
            value = request.headers.get(key)
            if value is not None:
                props[("request", name)] = value
        if self.response is not None:
            props[("response", "code")] = self.response.status
            props[("response", "headers")] = self.response.headers.items()
        return props


# ---- the VM --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginConfig:
    """What a route's settings give the VM."""

    name: str  # plugin_name; the metric's filter label
    root_id: str
    vm_id: str
    configuration: bytes
    vm_configuration: bytes
    fuel: int  # per callback
    memory_limit: int  # bytes, per instance
    log_level: abi.LogLevel


class PluginVM:
    """One instance of a compiled module with its root context. Not thread-safe; callbacks never await."""

    def __init__(
        self, compiled: CompiledModule, config: PluginConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.compiled = compiled
        self.config = config
        self.clock = clock
        self.broken: str | None = None
        self.store = wasmtime.Store(engine())
        self.store.set_limits(memory_size=config.memory_limit)
        self.raw = RAW
        self._ctx = self.store._context()
        self._pending: BaseException | None = None  # raised by a host function during a raw call
        self._keep: list[Any] = []  # ctypes callbacks of the raw host functions: alive as long as the VM
        # Weak: a request that ends without on_log (the client went away) drops its stream; the
        # stream's finalizer queues its id in `abandoned`, and the next open_stream closes it in the
        # module (never from the garbage collector's context: that could re-enter the module).
        self.streams: weakref.WeakValueDictionary[int, HttpStream] = weakref.WeakValueDictionary()
        self.abandoned: list[int] = []
        self.effective: HttpStream | None = None
        self._next_id = ROOT_CONTEXT_ID + 1
        self.tick_period: float = 0.0
        self.next_tick: float | None = None
        imports = [self._host_function(imp) for imp in compiled.module.imports]
        self.store.set_fuel(config.fuel)
        try:
            self.instance = wasmtime.Instance(self.store, compiled.module, imports)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            raise ModuleError(f"{compiled.path}: cannot instantiate: {_first_line(exc)}") from None
        exports = self.instance.exports(self.store)
        memory = exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self.memory = memory
        self._memory_ref = ctypes.byref(memory._memory)
        self._mapped_base = 0
        self._mapped_size = -1
        self._exports = exports
        self._alloc = self._export(*abi.ALLOCATORS)
        assert self._alloc is not None
        try:
            for start in ("_initialize", "_start"):
                init = self._export(start)
                if init is not None:
                    self._call(init)
                    break
            self._root_call("proxy_on_context_create", ROOT_CONTEXT_ID, 0)
            if not self._root_call("proxy_on_vm_start", ROOT_CONTEXT_ID, len(config.vm_configuration)):
                raise ModuleError(f"{compiled.path}: proxy_on_vm_start refused the VM configuration")
            if not self._root_call("proxy_on_configure", ROOT_CONTEXT_ID, len(config.configuration)):
                raise ModuleError(f"{compiled.path}: proxy_on_configure refused the plugin configuration")
        except CallbackFailure as exc:
            raise ModuleError(f"{compiled.path}: failed while starting ({exc.reason}): {exc}") from None

    # ---- calling in --------------------------------------------------------------------------------

    def _export(self, *names: str) -> wasmtime.Func | None:
        for name in names:
            try:
                item = self._exports[name]
            except KeyError:
                continue
            if isinstance(item, wasmtime.Func):
                return item
        return None

    def _call(self, func: wasmtime.Func, *args: int) -> Any:
        if self.broken is not None:
            raise CallbackFailure("broken", f"the VM failed earlier: {self.broken}")
        try:
            if self.raw:
                return self._invoke(func, args)
            self.store.set_fuel(self.config.fuel)
            return func(self.store, *args)
        except _ProcExit as exc:
            failure = CallbackFailure("exit", str(exc))
        except AbiError as exc:  # raised where a host function cannot answer with a status
            failure = CallbackFailure("host", str(exc))
        except wasmtime.Trap as exc:
            code = exc.trap_code
            reason = "fuel" if code == wasmtime.TrapCode.OUT_OF_FUEL else "trap"
            failure = CallbackFailure(reason, _first_line(exc))
        except wasmtime.WasmtimeError as exc:
            failure = CallbackFailure("trap", _first_line(exc))
        except Exception as exc:  # a host function's bug: the plugin's request fails, not the waypoint
            log.exception("wasm host function failed")
            failure = CallbackFailure("host", repr(exc))
        # Runtimes grow memory by doubling: a failure with over half the limit in use was most likely a
        # refused memory.grow (wasmtime answers -1; the module then traps or exits).
        if failure.reason in ("exit", "trap") and 2 * self._memory_size() > self.config.memory_limit:
            failure = CallbackFailure(
                "memory", f"{failure} (memory at its limit of {self.config.memory_limit} bytes)"
            )
        self.broken = str(failure)
        raise failure

    def _invoke(self, func: wasmtime.Func, args: tuple[int, ...]) -> int:
        """Call with raw values (the signature was checked at load); re-raise a host function's error."""
        err = _set_fuel(self._ctx, self.config.fuel)
        if err:
            raise wasmtime.WasmtimeError._from_ptr(err)
        vals = (ffi.wasmtime_val_raw_t * max(len(args), 1))()
        for i, arg in enumerate(args):
            vals[i].i32 = arg
        trap = ctypes.POINTER(ffi.wasm_trap_t)()
        self._pending = None
        err = _call_unchecked(self._ctx, ctypes.byref(func._func), vals, len(vals), ctypes.byref(trap))
        pending, self._pending = self._pending, None
        if pending is not None:
            raise pending
        if err:
            raise wasmtime.WasmtimeError._from_ptr(err)
        if trap:
            raise wasmtime.Trap._from_ptr(trap)
        return int(vals[0].i32)

    def _root_call(self, name: str, *args: int) -> int:
        """Call a root context callback; its result (1 if it has none, or is not exported)."""
        func = self._export(name)
        if func is None:
            return 1
        result = self._call(func, *args)
        return int(result) if _returns(name) and result is not None else 1

    def maybe_tick(self) -> None:
        if self.next_tick is None or self.broken is not None:
            return
        now = self.clock()
        if now < self.next_tick:
            return
        self.next_tick = now + self.tick_period
        self._root_call("proxy_on_tick", ROOT_CONTEXT_ID)

    def stream_call(self, stream: HttpStream, name: str, *args: int) -> int:
        """Call an HTTP context's callback with `stream` effective; its int result (0 if none)."""
        self.maybe_tick()
        func = self._export(name)
        if func is None:
            return 0
        self.effective = stream
        try:
            result = self._call(func, stream.id, *args)
        finally:
            self.effective = None
        return int(result) if _returns(name) and result is not None else 0

    def open_stream(self, info: RequestInfo, request: HttpRequest) -> HttpStream:
        while self.abandoned:
            self._close_context(self.abandoned.pop())
        stream = HttpStream(self, self._next_id, info, request)
        self._next_id += 1
        self.streams[stream.id] = stream
        stream.finalizer = weakref.finalize(stream, self.abandoned.append, stream.id)
        self.maybe_tick()
        create = self._export("proxy_on_context_create")
        if create is not None:
            self.effective = stream
            try:
                self._call(create, stream.id, ROOT_CONTEXT_ID)
            finally:
                self.effective = None
        return stream

    def close_stream(self, stream: HttpStream) -> None:
        """proxy_on_done, proxy_on_log, proxy_on_delete (the spec's order); forget the stream."""
        if stream.closed:
            return
        stream.closed = True
        if stream.finalizer is not None:
            stream.finalizer.detach()
        try:
            if self.broken is None:
                self.stream_call(stream, "proxy_on_done")
                self.stream_call(stream, "proxy_on_log")
                self.stream_call(stream, "proxy_on_delete")
        finally:
            self.streams.pop(stream.id, None)

    def _close_context(self, context_id: int) -> None:
        """End an abandoned stream's context in the module (no stream is effective: its request is gone)."""
        for name in ("proxy_on_done", "proxy_on_log", "proxy_on_delete"):
            func = self._export(name)
            if func is not None and self.broken is None:
                self._call(func, context_id)

    def plugin_properties(self) -> dict[tuple[str, ...], abi.PropertyValue]:
        c = self.config
        return {("plugin_name",): c.name, ("plugin_root_id",): c.root_id, ("plugin_vm_id",): c.vm_id}

    # ---- guest memory ------------------------------------------------------------------------------

    def memory_size(self) -> int:
        """Bytes of linear memory the module has now."""
        return self._memory_size()

    def _memory_size(self) -> int:
        if not self.raw:
            return self.memory.data_len(self.store)
        return int(_memory_data_size(self._ctx, self._memory_ref))

    def _address(self, ptr: int, size: int) -> int:
        """Where [ptr, ptr + size) of the module's memory is in ours, once checked to lie inside it.
        The memory moves only when it grows, so its base is looked up again only when its size changed."""
        length = self._memory_size()
        if ptr < 0 or size < 0 or ptr + size > length:
            raise AbiError(
                Status.INVALID_MEMORY_ACCESS, f"[{ptr}, {ptr + size}) is outside the module's memory"
            )
        if length != self._mapped_size:
            data = _memory_data(self._ctx, self._memory_ref) if self.raw else self.memory.data_ptr(self.store)
            self._mapped_base = ctypes.cast(data, ctypes.c_void_p).value or 0
            self._mapped_size = length
        return self._mapped_base + ptr

    def read(self, ptr: int, size: int) -> bytes:
        return ctypes.string_at(self._address(ptr, size), size) if size else b""

    def write(self, ptr: int, data: bytes) -> None:
        ctypes.memmove(self._address(ptr, len(data)), data, len(data))

    def write_u32(self, ptr: int, value: int) -> None:
        self.write(ptr, struct.pack("<I", value & 0xFFFFFFFF))

    def give(self, data: bytes, ptr_ptr: int, size_ptr: int, *, allocate_empty: bool = False) -> None:
        """Copy `data` into memory the module allocates; store its address and size for the module.

        `allocate_empty`: an empty value still gets a (zero-length) allocation. The AssemblyScript SDK
        0.1.8 reads the plugin configuration with its *size* as `size_ptr`, so the size it keeps is
        stale; a real zero-length buffer is what keeps its empty configuration empty."""
        addr = 0
        if data or allocate_empty:
            assert self._alloc is not None
            addr = (
                self._invoke(self._alloc, (len(data),))
                if self.raw
                else int(self._alloc(self.store, len(data)))
            )
            addr &= 0xFFFFFFFF
            if addr == 0:
                raise AbiError(Status.INVALID_MEMORY_ACCESS, "the module's allocator returned NULL")
            if data:
                self.write(addr, data)
        self.write_u32(ptr_ptr, addr)
        self.write_u32(size_ptr, len(data))

    # ---- host functions ----------------------------------------------------------------------------

    def _host_function(self, imp: wasmtime.ImportType) -> wasmtime.Func:
        table = abi.IMPORT_MODULES[imp.module]
        name = imp.name or ""
        spec = table[name]
        ty = imp.type
        assert isinstance(ty, wasmtime.FuncType)
        wasi = imp.module != "env"
        impl = getattr(self, f"_wasi_{name}" if wasi else f"_{name}", None) if spec.implemented else None
        fn: Callable[..., int | None]
        if impl is None:
            status = abi.WasiErrno.NOTSUP if wasi else Status.UNIMPLEMENTED
            if name == "proxy_call_foreign_function":
                status = Status.NOT_FOUND

            def stub(*_args: int) -> int:
                return int(status)

            fn = stub
        elif spec.results:

            def guarded(*args: int) -> int:
                try:
                    return int(impl(*args))
                except AbiError as exc:
                    if not wasi:
                        return int(exc.status)
                    invalid = exc.status == Status.INVALID_MEMORY_ACCESS
                    return int(abi.WasiErrno.FAULT if invalid else abi.WasiErrno.INVAL)

            fn = guarded
        else:
            fn = impl
        if self.raw:
            drop_below = int(self.config.log_level) if name == "proxy_log" and not wasi else -1
            return self._raw_function(ty, fn, spec, drop_below)
        return wasmtime.Func(self.store, ty, fn)

    def _raw_function(
        self,
        ty: wasmtime.FuncType,
        fn: Callable[..., int | None],
        spec: abi.HostFunction,
        drop_below: int = -1,
    ) -> wasmtime.Func:
        """A host function called with raw values, read and written with one struct call each: i32
        arguments as unsigned (pointers, sizes), i64 signed. `drop_below` (proxy_log): a level below it
        answers OK before anything else is done (the SDKs log a lot at debug)."""
        slots = struct.Struct("<" + "".join("q8x" if p == abi.I64 else "I12x" for p in spec.params))
        size = max(slots.size, _RAW_SLOT if spec.results else 0)
        has_result = bool(spec.results)
        vm = self

        def callback(_env: int | None, _caller: int | None, vals: int, _n: int) -> int:
            try:
                view = (ctypes.c_char * size).from_address(vals) if size else b""
                args = slots.unpack_from(view)
                if args and args[0] < drop_below:
                    _RESULT.pack_into(view, 0, 0)
                    return 0
                result = fn(*args)
                if has_result:
                    _RESULT.pack_into(view, 0, (result or 0) & 0xFFFFFFFF)
                return 0
            except BaseException as exc:  # re-raised by _invoke once the module has unwound
                vm._pending = exc
                message = b"host function failed"
                trap = ffi.wasmtime_trap_new(ctypes.c_char_p(message), len(message))
                return ctypes.cast(trap, ctypes.c_void_p).value or 0

        c_callback = _RAW_CALLBACK(callback)
        self._keep.append(c_callback)
        raw = ffi.wasmtime_func_t()
        ffi.wasmtime_func_new_unchecked(
            self._ctx,
            ty.ptr(),
            ctypes.cast(c_callback, ffi.wasmtime_func_unchecked_callback_t),
            None,
            _NO_FINALIZER,
            ctypes.byref(raw),
        )
        return wasmtime.Func._from_raw(raw)

    def _stream(self) -> HttpStream:
        if self.effective is None:
            raise AbiError(Status.NOT_FOUND, "no HTTP stream is effective in this callback")
        return self.effective

    # logging, time
    def _proxy_log(self, level: int, ptr: int, size: int) -> int:
        if level < self.config.log_level:
            return Status.OK
        message = self.read(ptr, size).decode("utf-8", "replace")
        log.log(
            _LEVELS.get(abi.LogLevel(min(max(level, 0), 5)), logging.INFO),
            "[wasm %s] %s",
            self.config.name,
            message,
        )
        return Status.OK

    def _proxy_get_log_level(self, ptr: int) -> int:
        self.write_u32(ptr, int(self.config.log_level))
        return Status.OK

    def _proxy_get_current_time_nanoseconds(self, ptr: int) -> int:
        self.write(ptr, struct.pack("<Q", time.time_ns()))
        return Status.OK

    def _proxy_set_tick_period_milliseconds(self, ms: int) -> int:
        self.tick_period = ms / 1000
        self.next_tick = self.clock() + self.tick_period if ms else None
        return Status.OK

    def _proxy_set_effective_context(self, context_id: int) -> int:
        if context_id == ROOT_CONTEXT_ID:
            self.effective = None
            return Status.OK
        stream = self.streams.get(context_id)
        if stream is None:
            return Status.BAD_ARGUMENT
        self.effective = stream
        return Status.OK

    # buffers
    def _buffer(self, kind: int) -> bytes:
        if kind == abi.BufferType.PLUGIN_CONFIGURATION:
            return self.config.configuration
        if kind == abi.BufferType.VM_CONFIGURATION:
            return self.config.vm_configuration
        if kind == abi.BufferType.HTTP_REQUEST_BODY:
            return self._stream().request_body
        if kind == abi.BufferType.HTTP_RESPONSE_BODY:
            return self._stream().response_body
        if 0 <= kind <= _MAX_BUFFER:
            raise AbiError(Status.NOT_FOUND, f"buffer {abi.BufferType(kind).name} is not available")
        raise AbiError(Status.BAD_ARGUMENT, f"unknown buffer type {kind}")

    def _proxy_get_buffer_bytes(
        self, kind: int, start: int, max_size: int, ptr_ptr: int, size_ptr: int
    ) -> int:
        data = abi.buffer_slice(self._buffer(kind), start, max_size)
        self.give(data, ptr_ptr, size_ptr, allocate_empty=True)
        return Status.OK

    def _proxy_get_buffer_status(self, kind: int, size_ptr: int, flags_ptr: int) -> int:
        self.write_u32(size_ptr, len(self._buffer(kind)))
        self.write_u32(flags_ptr, 0)
        return Status.OK

    def _proxy_set_buffer_bytes(self, kind: int, start: int, size: int, ptr: int, value_size: int) -> int:
        value = self.read(ptr, value_size)
        current = self._buffer(kind)
        stream = self._stream()
        if kind == abi.BufferType.HTTP_REQUEST_BODY:
            stream.request_body = abi.buffer_edit(current, start, size, value)
        elif kind == abi.BufferType.HTTP_RESPONSE_BODY:
            stream.response_body = abi.buffer_edit(current, start, size, value)
        else:
            return Status.BAD_ARGUMENT  # configuration buffers are read-only
        return Status.OK

    # HTTP fields
    def _text(self, ptr: int, size: int, what: str) -> str:
        return abi.decode_text(self.read(ptr, size), what)

    def _proxy_get_header_map_size(self, kind: int, size_ptr: int) -> int:
        pairs = self._stream().map(kind).pairs()
        self.write_u32(size_ptr, len(abi.serialize_map([(k.encode(), v.encode()) for k, v in pairs])))
        return Status.OK

    def _proxy_get_header_map_pairs(self, kind: int, ptr_ptr: int, size_ptr: int) -> int:
        pairs = self._stream().map(kind).pairs()
        self.give(abi.serialize_map([(k.encode(), v.encode()) for k, v in pairs]), ptr_ptr, size_ptr)
        return Status.OK

    def _proxy_set_header_map_pairs(self, kind: int, ptr: int, size: int) -> int:
        pairs = [
            (abi.decode_text(k, "a header name"), abi.decode_text(v, "a header value"))
            for k, v in abi.deserialize_map(self.read(ptr, size))
        ]
        self._stream().map(kind).set_pairs(pairs)
        return Status.OK

    def _proxy_get_header_map_value(
        self, kind: int, kptr: int, ksize: int, ptr_ptr: int, size_ptr: int
    ) -> int:
        value = self._stream().map(kind).get(self._text(kptr, ksize, "a header name").lower())
        if value is None:
            return Status.NOT_FOUND
        self.give(value.encode(), ptr_ptr, size_ptr)
        return Status.OK

    def _proxy_add_header_map_value(self, kind: int, kptr: int, ksize: int, vptr: int, vsize: int) -> int:
        self._stream().map(kind).add(
            self._text(kptr, ksize, "a header name").lower(), self._text(vptr, vsize, "a header value")
        )
        return Status.OK

    def _proxy_replace_header_map_value(self, kind: int, kptr: int, ksize: int, vptr: int, vsize: int) -> int:
        self._stream().map(kind).replace(
            self._text(kptr, ksize, "a header name").lower(), self._text(vptr, vsize, "a header value")
        )
        return Status.OK

    def _proxy_remove_header_map_value(self, kind: int, kptr: int, ksize: int) -> int:
        self._stream().map(kind).remove(self._text(kptr, ksize, "a header name").lower())
        return Status.OK

    # streams
    def _proxy_continue_stream(self, kind: int) -> int:
        if kind not in (abi.StreamType.HTTP_REQUEST, abi.StreamType.HTTP_RESPONSE):
            return Status.BAD_ARGUMENT
        return Status.OK  # meshd never holds a stream beyond the callback that paused it

    def _proxy_close_stream(self, kind: int) -> int:
        stream = self._stream()
        stream.local = LocalResponse(502, body=b"closed by wasm filter\n", flag="WASM_CLOSED")
        return Status.OK

    def _proxy_clear_route_cache(self) -> int:
        return Status.OK  # routes are chosen before the chain runs

    def _proxy_send_local_response(
        self, code: int, dptr: int, dsize: int, bptr: int, bsize: int, hptr: int, hsize: int, grpc: int
    ) -> int:
        stream = self._stream()
        details = self._text(dptr, dsize, "response code details")
        body = self.read(bptr, bsize)
        headers = tuple(
            (abi.decode_text(k, "a header name").lower(), abi.decode_text(v, "a header value"))
            for k, v in abi.deserialize_map(self.read(hptr, hsize))
        )
        if not 200 <= code <= 599:
            return Status.BAD_ARGUMENT
        if grpc not in (-1, 0xFFFFFFFF) and (stream.request.headers.get("content-type") or "").startswith(
            "application/grpc"
        ):
            headers += (("grpc-status", str(grpc)),)
        stream.local = LocalResponse(code, headers, body, flag=None)
        log.debug("[wasm %s] local response %d (%s)", self.config.name, code, details)
        return Status.OK

    # properties
    def _proxy_get_property(self, pptr: int, psize: int, ptr_ptr: int, size_ptr: int) -> int:
        path = abi.property_path(self.read(pptr, psize))
        props = self.effective.properties() if self.effective is not None else self.plugin_properties()
        self.give(abi.lookup_property(props, path), ptr_ptr, size_ptr)
        return Status.OK

    # WASI
    def _wasi_fd_write(self, fd: int, iovs: int, iovs_len: int, written_ptr: int) -> int:
        if fd not in (1, 2):
            return abi.WasiErrno.BADF
        raw = self.read(iovs, 8 * iovs_len)
        chunks = [self.read(*struct.unpack_from("<II", raw, 8 * i)) for i in range(iovs_len)]
        data = b"".join(chunks)
        self.write_u32(written_ptr, len(data))
        text = data.decode("utf-8", "replace").rstrip("\n")
        if text:
            log.log(logging.WARNING if fd == 2 else logging.INFO, "[wasm %s] %s", self.config.name, text)
        return abi.WasiErrno.SUCCESS

    def _wasi_clock_time_get(self, clock: int, _precision: int, ptr: int) -> int:
        if clock == 0:
            now = time.time_ns()
        elif clock == 1:
            now = time.monotonic_ns()
        else:
            return abi.WasiErrno.NOTSUP
        self.write(ptr, struct.pack("<Q", now))
        return abi.WasiErrno.SUCCESS

    def _wasi_random_get(self, ptr: int, size: int) -> int:
        if size > 1 << 20:
            return abi.WasiErrno.INVAL
        self.write(ptr, os.urandom(size))
        return abi.WasiErrno.SUCCESS

    def _wasi_environ_sizes_get(self, count_ptr: int, size_ptr: int) -> int:
        self.write_u32(count_ptr, 0)
        self.write_u32(size_ptr, 0)
        return abi.WasiErrno.SUCCESS

    def _wasi_environ_get(self, _environ: int, _buf: int) -> int:
        return abi.WasiErrno.SUCCESS

    _wasi_args_sizes_get = _wasi_environ_sizes_get
    _wasi_args_get = _wasi_environ_get

    def _wasi_sched_yield(self) -> int:
        return abi.WasiErrno.SUCCESS

    def _wasi_proc_exit(self, code: int) -> None:
        raise _ProcExit(code)


def _returns(callback: str) -> bool:
    """Does the ABI's callback return a value (else the raw call's slot 0 still holds an argument)?"""
    signature = abi.CALLBACKS.get(callback)
    return signature is None or bool(signature[1])


def _first_line(exc: BaseException) -> str:
    """The cause of a wasmtime error ("wasm trap: ... unreachable ..."), with its innermost frame."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    cause = lines[-1]
    frames = [line for line in lines if line[:1].isdigit()]
    return f"{cause} (at {frames[0].split(' - ', 1)[-1]})" if frames else cause
