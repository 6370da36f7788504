"""Two real meshd nodes as subprocesses on their own loopback addresses: the node (ztunnel) role
end to end. alpha hosts the client app and an upstream listener; beta hosts the echo workload."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshd.identity.ca import LocalCA
from meshd.tools.echo import echo_server
from tests.support.configs import ECHO_PORT, echo_workload, node_config
from tests.support.procs import Meshd, http_get, unique_loopback

UPSTREAM_PORT = 17000


@dataclass
class Mesh:
    alpha: Meshd
    beta: Meshd
    upstream: tuple[str, int]
    beta_policy: Path

    def connect(self) -> socket.socket:
        return socket.create_connection(self.upstream, timeout=10)


@pytest.fixture
def mesh(tmp_path: Path, ca: LocalCA, daemons: list[Meshd]) -> Iterator[Mesh]:
    a_ip, b_ip = unique_loopback(), unique_loopback()
    alpha_cfg = node_config(
        tmp_path / "alpha.toml",
        "alpha",
        tmp_path / "ca",
        peers=[f"{b_ip}:15008"],
        policy_dir=tmp_path / "alpha-policy",
        body=f'[[workload]]\nname = "client"\naddress = "{a_ip}"\nports = [8000]\n'
        f'[[upstream]]\nservice = "echo.default"\nport = {ECHO_PORT}\nlisten = "{a_ip}:{UPSTREAM_PORT}"\n',
    )
    beta_cfg = node_config(
        tmp_path / "beta.toml",
        "beta",
        tmp_path / "ca",
        peers=[f"{a_ip}:15008"],
        policy_dir=tmp_path / "beta-policy",
        body=echo_workload(b_ip),
    )
    with echo_server(b_ip, ECHO_PORT):
        beta = Meshd(beta_cfg, b_ip)
        alpha = Meshd(alpha_cfg, a_ip)
        daemons += [beta, alpha]
        beta.start()
        alpha.start()
        beta.wait_ready()
        alpha.wait_ready()
        wait_for(lambda: catalog_has(alpha, "echo.default"), alpha)
        yield Mesh(alpha, beta, (a_ip, UPSTREAM_PORT), tmp_path / "beta-policy")


def catalog_has(daemon: Meshd, service: str) -> bool:
    """The daemon's merged catalog lists the service (fetched from its peer)."""
    return service in json.loads(http_get(daemon.admin_url + "/config_dump")[1])["catalog"]["services"]


def wait_for(condition: object, daemon: Meshd, timeout: float = 15.0) -> None:
    """Poll a condition on a daemon's own endpoints (not a sleep standing in for readiness)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s:\n{daemon.log()[-4000:]}")


def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(1 << 16):
        out += chunk
    return bytes(out)


def recv_until_closed(sock: socket.socket) -> bytes:
    """What arrives before the mesh closes (or resets) the connection."""
    try:
        return recv_all(sock)
    except ConnectionResetError:
        return b""


def round_trip(mesh: Mesh, data: bytes) -> bytes:
    """Send through alpha's upstream, half-close, return what came back (b"" if refused)."""
    with mesh.connect() as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return recv_until_closed(s)


def metric(daemon: Meshd, name: str, **labels: str) -> float:
    _, body = http_get(daemon.metrics_url)
    total = 0.0
    for line in body.decode().splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_bytes_go_both_ways_and_half_close_works(mesh: Mesh) -> None:
    with mesh.connect() as s:
        s.sendall(b"hello ")
        s.sendall(b"mesh")
        s.shutdown(socket.SHUT_WR)  # half-close: the echo still answers, then closes its side
        assert recv_all(s) == b"hello mesh"
    wait_for(
        lambda: metric(mesh.beta, "istio_tcp_connections_closed_total", reporter="destination") >= 1,
        mesh.beta,
    )
    assert (
        metric(
            mesh.beta,
            "istio_tcp_received_bytes_total",
            reporter="destination",
            source_principal="spiffe://home.arpa/ns/default/sa/client",
        )
        == 10
    )
    assert (
        metric(
            mesh.alpha,
            "istio_tcp_connections_opened_total",
            reporter="source",
            destination_principal="spiffe://home.arpa/ns/default/sa/echo",
        )
        == 1
    )
    assert re.search(
        r"connection complete .*src.identity=spiffe://home.arpa/ns/default/sa/client", mesh.beta.log()
    )


def test_large_transfer_arrives_intact_both_ways_at_once(mesh: Mesh) -> None:
    size = 100 * 1024 * 1024
    block = os.urandom(1 << 20)
    sent = hashlib.sha256()
    received = hashlib.sha256()
    count = 0
    with mesh.connect() as s:
        s.settimeout(60)

        def writer() -> None:
            for i in range(size // len(block)):
                chunk = block[i % 7 :] + block[: i % 7]  # vary the content
                sent.update(chunk)
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=writer)
        t.start()
        while chunk := s.recv(1 << 20):
            received.update(chunk)
            count += len(chunk)
        t.join(60)
    assert count == size
    assert received.hexdigest() == sent.hexdigest()


def test_many_connections_share_one_pooled_hbone_connection(mesh: Mesh) -> None:
    for i in range(20):
        with mesh.connect() as s:
            s.sendall(b"%d" % i)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b"%d" % i
    dump = http_get(mesh.beta.admin_url + "/config_dump")[1].decode()
    # one tunnel connection from alpha's client identity (the catalog fetches use the node identity)
    assert metric(mesh.beta, "istio_tcp_connections_opened_total", reporter="destination") == 20
    assert dump


def test_deny_policy_refuses_and_says_why(mesh: Mesh) -> None:
    (mesh.beta_policy / "deny.toml").write_text(
        '[[authorization]]\nname = "deny-client"\nnamespace = "default"\naction = "DENY"\n'
        '[[authorization.rules]]\nfrom = [{ principals = ["home.arpa/ns/default/sa/client"] }]\n'
    )
    mesh.beta.signal(signal.SIGHUP)
    # Refused: closed without a byte (polled: the reload applies to new connections at once).
    wait_for(lambda: round_trip(mesh, b"x") == b"", mesh.beta)
    wait_for(lambda: metric(mesh.beta, "meshd_tcp_connections_failed_total", reason="UAEX") >= 1, mesh.beta)
    assert "denied by policy deny-client" in mesh.beta.log()
    assert metric(mesh.alpha, "meshd_tcp_connections_failed_total", reporter="source", reason="UAEX") >= 1
    # Removing the policy restores access for new connections.
    (mesh.beta_policy / "deny.toml").unlink()
    mesh.beta.signal(signal.SIGHUP)
    wait_for(lambda: round_trip(mesh, b"back") == b"back", mesh.beta)
    assert metric(mesh.beta, "meshd_config_reloads_total", result="success") >= 2


def test_killing_the_destination_node_ends_the_client_connection(mesh: Mesh) -> None:
    with mesh.connect() as s:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        assert mesh.beta.proc is not None
        mesh.beta.proc.kill()
        mesh.beta.proc.wait()
        s.settimeout(30)  # bounded: the pool notices the broken connection, alpha closes ours
        assert recv_until_closed(s) == b""
    # alpha itself is fine and still ready; a new connection fails fast instead of hanging
    assert http_get(mesh.alpha.readiness_url)[0] == 200
    with mesh.connect() as s:
        s.settimeout(30)
        assert recv_until_closed(s) == b""
