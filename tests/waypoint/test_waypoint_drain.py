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

from meshd.identity.ca import LocalCA
from tests.node.test_node_e2e import wait_for
from tests.support.configs import node_config
from tests.support.http_backend import http_backend
from tests.support.procs import Meshd, unique_loopback
from tests.waypoint.test_waypoint_e2e import knows

PORT = 9080
UPSTREAM = 17180


def test_sigterm_closes_idle_keepalive_and_finishes_in_flight(tmp_path: Path) -> None:
    LocalCA.init(tmp_path / "ca", "home.arpa")
    a_ip, b_ip, w_ip, r_ip = (unique_loopback() for _ in range(4))
    alpha_cfg = node_config(
        tmp_path / "alpha.toml",
        "alpha",
        tmp_path / "ca",
        peers=[f"{b_ip}:15008", f"{w_ip}:15008"],
        body=f'[[upstream]]\nservice = "web.default"\nport = {PORT}\nlisten = "{a_ip}:{UPSTREAM}"\n',
    )
    beta_cfg = node_config(
        tmp_path / "beta.toml",
        "beta",
        tmp_path / "ca",
        peers=[f"{a_ip}:15008", f"{w_ip}:15008"],
        body=f'[[workload]]\nname = "web"\naddress = "{r_ip}"\nports = [{PORT}]\nservices = ["web"]\n'
        f'[[service]]\nname = "web"\nwaypoint = "wp"\nports = [{{ port = {PORT}, protocol = "http" }}]\n',
    )
    wp_cfg = node_config(
        tmp_path / "wp.toml", "wp", tmp_path / "ca", peers=[f"{a_ip}:15008", f"{b_ip}:15008"]
    )
    wp_cfg.write_text('role = "waypoint"\ndrain_timeout = "30s"\n' + wp_cfg.read_text())
    with http_backend("web", r_ip, PORT) as backend:
        beta, alpha, wp = Meshd(beta_cfg, b_ip), Meshd(alpha_cfg, a_ip), Meshd(wp_cfg, w_ip)
        daemons = [beta, alpha, wp]
        try:
            for d in daemons:
                d.start()
            for d in daemons:
                d.wait_ready()
            wait_for(lambda: knows(alpha, services=("web.default",), nodes=("wp",)), alpha)
            wait_for(lambda: knows(beta, nodes=("wp",)), beta)  # beta admits wp's tunnels
            wait_for(lambda: knows(wp, services=("web.default",), nodes=("beta",)), wp)

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
        finally:
            for d in daemons:
                if d.proc is not None and d.proc.poll() is None:
                    d.proc.kill()
                    d.proc.wait()
