"""A dry-run DENY policy through real daemons: the connection passes, and the destination node counts
(meshd_policy_dry_run_total) and logs (access log `dry_run`, a policy log line) what it would have
done; its admin explain shows the policy apart from the enforced ones."""

from __future__ import annotations

import json
import signal
import socket
import urllib.parse
from pathlib import Path

from meshd.identity.ca import LocalCA
from meshd.tools.echo import echo_server
from tests.support.configs import ECHO_PORT, echo_workload, node_config
from tests.support.procs import Meshd, http_get, unique_loopback, wait_for

CLIENT = "home.arpa/ns/default/sa/client"
TRIAL = (
    '[[authorization]]\nname = "trial-deny"\nnamespace = "default"\naction = "DENY"\ndry_run = true\n'
    f'[[authorization.rules]]\nfrom = [{{ principals = ["{CLIENT}"] }}]\n'
)


def round_trip(address: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = bytearray()
        try:
            while chunk := s.recv(1 << 16):
                out += chunk
        except ConnectionResetError:
            return b""
        return bytes(out)


def test_dry_run_deny_counts_and_logs_but_traffic_passes(
    tmp_path: Path, ca: LocalCA, daemons: list[Meshd]
) -> None:
    a_ip, b_ip = unique_loopback(), unique_loopback()
    upstream = (a_ip, 18000)
    alpha_cfg = node_config(
        tmp_path / "alpha.toml",
        "alpha",
        tmp_path / "ca",
        peers=[f"{b_ip}:15008"],
        body=f'[[workload]]\nname = "client"\naddress = "{a_ip}"\nports = [8000]\n'
        f'[[upstream]]\nservice = "echo.default"\nport = {ECHO_PORT}\nlisten = "{a_ip}:{upstream[1]}"\n',
    )
    beta_policy = tmp_path / "beta-policy"
    beta_cfg = node_config(
        tmp_path / "beta.toml",
        "beta",
        tmp_path / "ca",
        peers=[f"{a_ip}:15008"],
        policy_dir=beta_policy,
        body=echo_workload(b_ip),
    )
    (beta_policy / "trial.toml").write_text(TRIAL)
    with echo_server(b_ip, ECHO_PORT):
        beta, alpha = Meshd(beta_cfg, b_ip), Meshd(alpha_cfg, a_ip)
        daemons += [beta, alpha]
        beta.start()
        alpha.start()
        beta.wait_ready()
        alpha.wait_ready()
        # The connection goes through (the catalog may take a moment to reach alpha).
        wait_for(lambda: round_trip(upstream, b"hello") == b"hello", alpha)
        wait_for(
            lambda: beta.metric("meshd_policy_dry_run_total", policy="trial-deny", result="deny") >= 1, beta
        )
        assert beta.metric("meshd_tcp_connections_failed_total", reason="UAEX") == 0
        log = beta.log()
        assert "dry_run=trial-deny=deny" in log  # the access-log field
        assert (
            "dry-run policy trial-deny would deny what was allowed: denied by policy trial-deny (rule 1)"
            in log
        )

        # The running daemon's explain keeps it apart from what is enforced.
        query = urllib.parse.urlencode({"from": CLIENT, "to": f"echo.default:{ECHO_PORT}"})
        status, body = http_get(f"{beta.admin_url}/policy/explain?{query}")
        assert status == 200, body
        (result,) = json.loads(body)["results"]
        assert result["allowed"] is True and result["reason"] == "no ALLOW policy applies"
        assert result["dry_run"] == [
            {
                "policy": "trial-deny",
                "action": "DENY",
                "result": "deny",
                "reason": "denied by policy trial-deny (rule 1)",
            }
        ]
        assert "dry run (evaluated, not enforced):\n~ DENY  trial-deny" in result["text"]

        # Enforced (dry_run removed, SIGHUP): the same client is refused.
        (beta_policy / "trial.toml").write_text(TRIAL.replace("dry_run = true\n", ""))
        beta.signal(signal.SIGHUP)
        wait_for(lambda: round_trip(upstream, b"x") == b"", beta)
        assert beta.metric("meshd_tcp_connections_failed_total", reason="UAEX") >= 1
