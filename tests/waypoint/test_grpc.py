"""gRPC through a waypoint with a real stack: grpcio client -> alpha -> HBONE -> wp (HTTP/2 both sides,
trailers carried) -> HBONE -> beta -> grpcio server. The service port is declared `protocol = "grpc"`.

Unary, server streaming, client streaming and bidirectional streaming (1,000 messages, hash-checked),
a deadline that expires, an L7 DENY on a method path, and a retry on UNAVAILABLE. Messages are raw
bytes (no protobuf): the generic handlers of grpcio pass them through unserialized.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc  # a test dependency (pyproject's test extra): missing, the module fails, never skips
import pytest

from tests.support.mesh import Port, Workload, waypoint_path
from tests.support.policy import deny, to
from tests.support.procs import Meshd, unique_loopback, wait_for

GRPC_PORT = 50051
GRPC_UPSTREAM = 17093
N = 1000

POLICY = (
    deny(to(paths=["/test.Admin/*"]), name="no-admin-rpc")
    + """
[[route]]
name = "grpc-flaky"
service = "grpc.default"
match = [{ path = { prefix = "/test.Echo/Flaky" } }]
retries = { attempts = 2, retry_on = ["unavailable"], base_interval = "1ms" }

[[route]]
name = "grpc"
service = "grpc.default"
timeout = "30s"
"""
)


class _Servicer:
    def __init__(self) -> None:
        self.flaky: dict[str, int] = {}
        self.lock = threading.Lock()
        self.cancelled = threading.Event()

    def unary(self, request: bytes, context: Any) -> bytes:
        return b"echo:" + request

    def server_stream(self, request: bytes, context: Any) -> Iterator[bytes]:
        for i in range(int(request)):
            yield i.to_bytes(4, "big") * 8

    def client_stream(self, requests: Iterator[bytes], context: Any) -> bytes:
        h = hashlib.sha256()
        for r in requests:
            h.update(r)
        return h.digest()

    def bidi(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for r in requests:
            yield r[::-1]

    def slow(self, request: bytes, context: Any) -> bytes:
        if not context.add_callback(self.cancelled.set):
            self.cancelled.set()
        time.sleep(3)
        return b"too late"

    def flaky_call(self, request: bytes, context: Any) -> bytes:
        with self.lock:
            self.flaky[request.decode()] = n = self.flaky.get(request.decode(), 0) + 1
        if n == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return b"ok after %d" % n

    def secret(self, request: bytes, context: Any) -> bytes:
        return b"should never be reached"


@dataclass
class GrpcMesh:
    alpha: Meshd
    wp: Meshd
    target: str
    servicer: _Servicer


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcMesh]:
    tmp = tmp_path_factory.mktemp("grpc")
    a_ip, g_ip = unique_loopback(), unique_loopback()
    workload = Workload("grpc-server", g_ip, [GRPC_PORT], services=["grpc"])
    mesh = waypoint_path(tmp, a_ip, workload, Port(GRPC_PORT, "grpc"), GRPC_UPSTREAM, POLICY)

    servicer = _Servicer()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(servicer.unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(servicer.server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(servicer.client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(servicer.bidi),
        "Slow": grpc.unary_unary_rpc_method_handler(servicer.slow),
        "Flaky": grpc.unary_unary_rpc_method_handler(servicer.flaky_call),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler("test.Echo", handlers),
            grpc.method_handlers_generic_handler(
                "test.Admin", {"Secret": grpc.unary_unary_rpc_method_handler(servicer.secret)}
            ),
        )
    )
    assert server.add_insecure_port(f"{g_ip}:{GRPC_PORT}") == GRPC_PORT
    server.start()
    try:
        mesh.start()
        # Each daemon's merged catalog must hold what its part of the path needs (beta admits wp's
        # tunnels only once it knows wp as a waypoint).
        mesh.wait_knows("alpha", services=["grpc.default"], nodes=["wp"])
        mesh.wait_knows("wp", services=["grpc.default"], nodes=["beta"])
        mesh.wait_knows("beta", nodes=["wp"])
        yield GrpcMesh(mesh["alpha"], mesh["wp"], f"{a_ip}:{GRPC_UPSTREAM}", servicer)
    finally:
        server.stop(None)
        mesh.stop()


def requests(mesh: GrpcMesh, **labels: str) -> float:
    """The waypoint's istio_requests_total for grpc.default with these labels."""
    return mesh.wp.metric("istio_requests_total", destination_service="grpc.default", **labels)


@pytest.fixture
def channel(mesh: GrpcMesh) -> Iterator[Any]:
    with grpc.insecure_channel(mesh.target) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


def test_unary_and_server_streaming(mesh: GrpcMesh, channel: Any) -> None:
    unary = channel.unary_unary("/test.Echo/Unary")
    assert unary(b"hello", timeout=10) == b"echo:hello"
    stream = channel.unary_stream("/test.Echo/ServerStream")
    got = list(stream(str(N).encode(), timeout=20))
    assert got == [i.to_bytes(4, "big") * 8 for i in range(N)]
    wait_for(lambda: requests(mesh) >= 2, mesh.wp)
    assert "HTTP/2" in mesh.wp.log()
    # Istio's labels for gRPC: request_protocol "grpc", the grpc-status from the trailers.
    ok = {"destination_service": "grpc.default", "request_protocol": "grpc", "grpc_response_status": "0"}
    assert mesh.wp.metric("istio_requests_total", response_code="200", **ok) >= 2


def test_client_streaming_and_bidi_1000_messages_hash_checked(channel: Any) -> None:
    messages = [os.urandom(1 + i % 700) for i in range(N)]
    digest = channel.stream_unary("/test.Echo/ClientStream")(iter(messages), timeout=30)
    assert digest == hashlib.sha256(b"".join(messages)).digest()
    replies = list(channel.stream_stream("/test.Echo/Bidi")(iter(messages), timeout=30))
    assert len(replies) == N
    assert (
        hashlib.sha256(b"".join(replies)).digest()
        == hashlib.sha256(b"".join(m[::-1] for m in messages)).digest()
    )


def test_deadline_expires_and_the_backend_sees_the_cancel(mesh: GrpcMesh, channel: Any) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        channel.unary_unary("/test.Echo/Slow")(b"x", timeout=0.5)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The waypoint counted it: its own timeout (grpc-timeout, flag UT) or the client's reset (DC).
    wait_for(lambda: requests(mesh, response_flags="UT") + requests(mesh, response_flags="DC") >= 1, mesh.wp)
    assert mesh.servicer.cancelled.wait(10)  # RST_STREAM reached the backend through both tunnels


def test_l7_deny_on_a_method_path_is_permission_denied(mesh: GrpcMesh, channel: Any) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        channel.unary_unary("/test.Admin/Secret")(b"x", timeout=10)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    wait_for(lambda: requests(mesh, response_flags="UAEX") >= 1, mesh.wp)
    # The waypoint's own deny, answered as gRPC PERMISSION_DENIED (7) on HTTP 200, is labelled as
    # Envoy labels it: response_code 200, the gRPC status beside it.
    denied = {
        "response_flags": "UAEX",
        "request_protocol": "grpc",
        "response_code": "200",
        "grpc_response_status": "7",
    }
    assert requests(mesh, **denied) >= 1


def test_retry_on_unavailable(mesh: GrpcMesh, channel: Any) -> None:
    key = uuid.uuid4().hex
    assert channel.unary_unary("/test.Echo/Flaky")(key.encode(), timeout=10) == b"ok after 2"
    assert mesh.servicer.flaky[key] == 2
