"""Interop with a real daemon: Node.js's HTTP/2 stack (nghttp2) as the HBONE client of `meshd run`.

The client's certificates come from the CLI (`meshd ca init` / `meshd ca issue`), as an operator would
make them; the client tunnels to beta's echo workload through 15008 and checks every byte that comes
back. An identity a DENY policy names gets `:status 401`. A second, independent HTTP/2 implementation
catches what two copies of our own code would agree on wrongly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshd.tools.echo import echo_server
from tests.support.configs import ECHO_PORT, echo_workload, node_config
from tests.support.nodejs import node_binary, run_client
from tests.support.policy import deny, frm
from tests.support.procs import Meshd, meshd_cli, running, unique_loopback

TD = "home.arpa"
TIMEOUT = 45

DENY_POLICY = deny(
    frm(principals=["home.arpa/ns/default/sa/intruder"]), name="deny-intruder", workloads=["echo"]
)


def meshd_ok(*args: str) -> None:
    out = meshd_cli(*args)
    assert out.returncode == 0, f"meshd {' '.join(args)} failed:\n{out.stdout}{out.stderr}"


@dataclass
class Beta:
    daemon: Meshd
    ip: str
    ca_dir: Path
    tmp: Path

    def issue(self, sa: str) -> Path:
        out = self.tmp / f"certs-{sa}"
        meshd_ok(
            "ca",
            "issue",
            "--dir",
            str(self.ca_dir),
            "--id",
            f"spiffe://{TD}/ns/default/sa/{sa}",
            "--out",
            str(out),
        )
        return out

    def node_client(self, certs: Path, *streams: tuple[str, int]) -> dict[str, Any]:
        args = [a for authority, size in streams for a in (authority, str(size))]
        out = run_client(
            "node_hbone_client.js",
            *(self.ip, "15008"),
            *(str(certs / f) for f in ("cert.pem", "key.pem", "ca.crt")),
            *args,
            timeout=TIMEOUT,
            context="\n" + self.daemon.log()[-3000:],
        )
        out["by_authority"] = {r["authority"]: r for r in out["results"]}
        return out


@pytest.fixture(scope="module")
def beta(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Beta]:
    node_binary()
    tmp = tmp_path_factory.mktemp("interop")
    ca_dir = tmp / "ca"
    meshd_ok("ca", "init", "--dir", str(ca_dir), "--trust-domain", TD)
    (tmp / "policy.d").mkdir()
    (tmp / "policy.d" / "10-deny.toml").write_text(DENY_POLICY)
    ip = unique_loopback()
    cfg = node_config(
        tmp / "beta.toml",
        "beta",
        ca_dir,
        policy_dir=tmp / "policy.d",
        body=echo_workload(ip),
        trust_domain=TD,
    )
    with echo_server(ip, ECHO_PORT), running(Meshd(cfg, ip)) as daemon:
        yield Beta(daemon, ip, ca_dir, tmp)


def test_node_http2_client_tunnels_through_the_daemon(beta: Beta) -> None:
    echo = f"{beta.ip}:{ECHO_PORT}"
    out = beta.node_client(
        beta.issue("client"),
        (echo, 8 * 1024 * 1024 + 123),  # several windows' worth, odd-sized
        (echo, 1),
        (echo, 0),
        (f"{beta.ip}:{ECHO_PORT + 1}", 10),  # no workload there
        ("not-an-ip:80", 0),
    )
    assert out["san"] == f"URI:spiffe://{TD}/ns/default/sa/echo"  # the workload's identity, not the node's
    assert out["tls"]["version"] == "TLSv1.3" and out["tls"]["alpn"] == "h2"
    assert out["tls"]["cipher"] in {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"}
    echoes = [r for r in out["results"] if r["authority"] == echo]
    for r in echoes:
        assert r["status"] == 200 and r["received"] == r["sent"] and r["echo_ok"], r
    assert out["by_authority"][f"{beta.ip}:{ECHO_PORT + 1}"]["status"] == 503
    assert out["by_authority"]["not-an-ip:80"]["status"] == 400
    log = beta.daemon.log()
    assert f"connection complete reporter=destination src.addr=192.0.2.7:40000 dst.addr={echo}" in log
    assert f"src.identity=spiffe://{TD}/ns/default/sa/client" in log
    assert f"bytes_recv={8 * 1024 * 1024 + 123}" in log


def test_denied_identity_gets_401(beta: Beta) -> None:
    echo = f"{beta.ip}:{ECHO_PORT}"
    out = beta.node_client(beta.issue("intruder"), (echo, 100))
    refused = out["by_authority"][echo]
    assert refused["status"] == 401, refused
    assert refused["received"] == len(refused["body"].encode()) and "deny-intruder" in refused["body"]
    assert "denied by policy deny-intruder" in beta.daemon.log()
    # The same daemon still lets a permitted identity through.
    ok = beta.node_client(beta.issue("friend"), (echo, 1000))["by_authority"][echo]
    assert ok["status"] == 200 and ok["echo_ok"], ok
