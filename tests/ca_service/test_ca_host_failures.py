"""A CA host whose CA folder is read-only (as a systemd unit's ProtectSystem=strict makes /etc): an
enrollment fails with the real cause on both sides, and the CA host keeps serving everything else."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from meshd.identity.ca import LocalCA
from tests.support.ca_hosts import UPSTREAM_PORT, Hosts
from tests.support.configs import echo_workload
from tests.support.procs import Meshd, http_get, meshd_cli, read_only_mount, unique_loopback, wait_for
from tests.support.sockets import send_and_read


def test_enrollment_on_a_read_only_ca_folder_fails_that_request_and_the_daemon_keeps_serving(
    tmp_path: Path, ca: LocalCA, daemons: list[Meshd]
) -> None:
    ca_dir = tmp_path / "ca"
    ip = unique_loopback()
    cfg = tmp_path / "alpha.toml"
    cfg.write_text(
        f'trust_domain = "home.arpa"\nnode_name = "alpha"\n[identity]\nca_dir = "{ca_dir}"\n'
        f'[discovery]\nmdns = false\n[ca]\nserve = true\ndir = "{ca_dir}"\n' + echo_workload(ip)
    )
    token = meshd_cli(
        "ca", "token", "--dir", str(ca_dir), "--node", "beta", "--workloads", "default/client",
        "--ttl", "10m", "--address", f"{ip}:15012",
    )  # fmt: skip
    assert token.returncode == 0, token.stderr
    alpha = Meshd(cfg, ip, overrides=[f"ca.listen={ip}:15012"], wrapper=read_only_mount(ca_dir))
    daemons.append(alpha)
    alpha.start().wait_ready()

    out = meshd_cli("enroll", "--token", token.stdout.strip(), "--state-dir", str(tmp_path / "beta"))
    assert out.returncode == 1
    # the enrolling host prints the CA's reason: the real cause, on the CA's side
    assert "Read-only file system" in out.stderr, out.stderr
    assert "ca-state.lock" in out.stderr, out.stderr
    wait_for(lambda: "Read-only file system" in alpha.log(), alpha)
    # the CA host is still up and serving: readiness, admin, and the enrollment endpoint itself
    assert alpha.proc is not None and alpha.proc.poll() is None, alpha.log()
    assert http_get(alpha.readiness_url)[0] == 200
    assert json.loads(http_get(alpha.admin_url + "/config_dump")[1])["node_name"] == "alpha"
    again = meshd_cli("enroll", "--token", token.stdout.strip(), "--state-dir", str(tmp_path / "beta"))
    assert "Read-only file system" in again.stderr, again.stderr
    assert "is another meshd" not in alpha.log()
    assert alpha.stop() == 0


def test_a_csr_the_ca_cannot_serve_fails_with_its_reason_and_both_hosts_keep_serving(hosts: Hosts) -> None:
    beta = hosts.enrolled_node("beta", "client", hosts.token("beta", "default/client"))
    (hosts.ca_dir / "ca-state.json").write_text("{ not json")  # a disk error, a bad restore
    beta.config.write_text(
        beta.config.read_text() + f'[[workload]]\nname = "web"\naddress = "{beta.ip}"\nports = [8001]\n'
    )
    beta.signal(signal.SIGHUP)
    wait_for(lambda: "reload rejected" in beta.log(), beta)
    refused = json.loads(http_get(beta.admin_url + "/config_dump")[1])["reload"]["refused"]
    # the enrolled host hears the CA's reason for the web certificate it asked for
    assert any("ca-state.json" in p and "restore it from backup" in p for p in refused["problems"]), refused
    assert "CA refused a certificate: cannot read" in hosts.alpha.log()
    assert "HBONE handler failed" not in hosts.alpha.log()
    # nothing else is lost: traffic from beta through alpha still flows, both are ready
    assert send_and_read((beta.ip, UPSTREAM_PORT), b"still here") == b"still here"
    assert http_get(hosts.alpha.readiness_url)[0] == 200 and http_get(beta.readiness_url)[0] == 200
