"""The `wasm` filter with real proxy-wasm modules (tests/wasm/, built with the AssemblyScript SDK) in a
FilterChain, in memory: what each test filter does, and how failures stay contained."""

from __future__ import annotations

import gc
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import wasmtime

from meshd.plugins import wasm_host
from meshd.plugins.filters import (
    PLUGIN_ERROR,
    BoundFilter,
    FilterChain,
    Headers,
    HttpRequest,
    HttpResponse,
    RequestBody,
    RequestInfo,
    body_of,
)
from meshd.plugins.wasm import RESTART_INTERVAL, WasmFilter, WasmSettings
from meshd.plugins.wasm_abi import LogLevel

WASM = Path(__file__).resolve().parents[1] / "wasm"


@pytest.fixture(autouse=True, params=["raw", "public"])
def calls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: with the C API's unchecked calls (the default) and with wasmtime-py's public API."""
    monkeypatch.setattr(wasm_host, "RAW", wasm_host.RAW and request.param == "raw")
    return str(request.param)


def module(name: str) -> Path:
    return WASM / name / "build" / "filter.wasm"


class Upstream:
    """Echoes the request body after `echo:`; remembers what it was sent."""

    def __init__(self) -> None:
        self.seen: list[HttpRequest] = []
        self.bodies: list[bytes] = []

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        body = await request.body.read()
        self.seen.append(request)
        self.bodies.append(body)
        out = b"echo:" + body
        return HttpResponse(200, Headers([("content-length", str(len(out)))]), body_of(out))


async def send(
    f: WasmFilter, path: str = "/", body: bytes = b"", headers: list[tuple[str, str]] | None = None
) -> tuple[HttpResponse, bytes, Upstream, RequestInfo]:
    chain = FilterChain("r", [BoundFilter("wasm", "meshd.wasm", f)])
    info = RequestInfo(
        "r", source_principal="home.arpa/ns/default/sa/client", source_address="127.0.0.9:4242"
    )
    request = HttpRequest("POST", path, "reviews:9080", Headers(headers or []), RequestBody(body_of(body)))
    upstream = Upstream()
    ctxs = chain.contexts(info)
    response = await chain.handle(request, upstream, info, ctxs)
    data = await response.read()
    await chain.log(ctxs, {})
    return response, data, upstream, info


def wasm(name: str, **kw: object) -> WasmFilter:
    return WasmFilter(WasmSettings(module=module(name), root_id=name, **kw))  # type: ignore[arg-type]


async def test_headers_filter_changes_both_sides_and_reads_config_and_properties() -> None:
    f = wasm("headers", config="from-settings")
    resp, _, up, _ = await send(f, "/a?b=1", headers=[("x-wasm-remove-me", "1"), ("x-wasm-replaced", "x")])
    assert resp.status == 200
    sent = up.seen[0].headers
    assert sent.get("x-wasm-config") == "from-settings"
    assert sent.get("x-wasm-principal") == "spiffe://home.arpa/ns/default/sa/client"
    assert sent.get("x-wasm-replaced") == "by-wasm"
    assert "x-wasm-remove-me" not in sent
    assert resp.headers.get("x-wasm-filter") == "headers"
    assert resp.headers.get("x-wasm-path") == "/a?b=1"
    assert resp.headers.get("x-wasm-status") == "200"
    for _ in range(20):  # contexts are created and deleted per request: the VM keeps serving
        resp, _, _, _ = await send(f)
        assert resp.status == 200
    assert f.plugin.vm().streams == {}


async def test_a_request_that_never_reaches_on_log_still_frees_its_context() -> None:
    f = wasm("headers")
    chain = FilterChain("r", [BoundFilter("wasm", "meshd.wasm", f)])
    info = RequestInfo("r")
    ctxs = chain.contexts(info)
    response = await chain.handle(HttpRequest("GET", "/", "x"), Upstream(), info, ctxs)
    await response.aclose()
    assert len(f.plugin.vm().streams) == 1
    del ctxs, response  # the client went away: no chain.log
    gc.collect()
    await send(f)
    assert f.plugin.vm().streams == {}


async def test_deny_filter_answers_locally_by_path() -> None:
    f = wasm("deny", config="/private")
    resp, data, up, _ = await send(f, "/private/x")
    assert (resp.status, data, resp.headers.get("x-denied-by")) == (
        403,
        b"denied by wasm: /private/x\n",
        "wasm",
    )
    assert up.seen == []
    resp, _, up, _ = await send(f, "/public")
    assert resp.status == 200 and len(up.seen) == 1


async def test_deny_filter_with_empty_config_uses_its_default() -> None:
    resp, _, _, _ = await send(wasm("deny"), "/deny/me")
    assert resp.status == 403


async def test_body_filter_buffers_and_rewrites_both_bodies() -> None:
    resp, data, up, _ = await send(wasm("body"), body=b"hello wasm")
    assert up.bodies == [b"HELLO WASM"]
    assert data == b"wasm saw 15 bytes: echo:HELLO WASM"
    assert "content-length" not in resp.headers


async def test_body_beyond_the_buffer_limit_is_413() -> None:
    resp, _, up, _ = await send(wasm("body", buffer_limit=4), body=b"too long")
    assert resp.status == 413 and up.seen == []


@pytest.mark.parametrize(("path", "reason"), [("/t", "trap"), ("/exit", "exit")])
async def test_a_trap_fails_the_request_and_a_later_one_gets_a_new_vm(path: str, reason: str) -> None:
    now = [0.0]
    f = WasmFilter(WasmSettings(module=module("trap"), root_id="trap"), clock=lambda: now[0])
    for i in range(3):
        now[0] += RESTART_INTERVAL
        resp, data, up, info = await send(f, path)
        assert (resp.status, data, up.seen) == (500, b"wasm filter failed\n", [])
        assert info.response_flags == [PLUGIN_ERROR]
        assert info.wasm_failures == [("trap", reason)]
        assert f.plugin.restarts == i  # the first VM broke on request 0; each later one got a fresh VM


async def test_a_crash_loop_is_limited_to_one_new_vm_per_interval() -> None:
    now = [0.0]
    f = WasmFilter(WasmSettings(module=module("trap"), root_id="trap"), clock=lambda: now[0])
    reasons = [(await send(f, "/t"))[3].wasm_failures for _ in range(5)]
    assert reasons == [[("trap", "trap")]] + [[("trap", "broken")]] * 4
    assert f.plugin.restarts == 0
    now[0] += RESTART_INTERVAL
    assert (await send(f, "/t"))[3].wasm_failures == [("trap", "trap")]
    assert f.plugin.restarts == 1


async def test_a_vm_over_half_its_memory_is_rotated_without_failing_requests() -> None:
    """The SDK leaks a little per context: past half the limit, new requests go to a fresh VM."""
    now = [0.0]
    f = WasmFilter(
        WasmSettings(module=module("headers"), root_id="headers", max_memory_mib=1), clock=lambda: now[0]
    )
    first = f.plugin.vm()
    for _ in range(40):
        now[0] += RESTART_INTERVAL
        resp, _, _, info = await send(f)
        assert resp.status == 200 and info.wasm_failures == []
    assert f.plugin.rotations == 0
    while f.plugin.vm() is first:  # grow the first VM's memory past half the limit (512 KiB)
        first.memory.grow(first.store, 4)
    assert f.plugin.rotations == 1 and f.plugin.restarts == 0
    resp, _, _, info = await send(f)
    assert resp.status == 200 and info.wasm_failures == []


async def test_fail_open_lets_the_request_through() -> None:
    resp, _, up, info = await send(wasm("trap", fail_open=True), "/t")
    assert resp.status == 200 and len(up.seen) == 1
    assert info.wasm_failures == [("trap", "trap")] and info.response_flags == []


async def test_an_endless_loop_runs_out_of_fuel() -> None:
    resp, _, up, info = await send(wasm("loop", fuel=200_000), "/spin")
    assert resp.status == 500 and up.seen == []
    assert info.wasm_failures == [("loop", "fuel")]


async def test_memory_is_limited_per_instance() -> None:
    resp, _, _, info = await send(wasm("loop", max_memory_mib=4), "/grow")
    assert resp.status == 500
    assert info.wasm_failures == [("loop", "memory")]


def test_a_module_importing_what_the_host_lacks_is_refused_with_the_list(tmp_path: Path) -> None:
    wat = """(module
      (import "env" "proxy_teleport" (func (param i32) (result i32)))
      (import "env" "proxy_log" (func (param i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 0)))"""
    path = tmp_path / "bad.wasm"
    path.write_bytes(wasmtime.wat2wasm(wat))
    with pytest.raises(ValueError, match="imports what this host does not provide") as info:
        WasmFilter(WasmSettings(module=path))
    assert "env.proxy_teleport (unknown to this host)" in str(info.value)
    assert "env.proxy_log (imported as (i32) -> (i32)" in str(info.value)


def test_not_wasm_a_wrong_checksum_and_an_unknown_root_id_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.wasm"
    junk.write_bytes(b"not wasm")
    with pytest.raises(ValueError, match="not a valid WebAssembly module"):
        WasmFilter(WasmSettings(module=junk))
    with pytest.raises(ValueError, match="SHA-256"):
        WasmFilter(WasmSettings(module=module("headers"), root_id="headers", sha256="0" * 64))
    digest = hashlib.sha256(module("headers").read_bytes()).hexdigest()
    WasmFilter(WasmSettings(module=module("headers"), root_id="headers", sha256=digest))
    with pytest.raises(ValueError, match="failed while starting"):
        WasmFilter(WasmSettings(module=module("headers"), root_id="nope"))


async def test_abi_0_2_1_module_without_an_sdk(tmp_path: Path) -> None:
    """A hand-written 0.2.1 module: reads the log level, answers 418 with a body from its memory."""
    wat = """(module
      (import "env" "proxy_get_log_level" (func $level (param i32) (result i32)))
      (import "env" "proxy_send_local_response"
        (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 64) "teapot")
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (drop (call $level (i32.const 0)))
        (drop (call $reply (i32.add (i32.const 410) (i32.load (i32.const 0)))
                           (i32.const 0) (i32.const 0) (i32.const 64) (i32.const 6)
                           (i32.const 0) (i32.const 0) (i32.const -1)))
        (i32.const 1)))"""
    path = tmp_path / "teapot.wasm"
    path.write_bytes(wasmtime.wat2wasm(wat))
    f = WasmFilter(WasmSettings(module=path, log_level="error"))
    resp, data, up, _ = await send(f)
    assert (resp.status, data, up.seen) == (414, b"teapot", [])  # 410 + the log level it read (error = 4)
    assert f.plugin.compiled.abi_version == "0.2.1"


def test_ticks_run_when_due() -> None:
    now = [100.0]
    compiled = wasm_host.compile_module(module("headers"))
    config = wasm_host.PluginConfig("headers", "headers", "", b"", b"", 1_000_000, 16 << 20, LogLevel.INFO)
    vm = wasm_host.PluginVM(compiled, config, clock=lambda: now[0])
    assert vm.tick_period == 0.05  # the module asked for 50 ms in proxy_on_configure

    def ticks() -> str | None:
        request = HttpRequest("GET", "/", "x")
        stream = vm.open_stream(RequestInfo("r"), request)
        stream.response = HttpResponse(200)
        vm.stream_call(stream, "proxy_on_response_headers", 1, 0)
        vm.close_stream(stream)
        return stream.response.headers.get("x-wasm-ticks")

    assert ticks() == "0"
    now[0] += 0.06
    assert ticks() == "1"
    assert ticks() == "1"


def test_without_wasmtime_the_policy_is_refused_at_its_line_with_the_install_hint(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "routes.toml").write_text(
        '[[route]]\nname = "w"\nservice = "reviews.default"\n'
        f'filters = [{{ name = "wasm", settings = {{ module = "{module("headers")}" }} }}]\n'
    )
    code = (
        "import sys; sys.modules['wasmtime'] = None\n"
        "from pathlib import Path\n"
        "from meshd.errors import ConfigError\n"
        "from meshd.policy.load import load_policy_dir\n"
        "try:\n"
        f"    load_policy_dir(Path({str(policy)!r}), role='waypoint')\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "routes.toml:4" in out.stdout, out.stdout + out.stderr
    assert "pip install 'meshd-ambient[wasm]'" in out.stdout
