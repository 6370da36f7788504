"""Hot reload with real daemons: config-file edits apply without a signal, open connections survive,
a bad edit changes nothing."""

from __future__ import annotations

import socket

from tests.support.mesh import NodePair
from tests.support.procs import http_get, wait_for
from tests.support.sockets import recv_all, send_and_read


def test_config_edit_adds_an_upstream_and_keeps_open_connections(mesh: NodePair) -> None:
    host, port = mesh.upstream
    with mesh.connect() as held:
        held.settimeout(20)
        held.sendall(b"one ")
        assert held.recv(4) == b"one "
        # Add a second upstream for the same service; no signal: the file watcher notices.
        with mesh.alpha.config.open("a") as f:
            f.write(f'[[upstream]]\nservice = "echo.default"\nport = 7000\nlisten = "{host}:{port + 1}"\n')

        def second_upstream_works() -> bool:
            try:
                with socket.create_connection((host, port + 1), timeout=5) as s:
                    s.sendall(b"two")
                    s.shutdown(socket.SHUT_WR)
                    return recv_all(s) == b"two"
            except OSError:
                return False

        wait_for(second_upstream_works, mesh.alpha)
        held.sendall(b"still open")  # the reload did not cut the connection in flight
        held.shutdown(socket.SHUT_WR)
        assert recv_all(held) == b"still open"
    assert send_and_read(mesh.upstream, b"first upstream") == b"first upstream"  # not rebound, still serving
    assert mesh.alpha.metric("meshd_config_reloads_total", result="success") >= 1
    assert "config and policy reloaded" in mesh.alpha.log()


def test_bad_edit_is_refused_and_changes_nothing(mesh: NodePair) -> None:
    text = mesh.alpha.config.read_text()
    mesh.alpha.config.write_text(text + "[[upstream]]\nservice = 'echo'\nport = 'seven'\n")
    wait_for(lambda: mesh.alpha.metric("meshd_config_reloads_total", result="failure") >= 1, mesh.alpha)
    bad_line = len(text.splitlines()) + 3
    assert f"{mesh.alpha.config}:{bad_line}: upstream[1].port must be an integer" in mesh.alpha.log()
    assert send_and_read(mesh.upstream, b"unchanged") == b"unchanged"
    assert http_get(mesh.alpha.readiness_url)[0] == 200


def test_restart_only_keys_are_kept_and_reported(mesh: NodePair) -> None:
    text = mesh.alpha.config.read_text()
    mesh.alpha.config.write_text(text.replace('node_name = "alpha"', 'node_name = "renamed"'))
    wait_for(lambda: "takes effect after a restart" in mesh.alpha.log(), mesh.alpha)
    assert "'node_name' changed" in mesh.alpha.log()
    assert send_and_read(mesh.upstream, b"same node") == b"same node"
