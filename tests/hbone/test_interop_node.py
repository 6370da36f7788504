"""Interop: Node.js's HTTP/2 stack (nghttp2) as an HBONE CONNECT client against HboneServer.

A second, independent HTTP/2 implementation catches what two copies of our own code would agree on
wrongly (settings, flow control, END_STREAM handling, GOAWAY on close).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import trio

from meshd.hbone.server import HboneServer, InboundRequest, ServerReply
from meshd.hbone.tls import StaticCertificates
from meshd.identity.ca import LocalCA, write_issued
from tests.support.hbone_mesh import CLIENT_ID, SERVER_ID, TD, echo
from tests.support.nodejs import SUPPORT, client_output, node_binary, script_command

SCRIPT = "node_hbone_client.js"


async def test_node_http2_client_tunnels_through_hbone_server(
    tmp_path: Path, ca: LocalCA, server_certs: StaticCertificates
) -> None:
    write_issued(ca.issue(CLIENT_ID), tmp_path / "client")
    seen: list[InboundRequest] = []

    async def handler(req: InboundRequest, reply: ServerReply) -> None:
        seen.append(req)
        if req.authority == "10.0.0.9:9":
            await reply.refuse(401, "denied by policy")
        else:
            await echo(req, reply)

    server = HboneServer(server_certs.server_provider(), TD, handler)
    with trio.fail_after(45):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(server.serve, "127.0.0.1", 0)
            d = tmp_path / "client"
            proc = await trio.run_process(
                script_command(
                    SCRIPT,
                    *("127.0.0.1", str(port)),
                    *(str(d / "cert.pem"), str(d / "key.pem"), str(d / "ca.crt")),
                    *("10.0.0.1:80", str(8 * 1024 * 1024 + 123), "10.0.0.2:81", "1000"),
                    *("not_an_ip:80", "0", "10.0.0.9:9", "6"),
                ),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            nursery.cancel_scope.cancel()
    out = client_output(proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    assert out["san"] == f"URI:{SERVER_ID.uri}"
    assert out["tls"]["version"] == "TLSv1.3" and out["tls"]["alpn"] == "h2"
    assert out["tls"]["cipher"] in {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"}
    results = {r["authority"]: r for r in out["results"]}
    big = results["10.0.0.1:80"]
    assert big["status"] == 200 and big["received"] == big["sent"] and big["echo_ok"], big
    small = results["10.0.0.2:81"]
    assert small["status"] == 200 and small["echo_ok"], small
    assert results["not_an_ip:80"]["status"] == 400  # answered by the core, never reaches the handler
    assert results["10.0.0.9:9"]["status"] == 401
    assert {r.authority for r in seen} == {"10.0.0.1:80", "10.0.0.2:81", "10.0.0.9:9"}
    assert all(r.peer_identity == CLIENT_ID for r in seen)
    assert all(r.header("forwarded") == 'for="192.0.2.7:40000"' for r in seen)


def test_node_script_is_valid_javascript() -> None:
    subprocess.run([node_binary(), "--check", str(SUPPORT / SCRIPT)], check=True)
