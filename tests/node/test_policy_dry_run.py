"""A dry-run DENY policy through real daemons: the connection passes, and the destination node counts
(meshd_policy_dry_run_total) and logs (access log `dry_run`, a policy log line) what it would have
done; its admin explain shows the policy apart from the enforced ones."""

from __future__ import annotations

import json
import signal
import urllib.parse
from pathlib import Path

from meshd.tools.echo import echo_server
from tests.support.configs import ECHO_PORT
from tests.support.mesh import Mesh, Upstream, client_host, echo_host
from tests.support.procs import http_get, unique_loopback, wait_for
from tests.support.sockets import send_and_read

CLIENT = "home.arpa/ns/default/sa/client"
TRIAL = (
    '[[authorization]]\nname = "trial-deny"\nnamespace = "default"\naction = "DENY"\ndry_run = true\n'
    f'[[authorization.rules]]\nfrom = [{{ principals = ["{CLIENT}"] }}]\n'
)


def test_dry_run_deny_counts_and_logs_but_traffic_passes(tmp_path: Path) -> None:
    a_ip, b_ip = unique_loopback(), unique_loopback()
    upstream = (a_ip, 18000)
    nodes = Mesh(
        tmp_path,
        [
            client_host("alpha", a_ip, Upstream("echo.default", ECHO_PORT, f"{a_ip}:{upstream[1]}")),
            echo_host("beta", b_ip, ECHO_PORT, policy={"trial.toml": TRIAL}),
        ],
    )
    beta_policy = nodes.policy_dir("beta")
    with echo_server(b_ip, ECHO_PORT), nodes.running():
        alpha, beta = nodes["alpha"], nodes["beta"]
        # The connection goes through (the catalog may take a moment to reach alpha).
        wait_for(lambda: send_and_read(upstream, b"hello") == b"hello", alpha)
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
        wait_for(lambda: send_and_read(upstream, b"x") == b"", beta)
        assert beta.metric("meshd_tcp_connections_failed_total", reason="UAEX") >= 1
