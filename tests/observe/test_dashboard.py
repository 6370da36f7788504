"""The dashboard as a person sees it: three daemons, HTTP and TCP traffic through a waypoint, a refused
reload, the page opened in Debian's headless Chromium; and the admin server surviving HEAD, malformed
requests and clients that leave mid-response."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import socket
import struct
from pathlib import Path

import pytest
import trio

from meshd.hbone.pool import HbonePool
from meshd.hbone.tls import CONTROL_SNI, StaticCertificates
from meshd.identity.ca import LocalCA
from meshd.identity.spiffe import SpiffeId
from meshd.observe.graph import REPORT_PATH
from tests.support.chromium import dump_dom, screenshot
from tests.support.configs import node_config
from tests.support.paths import REPO
from tests.support.procs import Meshd, http_get, running, unique_loopback, wait_for
from tests.support.telemetry_mesh import ROUTES, TelemetryMesh, three_daemons


def raw(address: tuple[str, int], data: bytes, read: int | None = None) -> bytes:
    """Send `data`; read to the end (or `read` bytes, then reset the connection)."""
    with socket.create_connection(address, timeout=5) as s:
        s.sendall(data)
        out = bytearray()
        while read is None or len(out) < read:
            chunk = s.recv(65536 if read is None else min(65536, read - len(out)))
            if not chunk:
                break
            out += chunk
        if read is not None:  # RST instead of FIN: the server's next write fails
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return bytes(out)


def test_admin_server_keeps_serving_after_head_malformed_requests_and_clients_that_leave(
    tmp_path: Path,
) -> None:
    ip = unique_loopback()
    LocalCA.init(tmp_path / "ca", "home.arpa")
    node = Meshd(node_config(tmp_path / "n.toml", "solo", tmp_path / "ca"), ip)
    admin = (ip, 15000)
    with running(node):
        head = raw(admin, b"HEAD / HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n"), head  # headers, no body
        assert b"content-length: " in head.lower()
        head = raw(admin, b"HEAD /api/mesh HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n"), head
        for garbage in (
            b"GARBAGE\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
            b"\x16\x03\x01\x00\xa5\x01",
        ):
            answer = raw(admin, garbage)
            assert answer.startswith(b"HTTP/1.1 400 ") or answer == b"", answer[:200]
        assert raw(admin, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 Bad Request\r\n")
        for _ in range(20):  # the 440 KB script, abandoned after its first bytes
            got = raw(admin, b"GET /vendor/cytoscape.min.js HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n", read=2000)
            assert got.startswith(b"HTTP/1.1 200 ")
        raw(admin, b"GET /api/no", read=0)  # half a request, then gone
        status, body = http_get(node.admin_url + "/api/node")
        assert status == 200 and json.loads(body)["node"] == "solo"
        assert http_get(node.readiness_url)[0] == 200
        assert "Traceback" not in node.log(), node.log()[-3000:]


def traffic(mesh: TelemetryMesh) -> None:
    for _ in range(30):
        assert mesh.get("/ok")[0] == 200
    for _ in range(5):
        assert mesh.get("/fail")[0] == 503
    for _ in range(3):
        assert mesh.echo(b"t" * 10_000) == b"t" * 10_000


def refuse_a_reload(mesh: TelemetryMesh) -> Path:
    broken = mesh.tmp / "beta-policy" / "50-broken.toml"
    broken.write_text('[[authorization]]\nname = "typo"\naction = "ALOW"\n')
    mesh.beta.signal(signal.SIGHUP)
    wait_for(
        lambda: json.loads(http_get(mesh.beta.admin_url + "/config_dump")[1])["reload"]["refused"], mesh.beta
    )
    return broken


@pytest.mark.slow
def test_dashboard_shows_the_mesh_traffic_and_a_refused_reload_in_chromium(tmp_path: Path) -> None:
    with three_daemons(tmp_path, routes=ROUTES) as mesh:
        traffic(mesh)
        broken = refuse_a_reload(mesh)

        # The JSON the page reads: every node's report, gathered by alpha over mTLS.
        mesh_json = json.loads(http_get(mesh.alpha.admin_url + "/api/mesh", timeout=10)[1])
        assert mesh_json["errors"] == {}
        assert [r["node"] for r in mesh_json["reports"]] == ["alpha", "beta", "wp"]
        edges = {e["id"]: e for e in mesh_json["graph"]["edges"]}
        http_edge = edges["wl:client.default->svc:reviews.default:http"]
        assert http_edge["rps"] > 0 and http_edge["requests_total"] == 35
        assert http_edge["error_rate"] == pytest.approx(5 / 35, abs=0.001)
        assert http_edge["security"] == "mutual_tls" and http_edge["p99_ms"] is not None
        tcp_edge = edges["wl:client.default->svc:echo.default:tcp"]
        assert tcp_edge["connections_total"] == 3 and tcp_edge["bytes_total"] == 60_000
        assert edges["bind:reviews.default"]["target"] == "node:wp"
        beta = next(r for r in mesh_json["reports"] if r["node"] == "beta")
        assert beta["reload"]["refused"]["problems"][0].startswith(f"{broken}:3: ")
        assert "50-broken.toml" in beta["policy"]["files"]
        wp = next(r for r in mesh_json["reports"] if r["node"] == "wp")
        assert {r["name"] for r in wp["routes"]} == {"fail", "default"}

        # The policy panel asks the node that serves the destination, over HBONE.
        q = "from=spiffe://home.arpa/ns/default/sa/client&to=echo.default:7000"
        status, body = http_get(f"{mesh.alpha.admin_url}/api/explain?node=beta&{q}", timeout=10)
        answer = json.loads(body)
        assert status == 200 and answer["node"] == "beta", answer
        assert (
            answer["results"][0]["workload"] == "echo.default"
            and "ALLOW" in answer["results"][0]["text"].upper()
        )
        status, body = http_get(f"{mesh.alpha.admin_url}/api/explain?node=nosuch&{q}")
        assert status == 404 and "nosuch" in json.loads(body)["error"]

        # The page, as Chromium renders it once its scripts fetched /api/mesh.
        url = mesh.alpha.admin_url + "/"
        dom = dump_dom(url, budget_ms=8000)
        assert 'data-loaded="true"' in dom, dom[-2000:]
        for service in ("reviews.default", "echo.default"):
            assert f'id="svc-{service}"' in dom
        rows = re.findall(
            r'<tr class="edge" data-from="wl:client.default" data-to="svc:reviews.default"[^>]*>', dom
        )
        assert len(rows) == 1 and float(re.search(r'data-rps="([0-9.]+)"', rows[0])[1]) > 0, rows
        refused = re.search(r'<div class="refused" data-node="beta">(.*?)</div>', dom, re.S)
        assert refused and f"{broken}:3: " in refused[1], dom[-3000:]
        assert (
            re.search(r'data-elements="(\d+)"', dom)
            and int(re.search(r'data-elements="(\d+)"', dom)[1]) >= 10
        )
        shot = screenshot(url, REPO / "build" / "dashboard.png", size="1400,1100", budget_ms=8000)
        assert shot.stat().st_size > 20_000  # a drawn page, not a blank one
        shutil.copy(shot, tmp_path / "dashboard.png")

        # A peer that stops answering is named; the others still show.
        assert mesh.wp.stop() == 0

        def wp_missing() -> bool:
            m = json.loads(http_get(mesh.alpha.admin_url + "/api/mesh", timeout=10)[1])
            return "wp" in m["errors"] and [r["node"] for r in m["reports"]] == ["alpha", "beta"]

        wait_for(wp_missing, mesh.alpha)
        assert http_get(mesh.alpha.admin_url + "/")[0] == 200


async def test_node_reports_are_served_to_node_identities_only(tmp_path: Path) -> None:
    ip = unique_loopback()
    ca = LocalCA.init(tmp_path / "ca", "home.arpa")
    node = Meshd(node_config(tmp_path / "n.toml", "solo", tmp_path / "ca"), ip)
    with running(node):
        for identity, expected in (
            (SpiffeId("home.arpa", "default", "client"), 403),
            (SpiffeId.node("home.arpa", "other"), 200),
        ):
            issued = ca.issue(identity)
            certs = StaticCertificates(issued.cert_pem, issued.key_pem, issued.ca_pem)
            pool = HbonePool(certs.client_provider(), connect_timeout=10, ping_interval=None)
            async with trio.open_nursery() as nursery:
                await nursery.start(pool.run)
                with trio.fail_after(20):
                    status, _, body, peer = await pool.get_control(
                        identity, (ip, 15008), REPORT_PATH, server_hostname=CONTROL_SNI
                    )
                nursery.cancel_scope.cancel()
            assert status == expected, body
            assert peer == SpiffeId.node("home.arpa", "solo")
            if expected == 200:
                report = json.loads(body)
                assert report["node"] == "solo" and report["role"] == "node" and "edges" in report


def test_vendored_cytoscape_is_the_pinned_file_with_its_licence() -> None:
    vendor = REPO / "meshd" / "observe" / "web" / "vendor"
    [line] = [ln for ln in (vendor / "VERSIONS").read_text().splitlines() if ln and not ln.startswith("#")]
    name, version, licence, _, digest = line.split()
    assert (name, licence) == ("cytoscape", "MIT") and re.fullmatch(r"\d+\.\d+\.\d+", version)
    data = (vendor / "cytoscape.min.js").read_bytes()
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert "Permission is hereby granted" in (vendor / "cytoscape.LICENSE").read_text()


def test_admin_refuses_dns_rebinding_and_cross_site_posts(tmp_path: Path) -> None:
    ip = unique_loopback()
    LocalCA.init(tmp_path / "ca", "home.arpa")
    node = Meshd(node_config(tmp_path / "n.toml", "solo", tmp_path / "ca"), ip)
    admin = (ip, 15000)
    with running(node):
        for host, ok in (
            (f"{ip}:15000", True),
            ("localhost:15000", True),
            ("[::1]:15000", True),
            ("evil.example:15000", False),
        ):
            ua = "user-agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120\r\n"  # a browser, steered by a page
            request = f"GET /api/node HTTP/1.1\r\nhost: {host}\r\n{ua}connection: close\r\n\r\n"
            answer = raw(admin, request.encode())
            assert answer.startswith(b"HTTP/1.1 200 " if ok else b"HTTP/1.1 403 "), (host, answer[:200])
        # curl, the CLI, scripts (no browser headers): any Host
        curl = b"GET /api/node HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        assert raw(admin, curl).startswith(b"HTTP/1.1 200 ")
        post = "POST /quitquitquit HTTP/1.1\r\nhost: {h}\r\norigin: {o}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        answer = raw(admin, post.format(h=f"{ip}:15000", o="http://evil.example").encode())
        assert answer.startswith(b"HTTP/1.1 403 "), answer[:200]
        assert http_get(node.readiness_url)[0] == 200  # still running
        answer = raw(admin, post.format(h=f"{ip}:15000", o=f"http://{ip}:15000").encode())
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]  # the page's own origin may
        assert node.proc is not None and node.proc.wait(15) == 0
