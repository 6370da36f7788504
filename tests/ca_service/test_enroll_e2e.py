"""The CA service with real daemons: alpha serves the CA (and an echo workload); other hosts enroll
with one-time tokens, get their certificates by CSR over HBONE, and carry traffic to alpha."""

from __future__ import annotations

import json
import signal
import socket

from cryptography import x509

from meshd.identity.ca import LocalCA
from tests.support.ca_hosts import UPSTREAM_PORT, Hosts
from tests.support.procs import Meshd, http_get, meshd_cli, wait_for
from tests.support.sockets import send_and_read


def test_enrolled_host_serves_traffic_and_tokens_and_identities_are_enforced(hosts: Hosts) -> None:
    token = hosts.token("beta", "default/client")
    beta = hosts.enrolled_node("beta", "client", token)
    assert send_and_read((beta.ip, UPSTREAM_PORT), b"hello via enrolled beta") == b"hello via enrolled beta"
    # the client workload's key was made on beta; its certificate came from the CA by CSR
    assert "CA issued a certificate" in hosts.alpha.log()
    assert "spiffe://home.arpa/ns/default/sa/client" in hosts.alpha.log()

    # the same token a second time: refused with the reason, and the CA logs it
    again = meshd_cli("enroll", "--token", "-", "--state-dir", str(hosts.tmp / "again"), stdin=token + "\n")
    assert again.returncode == 1
    assert "already used" in again.stderr
    wait_for(lambda: "CA refused enrollment" in hosts.alpha.log(), hosts.alpha)

    # an identity beta is not entitled to: it gets nothing (the reload is refused), the CA logs it
    cfg = beta.config
    cfg.write_text(
        cfg.read_text() + f'[[workload]]\nname = "payments"\naddress = "{beta.ip}"\nports = [8001]\n'
    )
    beta.signal(signal.SIGHUP)
    wait_for(
        lambda: "not authorized for spiffe://home.arpa/ns/default/sa/payments" in hosts.alpha.log(),
        hosts.alpha,
    )
    wait_for(lambda: "reload rejected" in beta.log(), beta)
    dump = json.loads(http_get(beta.admin_url + "/config_dump")[1])
    assert "spiffe://home.arpa/ns/default/sa/payments" not in dump["certificates"]
    assert send_and_read((beta.ip, UPSTREAM_PORT), b"still fine") == b"still fine"
    # every decision is counted on the CA host
    assert ca_requests(hosts.alpha, "enroll", "issued") >= 1
    assert ca_requests(hosts.alpha, "enroll", "refused") >= 1
    assert ca_requests(hosts.alpha, "sign", "issued") >= 1
    assert ca_requests(hosts.alpha, "sign", "refused") >= 1


def ca_requests(daemon: Meshd, kind: str, result: str) -> float:
    _, body = http_get(daemon.metrics_url)
    for line in body.decode().splitlines():
        if (
            line.startswith("meshd_ca_requests_total{")
            and f'kind="{kind}"' in line
            and f'result="{result}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_bundle_rotation_keeps_a_tunnel_and_new_connections_verify_against_the_new_root(hosts: Hosts) -> None:
    beta = hosts.enrolled_node("beta", "client", hosts.token("beta", "default/client"))
    old_root = LocalCA.load(hosts.ca_dir).cert
    with socket.create_connection((beta.ip, UPSTREAM_PORT), timeout=10) as long_lived:
        long_lived.sendall(b"before")
        assert long_lived.recv(6) == b"before"

        out = meshd_cli("ca", "rotate", "prepare", "--dir", str(hosts.ca_dir))
        assert out.returncode == 0, out.stderr
        for node in (hosts.alpha, beta):  # both nodes now trust old + new
            wait_for(lambda n=node: "trust bundle updated" in n.log(), node)  # type: ignore[misc]
        out = meshd_cli("ca", "rotate", "activate", "--dir", str(hosts.ca_dir))
        assert out.returncode == 0, out.stderr
        new_root = LocalCA.load(hosts.ca_dir).cert
        assert new_root != old_root

        # a host enrolling now gets certificates from the new root; alpha (still holding old-root
        # certificates) accepts it, and it accepts alpha: both roots are trusted during the overlap
        gamma = hosts.enrolled_node("gamma", "web", hosts.token("gamma", "default/web"))
        node_cert = x509.load_pem_x509_certificates((hosts.tmp / "gamma-state" / "cert.pem").read_bytes())[0]
        node_cert.verify_directly_issued_by(new_root)
        assert send_and_read((gamma.ip, UPSTREAM_PORT), b"new root") == b"new root"
        assert send_and_read((beta.ip, UPSTREAM_PORT), b"old root") == b"old root"

        # the tunnel opened before the rotation is still up
        long_lived.sendall(b"after")
        assert long_lived.recv(5) == b"after"
