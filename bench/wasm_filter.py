"""CPU per request of one L7 filter alone, in memory: the route's FilterChain with no filter, with the Python
`headers` filter, and with the proxy-wasm header filter (tests/wasm/headers, the AssemblyScript SDK), side
by side in one run. No sockets: what is measured is the filter (for the waypoint as a whole, with the
batching a slower filter costs the daemons, see `bench/l7.py --paths meshd,meshd+headers,meshd+wasm`).

    .venv/bin/python bench/wasm_filter.py [--requests 3000] [--repeat 3]

Prints process CPU per request (medians of --repeat runs) and each filter's added CPU over no filter;
also for the wasm filter through wasmtime-py's public API (the fallback when its C API is not usable).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio

from meshd.plugins import wasm_host
from meshd.plugins.filters import (
    BoundFilter,
    Filter,
    FilterChain,
    Headers,
    HttpRequest,
    HttpResponse,
    RequestInfo,
)
from meshd.plugins.headers import HeadersFilter
from meshd.plugins.settings import HeaderOps, HeaderSettings
from meshd.plugins.wasm import WasmFilter, WasmSettings

MODULE = Path(__file__).resolve().parent.parent / "tests" / "wasm" / "headers" / "build" / "filter.wasm"


async def _upstream(request: HttpRequest) -> HttpResponse:
    return HttpResponse(200, Headers([("content-type", "text/plain"), ("content-length", "0")]))


async def cpu_per_request(make: Callable[[], Filter | None], requests: int) -> float:
    """Process CPU seconds per request through a chain of the filter `make` builds (None: no filter)."""
    f = make()
    chain = FilterChain("bench", [BoundFilter("f", "bench", f)] if f is not None else [])
    headers = [("user-agent", "wrk"), ("accept", "*/*"), ("x-request-id", "1")]
    for warm in range(50):
        await one(chain, headers, warm)
    start = time.process_time()
    for i in range(requests):
        await one(chain, headers, i)
    return (time.process_time() - start) / requests


async def one(chain: FilterChain, headers: list[tuple[str, str]], i: int) -> None:
    info = RequestInfo(
        "bench", source_principal="bench.arpa/ns/default/sa/client", source_address="10.0.0.1:1"
    )
    ctxs = chain.contexts(info)
    response = await chain.handle(
        HttpRequest("GET", f"/x/{i}", "web:80", Headers(headers)), _upstream, info, ctxs
    )
    await response.read()
    await chain.log(ctxs, {})


def python_headers() -> Filter:
    ops = HeaderSettings(
        request=HeaderOps(add={"x-a": "1"}), response=HeaderOps(add={"x-wasm-filter": "headers"})
    )
    return HeadersFilter(ops)


def wasm_headers(raw: bool) -> Callable[[], Filter]:
    def make() -> Filter:
        wasm_host.RAW = raw
        return WasmFilter(WasmSettings(module=MODULE, root_id="headers"))

    return make


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    raw = wasm_host.RAW
    cases: list[tuple[str, Callable[[], Filter | None]]] = [
        ("no filter", lambda: None),
        ("python headers", python_headers),
        ("wasm headers", wasm_headers(raw)),
        ("wasm headers (public API)", wasm_headers(False)),
    ]
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(args.repeat):  # interleaved, so drift hits every case alike
        for name, make in cases:
            samples[name].append(await cpu_per_request(make, args.requests))
    wasm_host.RAW = raw
    base = statistics.median(samples["no filter"])
    print(f"{'':28s} {'CPU us/request':>15s} {'added':>8s}")
    for name, _ in cases:
        med = statistics.median(samples[name])
        print(f"{name:28s} {med * 1e6:15.1f} {(med - base) * 1e6:8.1f}")
    py = statistics.median(samples["python headers"]) - base
    wasm = statistics.median(samples["wasm headers"]) - base
    print(f"wasm / python added CPU: {wasm / py:.0f}x; aim for the wasm header filter: <= 50 us added")
    print(f"medians of {args.repeat} x {args.requests} requests; command: {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
