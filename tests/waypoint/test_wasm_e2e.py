"""proxy-wasm filters in a real waypoint: client -> alpha (node) -> HBONE -> wp (waypoint) -> beta (node)
-> backend, all subprocesses. Each route runs one test module (tests/wasm/); the trapping and looping
ones must never stop wp serving the others, and a SIGHUP swaps a module without dropping requests.
"""

from __future__ import annotations

import http.client
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.http_backend import Backend, http_backend
from tests.support.mesh import Port, reviews, waypoint_path
from tests.support.procs import Meshd, unique_loopback, wait_for

pytestmark = pytest.mark.slow

WASM = Path(__file__).resolve().parents[1] / "wasm"
PORT = 9080
UPSTREAM = 17080


def routes(wasm_dir: Path, swap_root: str = "headers", swap_config: str = "v1") -> str:
    def route(name: str, prefix: str, settings: str) -> str:
        return (
            f'[[route]]\nname = "{name}"\nservice = "reviews.default"\n'
            f'match = [{{ path = {{ prefix = "{prefix}" }} }}]\n'
            f'filters = [{{ name = "wasm", settings = {{ {settings} }} }}]\n'
        )

    def mod(name: str) -> str:
        return f'module = "{wasm_dir / (name + ".wasm")}", root_id = "{name}"'

    return (
        route("headers", "/headers", f'{mod("headers")}, config = "e2e"')
        + route("deny", "/deny", f'{mod("deny")}, config = "/deny/secret"')
        + route("body", "/body", mod("body"))
        + route("trap", "/trap", mod("trap"))
        + route("trap-open", "/open", f"{mod('trap')}, fail_open = true")
        + route("loop", "/loop", f"{mod('loop')}, fuel = 2000000")
        + route(
            "swap",
            "/swap",
            f'module = "{wasm_dir / "swap.wasm"}", root_id = "{swap_root}", config = "{swap_config}"',
        )
        + '[[route]]\nname = "plain"\nservice = "reviews.default"\n'
    )


