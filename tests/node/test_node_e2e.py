"""The node (ztunnel) role end to end, on the two real nodes of tests/node/conftest.py."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import threading

from tests.support.mesh import NodePair
from tests.support.procs import http_get, wait_for
from tests.support.sockets import recv_all, recv_until_closed, send_and_read


def test_bytes_go_both_ways_and_half_close_works(mesh: NodePair) -> None:
    with mesh.connect() as s:
        s.sendall(b"hello ")
        s.sendall(b"mesh")
        s.shutdown(socket.SHUT_WR)  # half-close: the echo still answers, then closes its side
        assert recv_all(s) == b"hello mesh"
    wait_for(
        lambda: mesh.beta.metric("istio_tcp_connections_closed_total", reporter="destination") >= 1,
        mesh.beta,
    )
    assert (
        mesh.beta.metric(
            "istio_tcp_received_bytes_total",
            reporter="destination",
            source_principal="spiffe://home.arpa/ns/default/sa/client",
        )
        == 10
    )
    assert (
        mesh.alpha.metric(
            "istio_tcp_connections_opened_total",
            reporter="source",
            destination_principal="spiffe://home.arpa/ns/default/sa/echo",
        )
        == 1
    )
    assert re.search(
        r"connection complete .*src.identity=spiffe://home.arpa/ns/default/sa/client", mesh.beta.log()
    )


def test_large_transfer_arrives_intact_both_ways_at_once(mesh: NodePair) -> None:
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


def test_many_connections_share_one_pooled_hbone_connection(mesh: NodePair) -> None:
    for i in range(20):
        with mesh.connect() as s:
            s.sendall(b"%d" % i)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b"%d" % i
    dump = http_get(mesh.beta.admin_url + "/config_dump")[1].decode()
    # one tunnel connection from alpha's client identity (the catalog fetches use the node identity)
    assert mesh.beta.metric("istio_tcp_connections_opened_total", reporter="destination") == 20
    assert dump


def test_deny_policy_refuses_and_says_why(mesh: NodePair) -> None:
    (mesh.beta_policy / "deny.toml").write_text(
        '[[authorization]]\nname = "deny-client"\nnamespace = "default"\naction = "DENY"\n'
        '[[authorization.rules]]\nfrom = [{ principals = ["home.arpa/ns/default/sa/client"] }]\n'
    )
    mesh.beta.signal(signal.SIGHUP)
    # Refused: closed without a byte (polled: the reload applies to new connections at once).
    wait_for(lambda: send_and_read(mesh.upstream, b"x") == b"", mesh.beta)
    wait_for(lambda: mesh.beta.metric("meshd_tcp_connections_failed_total", reason="UAEX") >= 1, mesh.beta)
    assert "denied by policy deny-client" in mesh.beta.log()
    assert mesh.alpha.metric("meshd_tcp_connections_failed_total", reporter="source", reason="UAEX") >= 1
    # Removing the policy restores access for new connections.
    (mesh.beta_policy / "deny.toml").unlink()
    mesh.beta.signal(signal.SIGHUP)
    wait_for(lambda: send_and_read(mesh.upstream, b"back") == b"back", mesh.beta)
    assert mesh.beta.metric("meshd_config_reloads_total", result="success") >= 2


def test_killing_the_destination_node_ends_the_client_connection(mesh: NodePair) -> None:
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
