"""A CA host and enrolled hosts as real daemons: alpha serves the CA (and an echo workload); others
enroll with one-time tokens (`meshd enroll`) and get their certificates by CSR over HBONE."""

from __future__ import annotations

from pathlib import Path

from meshd.identity.ca import LocalCA
from tests.support.configs import ECHO_PORT, echo_workload
from tests.support.mesh import knows
from tests.support.procs import Meshd, meshd_cli, unique_loopback, wait_for

UPSTREAM_PORT = 17000


class Hosts:
    def __init__(self, tmp: Path, ca: LocalCA, daemons: list[Meshd]) -> None:
        self.tmp = tmp
        self.ca_dir = tmp / "ca"
        self.daemons = daemons
        self.a_ip = unique_loopback()
        cfg = tmp / "alpha.toml"
        cfg.write_text(
            f'trust_domain = "home.arpa"\nnode_name = "alpha"\n[identity]\nca_dir = "{self.ca_dir}"\n'
            f'bundle_refresh = "500ms"\n[discovery]\nmdns = false\nrefresh = "1s"\n'
            f'[ca]\nserve = true\ndir = "{self.ca_dir}"\n' + echo_workload(self.a_ip)
        )
        self.alpha = Meshd(cfg, self.a_ip, overrides=[f"ca.listen={self.a_ip}:15012"])
        daemons.append(self.alpha)

    def token(self, node: str, workloads: str) -> str:
        out = meshd_cli(
            "ca", "token", "--dir", str(self.ca_dir), "--node", node, "--workloads", workloads,
            "--ttl", "10m", "--address", f"{self.a_ip}:15012",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def enrolled_node(self, name: str, workload: str, token: str) -> Meshd:
        state = self.tmp / f"{name}-state"
        token_file = self.tmp / f"{name}.token"
        token_file.write_text(token + "\n")
        # the token from a file (not argv), the state folder relative: printed absolute, for the config
        out = meshd_cli("enroll", "--token-file", token_file.name, "--state-dir", state.name, cwd=self.tmp)
        assert out.returncode == 0, out.stderr
        assert f"{state}/cert.pem, {state}/key.pem (0600), {state}/ca.crt" in out.stdout, out.stdout
        assert f'[identity] state_dir = "{state}"' in out.stdout, out.stdout
        assert token not in " ".join(out.args)
        assert (state / "key.pem").stat().st_mode & 0o777 == 0o600
        ip = unique_loopback()
        cfg = self.tmp / f"{name}.toml"
        cfg.write_text(
            f'trust_domain = "home.arpa"\nnode_name = "{name}"\n[identity]\nstate_dir = "{state}"\n'
            f'bundle_refresh = "500ms"\n[discovery]\nmdns = false\npeers = ["{self.a_ip}:15008"]\nrefresh = "1s"\n'
            f'[[workload]]\nname = "{workload}"\naddress = "{ip}"\nports = [8000]\n'
            f'[[upstream]]\nservice = "echo.default"\nport = {ECHO_PORT}\nlisten = "{ip}:{UPSTREAM_PORT}"\n'
        )
        node = Meshd(cfg, ip)
        self.daemons.append(node)
        node.start().wait_ready()
        wait_for(lambda: knows(node, services=["echo.default"]), node)
        return node