@dataclass
class WasmMesh:
    wp: Meshd
    backend: Backend
    client_address: tuple[str, int]
    policy: Path
    wasm_dir: Path

    def get(
        self, path: str, conn: http.client.HTTPConnection | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        own = conn is None
        conn = conn or http.client.HTTPConnection(*self.client_address, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            if own:
                conn.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WasmMesh]:
    tmp = tmp_path_factory.mktemp("wasm")
    wasm_dir = tmp / "wasm"
    wasm_dir.mkdir()
    for name in ("headers", "deny", "body", "trap", "loop"):
        shutil.copy(WASM / name / "build" / "filter.wasm", wasm_dir / f"{name}.wasm")
    shutil.copy(wasm_dir / "headers.wasm", wasm_dir / "swap.wasm")
    a_ip, r_ip = unique_loopback(), unique_loopback()
    nodes = waypoint_path(
        tmp, a_ip, reviews("v1", r_ip, PORT), Port(PORT, "http"), UPSTREAM, routes(wasm_dir)
    )
    with http_backend("reviews-v1", r_ip, PORT) as backend, nodes.running():
        m = WasmMesh(nodes["wp"], backend, (a_ip, UPSTREAM), nodes.policy_dir("wp"), wasm_dir)

        def through() -> bool:
            try:
                return m.get("/plain")[0] == 200
            except OSError:
                return False

        wait_for(through, nodes["alpha"], timeout=30)
        yield m


def test_header_filter(mesh: WasmMesh) -> None:
    status, headers, _ = mesh.get("/headers/x?y=1")
    assert status == 200
    assert headers["x-wasm-filter"] == "headers"
    assert headers["x-wasm-path"] == "/headers/x?y=1"
    seen = mesh.backend.requests[-1].headers
    assert seen["x-wasm-config"] == "e2e"
    assert seen["x-wasm-principal"] == "spiffe://home.arpa/ns/default/sa/client"


def test_tick_timers_run_without_traffic(mesh: WasmMesh) -> None:
    """The header module asks for a tick every 50 ms and reports how many it saw: the waypoint's tick
    task runs them while no request arrives (a tick run only before a callback would add one)."""
    before = int(mesh.get("/headers")[1]["x-wasm-ticks"])
    time.sleep(0.6)  # the interval under test: ~12 ticks are due
    after = int(mesh.get("/headers")[1]["x-wasm-ticks"])
    assert after >= before + 4, (before, after)


def test_deny_filter(mesh: WasmMesh) -> None:
    status, headers, body = mesh.get("/deny/secret/file")
    assert (status, headers["x-denied-by"], body) == (403, "wasm", b"denied by wasm: /deny/secret/file\n")
    assert mesh.get("/deny/public")[0] == 200


def test_body_filter(mesh: WasmMesh) -> None:
    status, _, body = mesh.get("/body")
    assert status == 200
    original = b"reviews-v1 GET /body\n"
    assert body == b"wasm saw %d bytes: " % len(original) + original


def test_trapping_and_looping_modules_fail_their_requests_and_wp_serves_on(mesh: WasmMesh) -> None:
    conn = http.client.HTTPConnection(*mesh.client_address, timeout=10)
    for _ in range(3):
        assert mesh.get("/trap", conn)[0] == 500
        assert mesh.get("/loop", conn)[0] == 500
        assert mesh.get("/headers", conn)[0] == 200  # same keep-alive connection, other routes unaffected
        assert mesh.get("/plain", conn)[0] == 200
    conn.close()
    assert mesh.get("/open")[0] == 200  # fail_open
    # the first failure of each is the trap / the fuel; later ones may find the VM not restarted yet
    assert mesh.wp.metric("meshd_wasm_failures_total", filter="trap", reason="trap") >= 1
    assert mesh.wp.metric("meshd_wasm_failures_total", filter="trap") >= 4
    assert mesh.wp.metric("meshd_wasm_failures_total", filter="loop", reason="fuel") >= 1
    assert mesh.wp.metric("meshd_wasm_failures_total", filter="loop") >= 3
    assert mesh.wp.proc is not None and mesh.wp.proc.poll() is None


def test_reload_swaps_the_module_without_dropping_requests_and_keeps_it_on_a_bad_one(mesh: WasmMesh) -> None:
    assert mesh.get("/swap")[1]["x-wasm-filter"] == "headers"
    results: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        conn = http.client.HTTPConnection(*mesh.client_address, timeout=10)
        while not stop.is_set():
            try:
                results.append(mesh.get("/swap", conn)[0])
            except BaseException as exc:  # a dropped request fails the test
                errors.append(exc)
                return
        conn.close()

    worker = threading.Thread(target=load)
    worker.start()
    try:
        reloads = mesh.wp.metric("meshd_config_reloads_total", result="success")
        shutil.copy(mesh.wasm_dir / "deny.wasm", mesh.wasm_dir / "swap.wasm")
        (mesh.policy / "routes.toml").write_text(routes(mesh.wasm_dir, "deny", "/swap"))
        mesh.wp.signal(signal.SIGHUP)
        wait_for(lambda: 403 in results, mesh.wp)
        assert mesh.wp.metric("meshd_config_reloads_total", result="success") == reloads + 1

        (mesh.wasm_dir / "swap.wasm").write_bytes(b"\0asm broken")
        mesh.wp.signal(signal.SIGHUP)
        wait_for(lambda: mesh.wp.metric("meshd_config_reloads_total", result="failure") >= 1, mesh.wp)
        n = len(results)
        wait_for(lambda: len(results) > n + 20, mesh.wp)
    finally:
        stop.set()
        worker.join(30)
    assert errors == []
    assert set(results) <= {200, 403}, set(results)
    assert results[-1] == 403  # the old (deny) module stays after the refused reload
    assert "not a valid WebAssembly module" in mesh.wp.log()
