"""Who a real node daemon lets in on 15008, and what it answers them.

One `meshd run` (beta) hosts an echo workload; the tests dial its HBONE port with meshd's own client
library (HbonePool) or raw sockets, presenting good and bad certificates. With TLS 1.3 a server
rejects a client certificate after the client's side of the handshake is done, so every refusal is
asserted at the first read (the pool reports it as "rejected our certificate"), and after each one
the daemon must still serve a good client.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import h2.config
import h2.connection
import h2.events
import pytest
import trio

from meshd.discovery.catalog import CATALOG_PATH
from meshd.hbone.errors import HboneConnectError, PeerIdentityError, TunnelRefused
from meshd.hbone.tls import ALPN, StaticCertificates, client_context
from meshd.identity.ca import IssuedCert, LocalCA
from meshd.identity.spiffe import SpiffeId
from tests.support.configs import ECHO_PORT
from tests.support.echo_node import CLIENT, ECHO, TD, EchoNode, assert_echoes, echo_node, echo_once
from tests.support.hbone_mesh import running_pool

TIMEOUT = 20


@pytest.fixture(scope="module")
def beta(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoNode]:
    tmp = tmp_path_factory.mktemp("security")
    # A root from yesterday, so it can also issue a certificate that has already expired.
    ca = LocalCA.init(tmp / "ca", TD, now=datetime.now(UTC) - timedelta(days=1))
    with echo_node(tmp, ca) as beta:
        yield beta


def certs(issued: IssuedCert, ca_pem: bytes | None = None) -> StaticCertificates:
    return StaticCertificates(issued.cert_pem, issued.key_pem, ca_pem or issued.ca_pem)


async def assert_refused(beta: EchoNode, ctx: ssl.SSLContext, why: str) -> None:
    """The daemon hangs up after the handshake (seen at the first read), logs why, and keeps serving."""
    mark = len(beta.daemon.log())
    with trio.fail_after(TIMEOUT):
        async with running_pool(lambda _src: ctx) as pool:
            with pytest.raises(HboneConnectError, match="rejected our certificate"):
                await pool.open_tunnel(CLIENT, ECHO, beta.hbone, f"{beta.ip}:{ECHO_PORT}")
        await wait_log(beta, mark, "refused HBONE connection")
        assert why in beta.log_since(mark), beta.log_since(mark)
        await assert_echoes(beta, b"still here")  # and it keeps serving


async def wait_log(beta: EchoNode, mark: int, text: str) -> None:
    """The daemon logs a refusal after the client has given up; poll its log (bounded by the caller)."""
    while text not in beta.log_since(mark):
        await trio.sleep(0.02)


# ---- refused at the TLS layer ----------------------------------------------------------------------


async def test_good_client_gets_200_and_the_echo(beta: EchoNode) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    with trio.fail_after(TIMEOUT):
        async with running_pool(certs(beta.ca.issue(CLIENT)).client_provider()) as pool:
            assert await echo_once(pool, beta, payload) == payload


async def test_certificate_from_another_ca_is_refused(beta: EchoNode) -> None:
    other = LocalCA.init(beta.tmp / "other-ca", TD)
    rogue = other.issue(CLIENT)  # the right name, the wrong issuer
    ctx = client_context(rogue.cert_pem, rogue.key_pem, beta.ca.cert_pem)
    await assert_refused(beta, ctx, "CERTIFICATE_VERIFY_FAILED")


async def test_client_from_another_trust_domain_is_refused(beta: EchoNode) -> None:
    evil_ca = LocalCA.init(beta.tmp / "evil-ca", "evil.example")
    evil = evil_ca.issue(SpiffeId("evil.example", "default", "client"))
    ctx = client_context(evil.cert_pem, evil.key_pem, beta.ca.cert_pem)
    await assert_refused(beta, ctx, "CERTIFICATE_VERIFY_FAILED")


async def test_foreign_trust_domain_signed_by_our_root_is_refused(beta: EchoNode) -> None:
    # A leaf that chains to beta's own root but names another trust domain: the chain verifies,
    # so only the server's trust-domain check stands between it and the workload.
    signer = LocalCA(beta.ca.cert, beta.ca._key, "evil.example")
    foreign = signer.issue(SpiffeId("evil.example", "default", "client"))
    ctx = client_context(foreign.cert_pem, foreign.key_pem, beta.ca.cert_pem)
    await assert_refused(beta, ctx, "outside trust domain 'home.arpa'")


async def test_expired_client_certificate_is_refused(beta: EchoNode) -> None:
    expired = beta.ca.issue(CLIENT, now=datetime.now(UTC) - timedelta(hours=3), ttl=timedelta(hours=1))
    assert expired.not_after < datetime.now(UTC)
    ctx = client_context(expired.cert_pem, expired.key_pem, beta.ca.cert_pem)
    await assert_refused(beta, ctx, "CERTIFICATE_VERIFY_FAILED")


async def test_not_yet_valid_client_certificate_is_refused(beta: EchoNode) -> None:
    future = beta.ca.issue(CLIENT, now=datetime.now(UTC) + timedelta(hours=2), ttl=timedelta(hours=1))
    assert future.not_before > datetime.now(UTC)
    ctx = client_context(future.cert_pem, future.key_pem, beta.ca.cert_pem)
    await assert_refused(beta, ctx, "CERTIFICATE_VERIFY_FAILED")


async def test_client_without_certificate_is_refused(beta: EchoNode) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN])
    ctx.load_verify_locations(cadata=beta.ca.cert_pem.decode())
    await assert_refused(beta, ctx, "PEER_DID_NOT_RETURN_A_CERTIFICATE")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"hello, plaintext\n" * 4, id="plaintext"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n", id="http1"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="h2c-preface"),
    ],
)
def test_non_tls_bytes_on_15008_are_refused(beta: EchoNode, payload: bytes) -> None:
    mark = len(beta.daemon.log())
    with socket.create_connection(beta.hbone, timeout=TIMEOUT) as s:
        s.sendall(payload)
        answer = bytearray()
        try:
            while chunk := s.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass
    # At most a TLS alert record (content type 21), never an HTTP answer, never the echo.
    assert not answer or answer[0] == 21, bytes(answer)
    assert b"HTTP" not in answer and b"hello" not in answer
    deadline = time.monotonic() + TIMEOUT
    while "refused HBONE connection" not in beta.log_since(mark):
        assert time.monotonic() < deadline, beta.log_since(mark)
        time.sleep(0.02)
    trio.run(assert_echoes, beta, b"still here")


# ---- the client side checks the server ------------------------------------------------------------


async def test_client_refuses_a_server_with_the_wrong_identity(beta: EchoNode) -> None:
    someone_else = SpiffeId(TD, "default", "someone-else")
    with trio.fail_after(TIMEOUT):
        async with running_pool(certs(beta.ca.issue(CLIENT)).client_provider()) as pool:
            with pytest.raises(PeerIdentityError, match=f"presented {ECHO.uri}, expected {someone_else.uri}"):
                await pool.open_tunnel(CLIENT, someone_else, beta.hbone, f"{beta.ip}:{ECHO_PORT}")
            assert pool.statistics().connections == 0  # nothing pooled for that key


# ---- answers to authenticated clients -------------------------------------------------------------


async def test_connect_to_a_port_without_workload_is_503_and_counted(beta: EchoNode) -> None:
    before = beta.daemon.metric("meshd_tcp_connections_failed_total", reporter="destination", reason="NR")
    with trio.fail_after(TIMEOUT):
        async with running_pool(certs(beta.ca.issue(CLIENT)).client_provider()) as pool:
            with pytest.raises(TunnelRefused) as refused:
                await pool.open_tunnel(CLIENT, ECHO, beta.hbone, f"{beta.ip}:{ECHO_PORT + 1}")
            assert refused.value.status == 503
            assert f"no workload on this node listens on {beta.ip}:{ECHO_PORT + 1}" in refused.value.reason
            with pytest.raises(TunnelRefused) as elsewhere:  # an address that is not on this node at all
                await pool.open_tunnel(CLIENT, ECHO, beta.hbone, f"192.0.2.1:{ECHO_PORT}")
            assert elsewhere.value.status == 503
            # The refusals cost a stream each, not the connection: it still carries tunnels.
            assert await echo_once(pool, beta, b"after 503") == b"after 503"
            assert pool.statistics().connects == 1
    after = beta.daemon.metric("meshd_tcp_connections_failed_total", reporter="destination", reason="NR")
    assert after == before + 2


def raw_h2(beta: EchoNode, issued: IssuedCert, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """One request over a fresh mTLS connection, spoken with plain h2 (not meshd's client, which
    refuses to send a malformed authority): (status, body)."""
    ctx = client_context(issued.cert_pem, issued.key_pem, beta.ca.cert_pem)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    with (
        socket.create_connection(beta.hbone, timeout=TIMEOUT) as tcp,
        ctx.wrap_socket(tcp, server_hostname=None) as tls,
    ):
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers, end_stream=False)
        tls.sendall(conn.data_to_send())
        status, body = 0, bytearray()
        while True:
            data = tls.recv(65536)
            assert data, f"connection closed before the stream ended (status {status})"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif (
                    isinstance(event, h2.events.StreamEnded | h2.events.StreamReset)
                    and event.stream_id == sid
                ):
                    return status, bytes(body)
            tls.sendall(conn.data_to_send())


@pytest.mark.parametrize("authority", ["echo.default:7000", "not an authority", "10.0.0.1", "10.0.0.1:99999"])
def test_malformed_authority_is_400(beta: EchoNode, authority: str) -> None:
    status, body = raw_h2(beta, beta.ca.issue(CLIENT), [(":method", "CONNECT"), (":authority", authority)])
    assert status == 400, body
    assert b"not ip:port" in body


def test_not_connect_nor_catalog_is_400(beta: EchoNode) -> None:
    request = [(":method", "GET"), (":scheme", "https"), (":authority", beta.ip), (":path", "/")]
    status, body = raw_h2(beta, beta.ca.issue(CLIENT), request)
    assert status == 400, body


async def test_catalog_is_served_to_node_identities_only(beta: EchoNode) -> None:
    node = SpiffeId.node(TD, "gamma")
    with trio.fail_after(TIMEOUT):
        async with running_pool(certs(beta.ca.issue(CLIENT)).client_provider()) as pool:
            status, _, body = await pool.get(CLIENT, ECHO, beta.hbone, CATALOG_PATH)
            assert status == 403, body
            assert b"node identities only" in body
        async with running_pool(certs(beta.ca.issue(node)).client_provider()) as pool:
            status, headers, body = await pool.get(node, ECHO, beta.hbone, CATALOG_PATH)
    assert status == 200, body
    assert ("content-type", "application/json") in headers
    catalog = json.loads(body)
    assert catalog["node"] == "beta" and catalog["trust_domain"] == TD
    assert [(w["name"], w["address"], w["ports"]) for w in catalog["workloads"]] == [
        ("echo", beta.ip, [ECHO_PORT])
    ]
