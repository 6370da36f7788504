"""Draining a waypoint with keep-alive clients inside its tunnels (real daemons: alpha, wp, beta).

SIGTERM with `drain_timeout = "30s"`: an idle keep-alive HTTP/1.1 connection is closed at once, a
request in flight gets its response (with `connection: close`), and the waypoint exits 0 long before
the drain timeout.
"""

from __future__ import annotations

import contextlib
import http.client
import signal
import threading
import time
from pathlib import Path

from tests.support.http_backend import http_backend
from tests.support.mesh import Host, Mesh, Port, Service, Upstream, Workload
from tests.support.procs import unique_loopback, wait_for

PORT = 9080
UPSTREAM = 17180


def test_sigterm_closes_idle_keepalive_and_finishes_in_flight(tmp_path: Path) -> None:
    a_ip, r_ip = unique_loopback(), unique_loopback()
    mesh = Mesh(
        tmp_path,
        [
            Host("alpha", a_ip, upstreams=[Upstream("web.default", PORT, f"{a_ip}:{UPSTREAM}")]),
            Host(
                "beta",
                workloads=[Workload("web", r_ip, [PORT], services=["web"])],
                services=[Service("web", [Port(PORT, "http")], waypoint="wp")],
            ),
            Host("wp", role="waypoint", top='drain_timeout = "30s"\n'),
        ],
    )
    with http_backend("web", r_ip, PORT) as backend, mesh.running():
        wp = mesh["wp"]
        mesh.wait_knows("alpha", services=["web.default"], nodes=["wp"])
        mesh.wait_knows("beta", nodes=["wp"])  # beta admits wp's tunnels
        mesh.wait_knows("wp", services=["web.default"], nodes=["beta"])

        idle = http.client.HTTPConnection(a_ip, UPSTREAM, timeout=10)
        idle.request("GET", "/first")
        first = idle.getresponse()
        assert (first.status, first.read()) == (200, b"web GET /first\n")  # now idle, kept alive

        slow: dict[str, object] = {}

        def in_flight() -> None:
            conn = http.client.HTTPConnection(a_ip, UPSTREAM, timeout=10)
            conn.request("GET", "/slow?ms=1500")
            resp = conn.getresponse()
            slow.update(status=resp.status, body=resp.read(), connection=resp.getheader("connection"))

        thread = threading.Thread(target=in_flight, daemon=True)
        thread.start()
        wait_for(lambda: "/slow?ms=1500" in backend.paths(), wp)  # reached the backend: in flight

        started = time.monotonic()
        wp.signal(signal.SIGTERM)
        assert wp.proc is not None
        assert wp.proc.wait(timeout=10) == 0, wp.log()
        elapsed = time.monotonic() - started
        assert elapsed < 10, elapsed  # the drain timeout is 30 s: nothing held it
        thread.join(timeout=10)
        assert slow == {"status": 200, "body": b"web GET /slow?ms=1500\n", "connection": "close"}
        # The idle keep-alive connection was closed by the waypoint (alpha passes the close on).
        assert idle.sock is not None
        idle.sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert idle.sock.recv(1) == b""
        idle.close()
