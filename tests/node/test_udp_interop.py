"""Interop: Node.js's HTTP/2 stack (nghttp2) opens connect-udp streams (RFC 9298, extended CONNECT per
RFC 8441) to a real meshd daemon's HBONE port, with capsules (RFC 9297) built by its own code.

A second, independent implementation catches what meshd's client and server would agree on wrongly:
the SETTINGS_ENABLE_CONNECT_PROTOCOL handshake, the pseudo-headers, the template path, varints.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd.identity.ca import LocalCA, write_issued
from meshd.identity.spiffe import SpiffeId
from tests.support.configs import node_config
from tests.support.nodejs import node_binary, run_client
from tests.support.procs import Meshd, running
from tests.support.udp import udp_echo_server

ECHO_PORT = 7007

pytestmark = pytest.mark.slow


def test_node_http2_client_speaks_connect_udp_to_meshd(tmp_path: Path, ca: LocalCA, loopback: str) -> None:
    node_binary()
    client = tmp_path / "client"
    write_issued(ca.issue(SpiffeId("home.arpa", "default", "node-client")), client)
    policy = tmp_path / "policy"
    cfg = node_config(
        tmp_path / "beta.toml",
        "beta",
        tmp_path / "ca",
        policy_dir=policy,
        body=(
            f'[[workload]]\nname = "uecho"\naddress = "{loopback}"\nports = [{ECHO_PORT}, 7008]\n'
            'services = ["uecho"]\n'
            f'[[service]]\nname = "uecho"\nports = [{{ port = {ECHO_PORT}, protocol = "udp" }}]\n'
        ),
    )
    (policy / "deny.toml").write_text(
        '[[authorization]]\nname = "no-7008"\naction = "DENY"\n[[authorization.rules]]\nto = [{ ports = [7008] }]\n'
    )
    with udp_echo_server(loopback, ECHO_PORT), running(Meshd(cfg, loopback)) as beta:
        out = run_client(
            "node_connect_udp_client.js",
            *(loopback, str(beta.port(15008))),
            *(str(client / "cert.pem"), str(client / "key.pem"), str(client / "ca.crt")),
            *(loopback, str(ECHO_PORT), "300"),  # echoed
            *(loopback, "7008", "1"),  # denied by policy: 401
            *("127.0.0.1", "9", "1"),  # no workload there: 503
            timeout=60,
        )
        assert out["enableConnectProtocol"] is True
        echo, denied, nowhere = out["results"]
        assert echo["status"] == 200 and echo["capsule_protocol"] == "?1", echo
        assert echo["echoed"] == 300 and echo["mismatched"] == 0, echo
        assert denied["status"] == 401 and "no-7008" in denied["body"], denied
        assert nowhere["status"] == 503, nowhere
        assert beta.metric("meshd_udp_flows_opened_total", reporter="destination") == 1
        assert beta.metric("meshd_udp_flows_failed_total", reason="UAEX") == 1
