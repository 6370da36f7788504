"""discovery.etcd against a real etcd (Debian's etcd-server) on loopback, with mutual TLS.

Two meshd nodes find each other only through etcd (mDNS off, no static peers), talking to etcd
with their own SPIFFE node certificates; a forged entry written by an operator who holds no node
certificate adds nothing; a SIGKILLed node's entry leaves with its lease.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshd.identity.ca import LocalCA
from tests.support.configs import echo_workload, node_config
from tests.support.etcd import Etcdctl, EtcdMember, EtcdPki, etcd_cluster
from tests.support.procs import Meshd, http_get, meshd_cli, unique_loopback, wait_for

pytestmark = pytest.mark.slow
TTL = 3


def _dump(node: Meshd) -> dict[str, object]:
    return json.loads(http_get(node.admin_url + "/config_dump")[1])  # type: ignore[no-any-return]


def _nodes(node: Meshd) -> list[str]:
    return _dump(node)["catalog"]["nodes"]  # type: ignore[index,no-any-return]


def _exchange(address: tuple[str, int], payload: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _etcd_body(endpoint: str, pki: EtcdPki) -> str:
    return f'[discovery.etcd]\nendpoints = ["{endpoint}"]\nca = "{pki.ca_cert}"\nlease_ttl = "{TTL}s"\n'


def test_nodes_meet_through_etcd_forged_entries_add_nothing_and_a_killed_node_leaves(
    tmp_path: Path, ca: LocalCA, daemons: list[Meshd]
) -> None:
    pki = EtcdPki.create(tmp_path / "etcd-pki", tmp_path / "ca" / "ca.crt")
    member = EtcdMember("m1", unique_loopback(), tmp_path / "etcd-m1", pki)
    ctl = Etcdctl([member.client_url], pki)
    a_ip, b_ip, echo_ip, rogue_ip = (unique_loopback() for _ in range(4))
    with etcd_cluster([member]):
        ctl.wait_healthy(members=[member])
        echo = subprocess.Popen([sys.executable, "-m", "meshd.tools.echo", f"{echo_ip}:7000"])
        try:
            beta_cfg = node_config(
                tmp_path / "beta.toml",
                "beta",
                tmp_path / "ca",
                body=echo_workload(echo_ip) + _etcd_body(member.client_url, pki),
            )
            alpha_cfg = node_config(
                tmp_path / "alpha.toml",
                "alpha",
                tmp_path / "ca",
                body=(
                    f'[[upstream]]\nservice = "echo.default"\nport = 7000\nlisten = "{a_ip}:17000"\n'
                    + _etcd_body(member.client_url, pki)
                ),
            )
            beta, alpha = Meshd(beta_cfg, b_ip), Meshd(alpha_cfg, a_ip)
            daemons += [beta, alpha]
            beta.start().wait_ready()
            alpha.start().wait_ready()
            wait_for(lambda: "beta" in _nodes(alpha), alpha)
            assert _exchange((a_ip, 17000), b"hello through etcd") == b"hello through etcd"

            peers = meshd_cli("peers", "--admin", f"{a_ip}:15000")
            assert peers.returncode == 0, peers.stderr
            row = next(line for line in peers.stdout.splitlines() if line.startswith("beta"))
            assert " etcd " in row, peers.stdout
            status = meshd_cli("status", "--admin", f"{a_ip}:15000").stdout
            assert f"etcd: connected to {member.client_url}" in status, status
            assert alpha.metric("meshd_etcd_connected") == 1

            # Forged entries, written by an etcd operator who holds no node certificate.
            base = "/meshd/home.arpa/nodes/"
            fake = {"v": 1, "td": "home.arpa", "role": "node", "rev": "ab"}
            ctl.run("put", base + "evil", json.dumps({**fake, "node": "evil", "hbone": f"{rogue_ip}:15008"}))
            ctl.run(
                "put", base + "mallory", json.dumps({**fake, "node": "mallory", "hbone": f"{b_ip}:15008"})
            )
            ctl.run("put", base + "junk", "not json")
            wait_for(lambda: "etcd entry ignored: forged or stale" in alpha.log(), alpha)
            wait_for(lambda: "etcd entry not confirmed" in alpha.log(), alpha)
            dump = _dump(alpha)
            assert dump["catalog"]["nodes"] == ["alpha", "beta"]  # type: ignore[index]
            assert dump["etcd"]["ignored"] == {base + "junk": "entry is not JSON"}  # type: ignore[index]
            rogue = next(p for p in dump["peers"] if p["address"] == f"{rogue_ip}:15008")  # type: ignore[attr-defined]
            assert rogue["how"] == "etcd" and rogue["name"] is None and rogue["last_error"], rogue
            assert "proved node 'beta', not 'mallory'" in alpha.log()
            ctl.run("del", base + "evil")
            ctl.run("del", base + "mallory")
            assert _exchange((a_ip, 17000), b"still") == b"still"
            wait_for(lambda: all(p["address"] != f"{rogue_ip}:15008" for p in _dump(alpha)["peers"]), alpha)  # type: ignore[attr-defined]
            assert "beta" in _nodes(alpha)  # mallory's entry leaving does not take beta with it

            # SIGKILL: no goodbye; the entry leaves when its lease expires.
            beta.signal(signal.SIGKILL)
            killed = time.monotonic()
            wait_for(lambda: "beta" not in _nodes(alpha), alpha, timeout=TTL + 5)
            gone_after = time.monotonic() - killed
            assert gone_after < TTL + 2.5, gone_after
            assert "etcd peer gone" in alpha.log()
            assert alpha.stop() == 0
            assert "Traceback" not in alpha.log(), alpha.log()
        finally:
            echo.kill()
            echo.wait()
