"""The proxy-wasm ABI (versions 0.2.0 and 0.2.1) as data: status codes, enums, the host's function table,
map serialization, property paths and values, buffer edits. Pure: no wasmtime, no trio, no I/O.

Rule 1: nothing here touches a wasm instance. The wasmtime binding (`wasm_host`) reads guest memory,
calls these functions, and writes the results back; everything that can be wrong about bytes a plugin
hands us is decided here, raising `AbiError(status)` with the status the host returns to the plugin.
Rule 2: every input is untrusted (a plugin's memory): lengths are checked before slicing, nothing is
allocated in proportion to a count the plugin claims without checking it against the bytes given.

The spec of record is proxy-wasm/spec, abi-versions/v0.2.1 (0.2.0 has the same functions but
`proxy_get_log_level`). Integers are little-endian.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final


class Status(IntEnum):
    """`proxy_status_t`: what a host function returns."""

    OK = 0
    NOT_FOUND = 1
    BAD_ARGUMENT = 2
    SERIALIZATION_FAILURE = 3
    PARSE_FAILURE = 4
    INVALID_MEMORY_ACCESS = 6
    EMPTY = 7
    CAS_MISMATCH = 8
    INTERNAL_FAILURE = 10
    UNIMPLEMENTED = 12


class WasiErrno(IntEnum):
    SUCCESS = 0
    BADF = 8
    FAULT = 21
    INVAL = 28
    NOTSUP = 58


class LogLevel(IntEnum):
    TRACE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CRITICAL = 5


class MapType(IntEnum):
    HTTP_REQUEST_HEADERS = 0
    HTTP_REQUEST_TRAILERS = 1
    HTTP_RESPONSE_HEADERS = 2
    HTTP_RESPONSE_TRAILERS = 3
    GRPC_CALL_INITIAL_METADATA = 4
    GRPC_CALL_TRAILING_METADATA = 5
    HTTP_CALL_RESPONSE_HEADERS = 6
    HTTP_CALL_RESPONSE_TRAILERS = 7


class BufferType(IntEnum):
    HTTP_REQUEST_BODY = 0
    HTTP_RESPONSE_BODY = 1
    DOWNSTREAM_DATA = 2
    UPSTREAM_DATA = 3
    HTTP_CALL_RESPONSE_BODY = 4
    GRPC_CALL_MESSAGE = 5
    VM_CONFIGURATION = 6
    PLUGIN_CONFIGURATION = 7
    FOREIGN_FUNCTION_ARGUMENTS = 8


class StreamType(IntEnum):
    HTTP_REQUEST = 0
    HTTP_RESPONSE = 1
    DOWNSTREAM = 2
    UPSTREAM = 3


class HeadersAction(IntEnum):
    """What `proxy_on_request_headers` / `proxy_on_response_headers` return (Envoy's names)."""

    CONTINUE = 0
    STOP_ITERATION = 1
    CONTINUE_AND_END_STREAM = 2
    STOP_ALL_ITERATION_AND_BUFFER = 3
    STOP_ALL_ITERATION_AND_WATERMARK = 4


class DataAction(IntEnum):
    """What `proxy_on_request_body` / `proxy_on_response_body` return (Envoy's names)."""

    CONTINUE = 0
    STOP_ITERATION_AND_BUFFER = 1
    STOP_ITERATION_AND_WATERMARK = 2
    STOP_ITERATION_NO_BUFFER = 3


class AbiError(Exception):
    """Bytes from a plugin are not what the ABI allows: the host function returns `status`."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---- the module's side: what a plugin must export ------------------------------------------------

ABI_VERSIONS: Final = {"proxy_abi_version_0_2_0": "0.2.0", "proxy_abi_version_0_2_1": "0.2.1"}
ALLOCATORS: Final = ("proxy_on_memory_allocate", "malloc")  # 0.2.1 names the first; SDKs export both or one


def abi_version(exports: Iterable[str]) -> str:
    """The ABI version a module declares by export, or AbiError naming what was expected."""
    names = set(exports)
    found = [v for k, v in ABI_VERSIONS.items() if k in names]
    if not found:
        raise AbiError(
            Status.BAD_ARGUMENT,
            f"not a proxy-wasm 0.2.x module: it exports none of {', '.join(ABI_VERSIONS)}",
        )
    if "memory" not in names:
        raise AbiError(Status.BAD_ARGUMENT, "the module exports no 'memory'")
    if not any(a in names for a in ALLOCATORS):
        raise AbiError(Status.BAD_ARGUMENT, f"the module exports no allocator ({' or '.join(ALLOCATORS)})")
    return max(found)


# The callbacks the host calls, with the signatures it calls them with (a module exporting one with
# another signature is refused: the host's calls are not type-checked per call).
CALLBACKS: Final[Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "_initialize": ((), ()),
    "_start": ((), ()),
    "malloc": (("i32",), ("i32",)),
    "proxy_on_memory_allocate": (("i32",), ("i32",)),
    "proxy_on_context_create": (("i32", "i32"), ()),
    "proxy_on_vm_start": (("i32", "i32"), ("i32",)),
    "proxy_on_configure": (("i32", "i32"), ("i32",)),
    "proxy_on_tick": (("i32",), ()),
    "proxy_on_request_headers": (("i32", "i32", "i32"), ("i32",)),
    "proxy_on_request_body": (("i32", "i32", "i32"), ("i32",)),
    "proxy_on_response_headers": (("i32", "i32", "i32"), ("i32",)),
    "proxy_on_response_body": (("i32", "i32", "i32"), ("i32",)),
    "proxy_on_done": (("i32",), ("i32",)),
    "proxy_on_log": (("i32",), ()),
    "proxy_on_delete": (("i32",), ()),
}


def bad_callbacks(exports: Iterable[tuple[str, tuple[str, ...], tuple[str, ...]]]) -> list[str]:
    """Exported functions the host calls whose signature is not the ABI's, each with both signatures."""
    out = []
    for name, params, results in exports:
        want = CALLBACKS.get(name)
        if want is not None and want != (params, results):
            out.append(
                f"{name} is ({', '.join(params)}) -> ({', '.join(results)}), "
                f"the ABI's is ({', '.join(want[0])}) -> ({', '.join(want[1])})"
            )
    return out


# ---- the host's side: every function a plugin may import -----------------------------------------

I32, I64 = "i32", "i64"


@dataclass(frozen=True)
class HostFunction:
    """A function the host offers: its wasm signature and whether meshd implements it (else a stub that
    returns UNIMPLEMENTED, or for WASI NOTSUP, as the spec allows)."""

    params: tuple[str, ...]
    results: tuple[str, ...] = (I32,)
    implemented: bool = True


def _f(n: int, *, implemented: bool = True, params: tuple[str, ...] | None = None) -> HostFunction:
    return HostFunction(params if params is not None else (I32,) * n, (I32,), implemented)


PROXY_FUNCTIONS: Final[Mapping[str, HostFunction]] = {
    # context lifecycle, configuration, logging, clocks, timers
    "proxy_done": _f(0, implemented=False),
    "proxy_set_effective_context": _f(1),
    "proxy_log": _f(3),
    "proxy_get_log_level": _f(1),
    "proxy_get_current_time_nanoseconds": _f(1),
    "proxy_set_tick_period_milliseconds": _f(1),
    # buffers and HTTP fields
    "proxy_set_buffer_bytes": _f(5),
    "proxy_get_buffer_bytes": _f(5),
    "proxy_get_buffer_status": _f(3),
    "proxy_get_header_map_size": _f(2),
    "proxy_get_header_map_pairs": _f(3),
    "proxy_set_header_map_pairs": _f(3),
    "proxy_get_header_map_value": _f(5),
    "proxy_add_header_map_value": _f(5),
    "proxy_replace_header_map_value": _f(5),
    "proxy_remove_header_map_value": _f(3),
    # streams
    "proxy_continue_stream": _f(1),
    "proxy_close_stream": _f(1),
    "proxy_get_status": _f(3, implemented=False),
    "proxy_send_local_response": _f(8),
    "proxy_clear_route_cache": _f(0),  # Envoy's; SDKs of 0.2.0 import it
    # properties
    "proxy_get_property": _f(4),
    "proxy_set_property": _f(4, implemented=False),
    # HTTP and gRPC callouts: not offered (UNIMPLEMENTED)
    "proxy_http_call": _f(10, implemented=False),
    "proxy_grpc_call": _f(12, implemented=False),
    "proxy_grpc_stream": _f(9, implemented=False),
    "proxy_grpc_send": _f(4, implemented=False),
    "proxy_grpc_cancel": _f(1, implemented=False),
    "proxy_grpc_close": _f(1, implemented=False),
    # shared data and queues: not offered
    "proxy_set_shared_data": _f(5, implemented=False),
    "proxy_get_shared_data": _f(5, implemented=False),
    "proxy_register_shared_queue": _f(3, implemented=False),
    "proxy_resolve_shared_queue": _f(5, implemented=False),
    "proxy_enqueue_shared_queue": _f(3, implemented=False),
    "proxy_dequeue_shared_queue": _f(3, implemented=False),
    # metrics: not offered
    "proxy_define_metric": _f(4, implemented=False),
    "proxy_record_metric": _f(2, implemented=False, params=(I32, I64)),
    "proxy_increment_metric": _f(2, implemented=False, params=(I32, I64)),
    "proxy_get_metric": _f(2, implemented=False),
    # foreign functions: none registered (NOT_FOUND)
    "proxy_call_foreign_function": _f(6, implemented=False),
}

WASI_FUNCTIONS: Final[Mapping[str, HostFunction]] = {
    "fd_write": _f(4),  # stdout/stderr go to the log
    "clock_time_get": _f(3, params=(I32, I64, I32)),
    "random_get": _f(2),
    "environ_sizes_get": _f(2),  # empty
    "environ_get": _f(2),
    "args_sizes_get": _f(2),  # empty
    "args_get": _f(2),
    "proc_exit": HostFunction((I32,), ()),  # ends the callback: a failure of the request
    "sched_yield": _f(0),
    # present so modules built for wasm32-wasi link; they answer NOTSUP / BADF
    "fd_read": _f(4, implemented=False),
    "fd_close": _f(1, implemented=False),
    "fd_seek": _f(4, implemented=False, params=(I32, I64, I32, I32)),
    "fd_fdstat_get": _f(2, implemented=False),
    "fd_prestat_get": _f(2, implemented=False),
    "fd_prestat_dir_name": _f(3, implemented=False),
    "poll_oneoff": _f(4, implemented=False),
}

IMPORT_MODULES: Final[Mapping[str, Mapping[str, HostFunction]]] = {
    "env": PROXY_FUNCTIONS,
    "wasi_snapshot_preview1": WASI_FUNCTIONS,
    "wasi_unstable": WASI_FUNCTIONS,  # the AssemblyScript SDK's name for it
}


@dataclass(frozen=True)
class Import:
    """One import of a module: `kind` is "func" (with its signature) or "memory", "table", "global"."""

    module: str
    name: str
    kind: str = "func"
    params: tuple[str, ...] = ()
    results: tuple[str, ...] = ()


def missing_imports(imports: Iterable[Import]) -> list[str]:
    """The imports this host cannot satisfy, each as `module.name` with why; empty if all link."""
    missing: list[str] = []
    for imp in imports:
        where = f"{imp.module}.{imp.name}"
        table = IMPORT_MODULES.get(imp.module)
        fn = table.get(imp.name) if table is not None else None
        if imp.kind != "func":
            missing.append(f"{where} ({imp.kind}: the host offers functions only)")
        elif fn is None:
            missing.append(f"{where} (unknown to this host)")
        elif (fn.params, fn.results) != (imp.params, imp.results):
            missing.append(
                f"{where} (imported as ({', '.join(imp.params)}) -> ({', '.join(imp.results)}), "
                f"the host has ({', '.join(fn.params)}) -> ({', '.join(fn.results)}))"
            )
    return missing


# ---- maps (HTTP fields) --------------------------------------------------------------------------

_U32 = struct.Struct("<I")
MAX_MAP_ENTRIES: Final = 1 << 16


def serialize_map(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """count, (key length, value length) * count, then each key and value NUL-terminated."""
    if not pairs:
        return b""
    sizes = [len(x) for pair in pairs for x in pair]
    head = struct.pack(f"<{1 + len(sizes)}I", len(pairs), *sizes)
    return head + b"".join(k + b"\0" + v + b"\0" for k, v in pairs)


def deserialize_map(data: bytes) -> list[tuple[bytes, bytes]]:
    """The inverse of serialize_map; an empty value or a single NUL byte is the empty map."""
    if len(data) <= 1:
        if data not in (b"", b"\0"):
            raise AbiError(Status.BAD_ARGUMENT, "a map of one byte must be NUL")
        return []
    if len(data) < 4:
        raise AbiError(Status.BAD_ARGUMENT, f"a map of {len(data)} bytes is shorter than its count")
    (count,) = _U32.unpack_from(data, 0)
    head = 4 + 8 * count
    if count > MAX_MAP_ENTRIES or head > len(data):
        raise AbiError(Status.BAD_ARGUMENT, f"a map claims {count} entries in {len(data)} bytes")
    sizes = struct.unpack_from(f"<{2 * count}I", data, 4)
    pos = head
    out: list[tuple[bytes, bytes]] = []
    for i in range(count):
        fields = []
        for size in sizes[2 * i : 2 * i + 2]:
            end = pos + size
            if end >= len(data) or data[end] != 0:
                raise AbiError(Status.BAD_ARGUMENT, f"map entry {i} overruns the map or lacks its NUL")
            fields.append(data[pos:end])
            pos = end + 1
        out.append((fields[0], fields[1]))
    if pos != len(data):
        raise AbiError(Status.BAD_ARGUMENT, f"{len(data) - pos} bytes after the map's last entry")
    return out


# ---- buffers -------------------------------------------------------------------------------------


def buffer_slice(buffer: bytes, start: int, max_size: int) -> bytes:
    """`proxy_get_buffer_bytes`: up to `max_size` bytes from `start` (BAD_ARGUMENT past the end)."""
    if start > len(buffer) or start < 0 or max_size < 0:
        raise AbiError(Status.BAD_ARGUMENT, f"start {start} is past the buffer's {len(buffer)} bytes")
    return buffer[start : start + max_size]


def buffer_edit(buffer: bytes, start: int, size: int, value: bytes) -> bytes:
    """`proxy_set_buffer_bytes`: replace `size` bytes at `start` with `value`: prepend (0, 0), append
    (`start` >= length), inject, replace (the spec's combinations)."""
    if start < 0 or size < 0:
        raise AbiError(Status.BAD_ARGUMENT, "negative start or size")
    if start >= len(buffer):
        return buffer + value
    return buffer[:start] + value + buffer[start + size :]


# ---- properties ----------------------------------------------------------------------------------

PropertyValue = str | int | bool | bytes | Sequence[tuple[str, str]]

# Roots of Envoy's attribute names, so a dotted path ("source.address", as the AssemblyScript and C++
# SDKs write it) splits the way a NUL-separated one ("source\0address", the Go and Rust SDKs) does.
PROPERTY_ROOTS: Final = frozenset(
    {"request", "response", "source", "destination", "connection", "upstream", "node", "xds", "plugin"}
)


def property_path(raw: bytes) -> tuple[str, ...]:
    """A property path as segments: NUL-separated (Envoy's wire form) or dotted under a known root."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AbiError(Status.BAD_ARGUMENT, "a property path is not UTF-8") from None
    text = text.rstrip("\0")
    if "\0" in text:
        return tuple(text.split("\0"))
    root, dot, rest = text.partition(".")
    if dot and root in PROPERTY_ROOTS:
        if root == "request" and rest.startswith("headers."):  # request.headers.<name>: names may hold dots
            return (root, "headers", rest[len("headers.") :])
        if root == "response" and rest.startswith("headers."):
            return (root, "headers", rest[len("headers.") :])
        return (root, *rest.split("."))
    return (text,)


def encode_property(value: PropertyValue) -> bytes:
    """A property value as Envoy serializes it: strings as UTF-8, integers as 8-byte little-endian,
    booleans as one byte, a map of strings as a serialized map."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        return b"\1" if value else b"\0"
    if isinstance(value, int):
        return struct.pack("<q", value)
    return serialize_map([(k.encode("utf-8"), v.encode("utf-8")) for k, v in value])


def lookup_property(properties: Mapping[tuple[str, ...], PropertyValue], path: tuple[str, ...]) -> bytes:
    """The encoded value at `path`; `request.headers.<name>` reads one header of a headers map."""
    value = properties.get(path)
    if value is None and len(path) == 3 and path[1] == "headers":
        headers = properties.get(path[:2])
        if isinstance(headers, Sequence) and not isinstance(headers, str | bytes):
            name = path[2].lower()
            values = [v for k, v in headers if k == name]
            value = ", ".join(values) if values else None
    if value is None:
        raise AbiError(Status.NOT_FOUND, f"no property {'.'.join(path)!r}")
    return encode_property(value)


def decode_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise AbiError(Status.BAD_ARGUMENT, f"{what} is not UTF-8") from None
