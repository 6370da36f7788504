"""The pure proxy-wasm ABI module: tables, plus Hypothesis over what a plugin's memory could hand us."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.plugins import wasm_abi as abi
from meshd.plugins.wasm_abi import AbiError, Import, Status

field_bytes = st.binary(max_size=40).filter(lambda b: b"\0" not in b)


def test_the_specs_example_map() -> None:
    # {{"a": "1"}, {"b": "22"}} from the spec's Serialization section
    data = abi.serialize_map([(b"a", b"1"), (b"b", b"22")])
    assert data == struct.pack("<5I", 2, 1, 1, 1, 2) + b"a\x001\x00b\x0022\x00"
    assert abi.deserialize_map(data) == [(b"a", b"1"), (b"b", b"22")]


@pytest.mark.parametrize("empty", [b"", b"\0"])
def test_an_empty_map_is_either_nothing_or_one_nul(empty: bytes) -> None:
    assert abi.deserialize_map(empty) == []
    assert abi.serialize_map([]) == b""


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(field_bytes, field_bytes), max_size=12))
def test_maps_round_trip(pairs: list[tuple[bytes, bytes]]) -> None:
    assert abi.deserialize_map(abi.serialize_map(pairs)) == pairs


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_give_a_map_or_bad_argument(data: bytes) -> None:
    try:
        pairs = abi.deserialize_map(data)
    except AbiError as exc:
        assert exc.status == Status.BAD_ARGUMENT
    else:
        assert abi.serialize_map(pairs) == data or data in (b"\0",)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x01", "one byte"),
        (struct.pack("<I", 1000000), "claims"),
        (struct.pack("<3I", 1, 5, 1) + b"a\0b\0", "overruns"),
        (struct.pack("<3I", 1, 1, 1) + b"ab\0\0", "NUL"),
        (struct.pack("<3I", 1, 1, 1) + b"a\0b\0extra", "after"),
    ],
)
def test_malformed_maps_are_refused_with_the_reason(data: bytes, why: str) -> None:
    with pytest.raises(AbiError, match=why) as info:
        abi.deserialize_map(data)
    assert info.value.status == Status.BAD_ARGUMENT


@pytest.mark.parametrize(
    ("start", "size", "value", "expected"),
    [
        (0, 0, b">", b">body"),  # prepend
        (4, 0, b"!", b"body!"),  # append (start at the end)
        (0xFFFFFFFF, 0, b"!", b"body!"),  # append (start = max size_t)
        (0, 4, b"new", b"new"),  # replace all
        (1, 2, b"-", b"b-y"),  # replace inside
        (2, 0, b"+", b"bo+dy"),  # inject
    ],
)
def test_buffer_edits_as_the_spec_combines_start_and_size(
    start: int, size: int, value: bytes, expected: bytes
) -> None:
    assert abi.buffer_edit(b"body", start, size, value) == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=30), st.integers(0, 40), st.integers(0, 40), st.binary(max_size=10))
def test_buffer_edit_keeps_what_it_does_not_replace(buf: bytes, start: int, size: int, value: bytes) -> None:
    out = abi.buffer_edit(buf, start, size, value)
    assert out.startswith(buf[: min(start, len(buf))])
    assert value in out


def test_buffer_slice_refuses_a_start_past_the_end() -> None:
    assert abi.buffer_slice(b"abc", 1, 10) == b"bc"
    assert abi.buffer_slice(b"abc", 3, 10) == b""
    with pytest.raises(AbiError) as info:
        abi.buffer_slice(b"abc", 4, 1)
    assert info.value.status == Status.BAD_ARGUMENT


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (b"plugin_root_id", ("plugin_root_id",)),
        (b"source.principal", ("source", "principal")),
        (b"source\0principal", ("source", "principal")),
        (b"request\0headers\0x-a.b", ("request", "headers", "x-a.b")),
        (b"request.headers.x-a.b", ("request", "headers", "x-a.b")),
        (b"route_name", ("route_name",)),
        (b"custom.thing", ("custom.thing",)),  # unknown root: one segment
    ],
)
def test_property_paths_dotted_or_nul_separated(raw: bytes, path: tuple[str, ...]) -> None:
    assert abi.property_path(raw) == path


def test_property_values_are_encoded_as_envoy_does() -> None:
    props: dict[tuple[str, ...], abi.PropertyValue] = {
        ("request", "path"): "/a",
        ("source", "port"): 4242,
        ("connection", "mtls"): True,
        ("request", "headers"): [("x-a", "1"), ("x-a", "2")],
    }
    assert abi.lookup_property(props, ("request", "path")) == b"/a"
    assert abi.lookup_property(props, ("source", "port")) == struct.pack("<q", 4242)
    assert abi.lookup_property(props, ("connection", "mtls")) == b"\1"
    assert abi.lookup_property(props, ("request", "headers", "x-a")) == b"1, 2"
    assert abi.deserialize_map(abi.lookup_property(props, ("request", "headers"))) == [
        (b"x-a", b"1"),
        (b"x-a", b"2"),
    ]
    with pytest.raises(AbiError) as info:
        abi.lookup_property(props, ("request", "nope"))
    assert info.value.status == Status.NOT_FOUND


def test_imports_the_host_lacks_are_listed_with_why() -> None:
    ok = Import("env", "proxy_log", "func", ("i32",) * 3, ("i32",))
    wasi = Import("wasi_unstable", "proc_exit", "func", ("i32",), ())
    assert abi.missing_imports([ok, wasi]) == []
    missing = abi.missing_imports(
        [
            ok,
            Import("env", "proxy_teleport", "func", (), ("i32",)),
            Import("env", "proxy_log", "func", ("i32",), ("i32",)),
            Import("env", "memory", "memory"),
            Import("other", "f", "func"),
        ]
    )
    assert missing == [
        "env.proxy_teleport (unknown to this host)",
        "env.proxy_log (imported as (i32) -> (i32), the host has (i32, i32, i32) -> (i32))",
        "env.memory (memory: the host offers functions only)",
        "other.f (unknown to this host)",
    ]


def test_every_host_function_of_the_spec_is_present() -> None:
    # The v0.2.1 host functions (proxy-wasm/spec), implemented or stubbed: none may be missing.
    spec = [
        "proxy_done",
        "proxy_set_effective_context",
        "proxy_log",
        "proxy_get_log_level",
        "proxy_get_current_time_nanoseconds",
        "proxy_set_tick_period_milliseconds",
        "proxy_set_buffer_bytes",
        "proxy_get_buffer_bytes",
        "proxy_get_buffer_status",
        "proxy_get_header_map_size",
        "proxy_get_header_map_pairs",
        "proxy_set_header_map_pairs",
        "proxy_get_header_map_value",
        "proxy_add_header_map_value",
        "proxy_replace_header_map_value",
        "proxy_remove_header_map_value",
        "proxy_continue_stream",
        "proxy_close_stream",
        "proxy_get_status",
        "proxy_send_local_response",
        "proxy_http_call",
        "proxy_grpc_call",
        "proxy_grpc_stream",
        "proxy_grpc_send",
        "proxy_grpc_cancel",
        "proxy_grpc_close",
        "proxy_set_shared_data",
        "proxy_get_shared_data",
        "proxy_register_shared_queue",
        "proxy_resolve_shared_queue",
        "proxy_enqueue_shared_queue",
        "proxy_dequeue_shared_queue",
        "proxy_define_metric",
        "proxy_record_metric",
        "proxy_increment_metric",
        "proxy_get_metric",
        "proxy_get_property",
        "proxy_set_property",
        "proxy_call_foreign_function",
    ]
    wasi = [
        "fd_write",
        "clock_time_get",
        "random_get",
        "environ_sizes_get",
        "environ_get",
        "args_sizes_get",
        "args_get",
        "proc_exit",
    ]
    assert set(spec) <= set(abi.PROXY_FUNCTIONS)
    assert set(wasi) <= set(abi.WASI_FUNCTIONS)


def test_abi_version_needs_the_marker_memory_and_an_allocator() -> None:
    assert abi.abi_version(["proxy_abi_version_0_2_0", "memory", "malloc"]) == "0.2.0"
    assert abi.abi_version(["proxy_abi_version_0_2_1", "memory", "proxy_on_memory_allocate"]) == "0.2.1"
    for exports, why in [
        (["memory", "malloc"], "none of"),
        (["proxy_abi_version_0_2_1", "malloc"], "memory"),
        (["proxy_abi_version_0_2_1", "memory"], "allocator"),
    ]:
        with pytest.raises(AbiError, match=why):
            abi.abi_version(exports)
