"""configs/homelab as shipped, on real daemons: the nas serves the CA, the vm's node and the apps
waypoint enroll with one-time tokens and run side by side on one host (one IP), each with its own
listeners and state folder."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

from meshd.identity.ca import LocalCA
from tests.support.paths import REPO
from tests.support.procs import Meshd, http_get, meshd_cli, unique_loopback, wait_for


def test_ca_host_and_a_node_and_waypoint_sharing_a_host_enroll_and_run(
    tmp_path: Path, ca: LocalCA, daemons: list[Meshd]
) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs", symlinks=True)
    homelab = tmp_path / "configs" / "homelab"
    ca_dir = tmp_path / "ca"
    nas_ip, vm_ip = unique_loopback(), unique_loopback()
    lan = ["discovery.mdns=false", f"discovery.peers={nas_ip}:15008"]
    nas = Meshd(
        homelab / "nas.toml",
        nas_ip,
        [
            f"identity.ca_dir={ca_dir}",
            f"ca.dir={ca_dir}",
            f"ca.listen={nas_ip}:15012",
            "discovery.mdns=false",
        ],
    )
    daemons.append(nas)
    nas.start().wait_ready()

    def enroll(node: str, workloads: str, state: Path) -> None:
        args = ["--workloads", workloads] if workloads else []
        token = meshd_cli(
            "ca", "token", "--dir", str(ca_dir), "--node", node, *args, "--address", f"{nas_ip}:15012"
        )
        assert token.returncode == 0, token.stderr
        out = meshd_cli("enroll", "--token", "-", "--state-dir", str(state), stdin=token.stdout)
        assert out.returncode == 0, out.stderr

    vm_state = tmp_path / "var-lib-meshd"
    enroll("vm", "apps/grafana", vm_state)
    enroll("apps-waypoint", "", vm_state / "waypoint")  # inside the node's, as the README has it

    # the waypoint's listeners are the node's + 100, as waypoint.toml says: run it with exactly those
    listen = tomllib.loads((homelab / "waypoint.toml").read_text())["listen"]
    assert {k: int(v.rsplit(":", 1)[1]) for k, v in listen.items()} == {
        "hbone": 15108, "admin": 15100, "metrics": 15120, "readiness": 15121,
    }  # fmt: skip
    vm = Meshd(homelab / "vm.toml", vm_ip, [f"identity.state_dir={vm_state}", *lan])
    waypoint = Meshd(
        homelab / "waypoint.toml",
        vm_ip,
        [f"identity.state_dir={vm_state / 'waypoint'}", *lan],
        port_offset=100,
        set_plaintext=False,  # its default, beside its hbone
    )
    daemons += [vm, waypoint]
    vm.start().wait_ready()
    waypoint.start().wait_ready()

    wp = json.loads(http_get(waypoint.admin_url + "/config_dump")[1])
    assert wp["role"] == "waypoint" and wp["node_name"] == "apps-waypoint"
    assert wp["config"]["listen"]["plaintext"] == f"{vm_ip}:15106"
    assert "spiffe://home.arpa/ns/meshd-system/sa/node-apps-waypoint" in wp["certificates"]
    node = json.loads(http_get(vm.admin_url + "/config_dump")[1])
    assert "spiffe://home.arpa/ns/apps/sa/grafana" in node["certificates"]  # by CSR from the nas
    # both use the homelab policy, found through the config folder's relative policy.d
    assert wp["config"]["policy"]["dir"] == node["config"]["policy"]["dir"] == str(homelab / "policy.d")
    wait_for(lambda: "CA enrolled node apps-waypoint" in nas.log(), nas)
    for d in (waypoint, vm, nas):
        assert d.stop() == 0
