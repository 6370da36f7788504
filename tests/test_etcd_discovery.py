"""discovery.etcd against a real etcd (Debian's etcd-server) on loopback, with mutual TLS.

Two meshd nodes find each other only through etcd (mDNS off, no static peers), talking to etcd
with their own SPIFFE node certificates; a forged entry written by an operator who holds no node
certificate adds nothing; a SIGKILLed node's entry leaves with its lease.
"""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from meshd.discovery.etcd_wire import b64
from meshd.identity.ca import LocalCA
from meshd.identity.spiffe import SpiffeId
from tests.support.configs import echo_workload, node_config
from tests.support.etcd import Etcdctl, EtcdMember, EtcdPki, enable_rbac, etcd_cluster
from tests.support.mesh import dump
from tests.support.procs import Meshd, meshd_cli, unique_loopback, wait_for
from tests.support.sockets import send_and_read

pytestmark = pytest.mark.slow
TTL = 3


def _nodes(node: Meshd) -> list[str]:
    return dump(node)["catalog"]["nodes"]  # type: ignore[no-any-return]


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
            assert send_and_read((a_ip, 17000), b"hello through etcd") == b"hello through etcd"

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
            seen = dump(alpha)
            assert seen["catalog"]["nodes"] == ["alpha", "beta"]
            assert seen["etcd"]["ignored"] == {base + "junk": "entry is not JSON"}
            rogue = next(p for p in seen["peers"] if p["address"] == f"{rogue_ip}:15008")
            assert rogue["how"] == "etcd" and rogue["name"] is None and rogue["last_error"], rogue
            assert "proved node 'beta', not 'mallory'" in alpha.log()
            ctl.run("del", base + "evil")
            ctl.run("del", base + "mallory")
            assert send_and_read((a_ip, 17000), b"still") == b"still"
            wait_for(lambda: all(p["address"] != f"{rogue_ip}:15008" for p in dump(alpha)["peers"]), alpha)
            assert "beta" in _nodes(alpha)  # mallory's entry leaving does not take beta with it

            # SIGKILL: no goodbye; the entry leaves when its lease expires.
            beta.signal(signal.SIGKILL)
            # Within the lease TTL, plus the margin a loaded machine needs for the watch and the poll.
            wait_for(lambda: "beta" not in _nodes(alpha), alpha, timeout=TTL + 5)
            assert "etcd peer gone" in alpha.log()
            assert alpha.stop() == 0
            assert "Traceback" not in alpha.log(), alpha.log()
        finally:
            echo.kill()
            echo.wait()


def test_with_etcd_rbac_each_node_writes_only_its_own_key(
    tmp_path: Path, ca: LocalCA, daemons: list[Meshd]
) -> None:
    """etcd auth enabled as docs/discovery.md sets it up: nodes authenticate by password through the
    gateway (over mTLS with their own mesh certificates) and meet; alpha's user cannot touch beta's key."""
    pki = EtcdPki.create(tmp_path / "etcd-pki", tmp_path / "ca" / "ca.crt")
    member = EtcdMember("m1", unique_loopback(), tmp_path / "etcd-m1", pki)
    ctl = Etcdctl([member.client_url], pki)
    passwords = {"alpha": "alpha-secret", "beta": "beta-secret"}
    with etcd_cluster([member]):
        ctl.wait_healthy(members=[member])
        enable_rbac(ctl, "/meshd/home.arpa/", passwords)
        nodes = {}
        for name in passwords:
            secret = tmp_path / f"{name}.password"
            secret.write_text(passwords[name] + "\n")
            body = _etcd_body(member.client_url, pki) + f'user = "meshd-{name}"\npassword_file = "{secret}"\n'
            cfg = node_config(tmp_path / f"{name}.toml", name, tmp_path / "ca", body=body)
            nodes[name] = Meshd(cfg, unique_loopback())
            daemons.append(nodes[name])
            nodes[name].start().wait_ready()
        wait_for(lambda: _nodes(nodes["alpha"]) == ["alpha", "beta"], nodes["alpha"])
        wait_for(lambda: _nodes(nodes["beta"]) == ["alpha", "beta"], nodes["beta"])

        # alpha's etcd user, over mTLS with alpha's own node certificate, against beta's key
        cert = ca.issue(SpiffeId.node("home.arpa", "alpha"))
        (tmp_path / "alpha.crt").write_bytes(cert.cert_pem)
        (tmp_path / "alpha.key").write_bytes(cert.key_pem)
        tls = ssl.create_default_context(cafile=str(pki.ca_cert))
        tls.load_cert_chain(str(tmp_path / "alpha.crt"), str(tmp_path / "alpha.key"))
        with httpx.Client(base_url=member.client_url, verify=tls, timeout=5) as client:
            token = client.post(
                "/v3/auth/authenticate", json={"name": "meshd-alpha", "password": passwords["alpha"]}
            ).json()["token"]
            forged = {"key": b64(b"/meshd/home.arpa/nodes/beta"), "value": b64(b"{}")}
            answer = client.post("/v3/kv/put", json=forged, headers={"Authorization": token}).json()
            assert answer.get("message") == "etcdserver: permission denied", answer
        assert _nodes(nodes["alpha"]) == ["alpha", "beta"]
        for node in nodes.values():
            assert node.stop() == 0
            assert "etcd unreachable" not in node.log(), node.log()
