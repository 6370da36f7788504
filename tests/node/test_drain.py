"""Graceful drain: SIGTERM lets an in-flight tunnel finish, refuses new ones, then exits 0."""

from __future__ import annotations

import socket

from tests.support.mesh import NodePair
from tests.support.procs import http_get, wait_for
from tests.support.sockets import recv_all, recv_until_closed


def test_in_flight_transfer_completes_across_sigterm(mesh: NodePair) -> None:
    assert mesh.beta.proc is not None
    with mesh.connect() as s:
        s.settimeout(20)
        s.sendall(b"before ")
        assert s.recv(7) == b"before "
        mesh.beta.signal(15)  # SIGTERM to the destination node: it drains
        wait_for(lambda: http_get(mesh.beta.readiness_url)[0] == 503, mesh.beta)  # it took the signal
        # A new connection is refused while the old one is still open.
        with mesh.connect() as late:
            late.settimeout(20)
            late.sendall(b"late")
            assert recv_until_closed(late) == b""
        assert mesh.beta.proc.poll() is None  # still draining: our tunnel is in flight
        s.sendall(b"after")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"after"
    assert mesh.beta.proc.wait(20) == 0
    assert "drain" in mesh.beta.log()
