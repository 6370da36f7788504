"""Throughput sanity check for meshd.hbone: push N MiB through one HBONE tunnel over loopback.

The server (HboneServer + a counting handler) runs in a child process, as a peer node would, so the
two ends do not share one CPU. Usage:

    .venv/bin/python bench/hbone_micro.py [--mib 1024] [--streams 1] [--same-process]

Prints MB/s (10^6 bytes per second) and Gbit/s of tunnel payload.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from meshd.hbone.pool import HbonePool
from meshd.hbone.server import HboneServer, InboundRequest, ServerReply
from meshd.hbone.tls import StaticCertificates
from meshd.identity.ca import LocalCA, write_issued
from meshd.identity.spiffe import SpiffeId

TD = "bench.test"
SERVER_ID = SpiffeId(TD, "bench", "server")
CLIENT_ID = SpiffeId(TD, "bench", "client")


def load(directory: Path) -> StaticCertificates:
    return StaticCertificates(
        (directory / "cert.pem").read_bytes(),
        (directory / "key.pem").read_bytes(),
        (directory / "ca.crt").read_bytes(),
    )


async def count_handler(req: InboundRequest, reply: ServerReply) -> None:
    stream = await reply.accept()
    total = 0
    while data := await stream.receive_some():
        total += len(data)
    await stream.send_all(str(total).encode())
    await stream.send_eof()


async def serve(certs: StaticCertificates, port_file: Path | None) -> None:
    server = HboneServer(certs.server_provider(), TD, count_handler)
    async with trio.open_nursery() as nursery:
        _host, port = await nursery.start(server.serve, "127.0.0.1", 0)
        if port_file is not None:
            tmp = port_file.with_suffix(".tmp")
            tmp.write_text(str(port))
            tmp.replace(port_file)  # atomic: the parent never reads a half-written port
        else:
            print(port, flush=True)


async def push(pool: HbonePool, address: tuple[str, int], nbytes: int) -> None:
    tunnel = await pool.open_tunnel(CLIENT_ID, SERVER_ID, address, "10.0.0.1:80")
    chunk = os.urandom(1 << 20)
    sent = 0
    while sent < nbytes:
        await tunnel.send_all(chunk)
        sent += len(chunk)
    await tunnel.send_eof()
    answer = await tunnel.receive_some()
    assert int(answer) == sent, (answer, sent)
    await tunnel.aclose()


async def client(certs: StaticCertificates, address: tuple[str, int], mib: int, streams: int) -> float:
    pool = HbonePool(certs.client_provider())
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        # Warm up: one small tunnel opens the pooled connection.
        await push(pool, address, 1 << 20)
        start = time.perf_counter()
        async with trio.open_nursery() as pushers:
            for _ in range(streams):
                pushers.start_soon(push, pool, address, (mib << 20) // streams)
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--same-process", action="store_true")
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # child mode: cert dir
    args = ap.parse_args()
    if args.serve:
        try:
            trio.run(serve, load(args.serve), args.serve / "port")
        except* KeyboardInterrupt:  # the parent stops us with SIGINT
            pass
        return
    with tempfile.TemporaryDirectory() as tmp:
        ca = LocalCA.init(Path(tmp) / "ca", TD)
        write_issued(ca.issue(SERVER_ID), Path(tmp) / "server")
        write_issued(ca.issue(CLIENT_ID), Path(tmp) / "client")
        client_certs = load(Path(tmp) / "client")
        if args.same_process:

            async def both() -> float:
                async with trio.open_nursery() as nursery:
                    server = HboneServer(load(Path(tmp) / "server").server_provider(), TD, count_handler)
                    address = await nursery.start(server.serve, "127.0.0.1", 0)
                    elapsed = await client(client_certs, address, args.mib, args.streams)
                    nursery.cancel_scope.cancel()
                return elapsed

            elapsed = trio.run(both)
        else:
            port_file = Path(tmp) / "server" / "port"
            prefix = os.environ.get("BENCH_SERVER_PREFIX", "").split()
            child = subprocess.Popen(
                [*prefix, sys.executable, __file__, "--serve", str(Path(tmp) / "server")]
            )
            try:
                deadline = time.monotonic() + 30
                while not port_file.exists() or not port_file.read_text():
                    if child.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("bench server did not start")
                    time.sleep(0.05)
                address = ("127.0.0.1", int(port_file.read_text()))
                elapsed = trio.run(client, client_certs, address, args.mib, args.streams)
            finally:
                child.send_signal(signal.SIGINT)
                child.wait()
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    nbytes = args.mib << 20
    print(
        f"{args.mib} MiB over {args.streams} stream(s) in {elapsed:.2f} s: "
        f"{nbytes / elapsed / 1e6:.0f} MB/s = {nbytes * 8 / elapsed / 1e9:.2f} Gbit/s"
    )
    print(
        f"CPU (whole run, incl. set-up): client {me.ru_utime + me.ru_stime:.2f} s, "
        f"server {kids.ru_utime + kids.ru_stime:.2f} s"
    )


if __name__ == "__main__":
    main()
