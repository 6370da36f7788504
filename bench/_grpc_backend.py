"""The gRPC backend of `l7.py`'s *-grpc paths: a grpcio (asyncio) server whose one method,
`/bench.Echo/Unary`, answers each request with its own bytes (no protobuf: the messages pass as raw
bytes). Prints "ready" once it listens. `l7.py` imports METHOD from here, so grpcio is imported only
when the server runs.

    python bench/_grpc_backend.py HOST:PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Unary"


async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def serve(address: str) -> None:
    import grpc

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    if not server.add_insecure_port(address):
        raise SystemExit(f"cannot listen on {address}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
