"""Connections the HBONE server must refuse, and must survive: it keeps serving good clients after each."""

from __future__ import annotations

import re
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from meshd.hbone.errors import HboneConnectError, PeerIdentityError
from meshd.hbone.pool import HbonePool
from meshd.hbone.tls import ALPN, StaticCertificates, client_context, server_context
from meshd.identity.ca import LocalCA
from meshd.identity.spiffe import SpiffeId
from tests.support.hbone_mesh import CLIENT_ID, SERVER_ID, TD, Mesh, certs_of, echo, running_mesh


async def still_serves(mesh: Mesh) -> None:
    t = await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:80")
    await t.send_all(b"ok?")
    assert await t.receive_some() == b"ok?"
    await t.aclose()


async def refused_by_server(mesh: Mesh, bad_client: HbonePool, match: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(bad_client.run)
        with pytest.raises(HboneConnectError, match=match):
            await bad_client.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:80")
        nursery.cancel_scope.cancel()
    while mesh.server.statistics().refused_connections == 0:
        await trio.sleep(0.01)  # the server logs the refusal after the client gave up; bounded
    assert mesh.server.statistics().connections == 0
    await still_serves(mesh)


def no_cert_context(ca_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN])
    ctx.load_verify_locations(cadata=ca_pem.decode())
    return ctx


async def test_client_without_certificate(
    ca: LocalCA, server_certs: StaticCertificates, client_certs: StaticCertificates
) -> None:
    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, echo) as mesh:
            ctx = no_cert_context(ca.cert_pem)
            # TLS 1.3: the client's handshake completes; the refusal shows at its first read.
            await refused_by_server(mesh, HbonePool(lambda _src: ctx), "rejected our certificate")


async def test_client_certificate_from_another_ca(
    tmp_path: Path, ca: LocalCA, server_certs: StaticCertificates, client_certs: StaticCertificates
) -> None:
    other = LocalCA.init(tmp_path / "other-ca", TD)
    rogue = other.issue(CLIENT_ID)  # the right name, the wrong issuer
    ctx = client_context(rogue.cert_pem, rogue.key_pem, ca.cert_pem)
    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, echo) as mesh:
            await refused_by_server(mesh, HbonePool(lambda _src: ctx), "rejected our certificate")


async def test_client_from_another_trust_domain(
    tmp_path: Path, ca: LocalCA, client_certs: StaticCertificates
) -> None:
    foreign_ca = LocalCA.init(tmp_path / "foreign-ca", "other.test")
    foreign = foreign_ca.issue(SpiffeId("other.test", "default", "client"))
    # The server trusts both roots (say, during a federation experiment) but admits only its own domain.
    issued = ca.issue(SERVER_ID)
    both_roots = ca.cert_pem + foreign_ca.cert_pem
    server_certs = StaticCertificates(issued.cert_pem, issued.key_pem, both_roots)
    ctx = client_context(foreign.cert_pem, foreign.key_pem, ca.cert_pem)
    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, echo) as mesh:
            await refused_by_server(mesh, HbonePool(lambda _src: ctx), "rejected our certificate")


async def test_expired_client_certificate(tmp_path: Path) -> None:
    past = datetime.now(UTC) - timedelta(hours=3)
    old_ca = LocalCA.init(tmp_path / "old-ca", TD, now=past)  # a root that existed back then
    expired = old_ca.issue(CLIENT_ID, ttl=timedelta(minutes=5), now=past)
    assert expired.not_after < datetime.now(UTC)
    ctx = client_context(expired.cert_pem, expired.key_pem, expired.ca_pem)
    server_certs, client_certs = certs_of(old_ca.issue(SERVER_ID)), certs_of(old_ca.issue(CLIENT_ID))
    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, echo) as mesh:
            await refused_by_server(mesh, HbonePool(lambda _src: ctx), "rejected our certificate")


async def test_server_with_unexpected_identity(
    server_certs: StaticCertificates, client_certs: StaticCertificates
) -> None:
    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, echo) as mesh:
            impostor_check = SpiffeId(TD, "default", "the-real-backend")
            with pytest.raises(
                PeerIdentityError,
                match=re.escape("expected spiffe://home.arpa/ns/default/sa/the-real-backend"),
            ):
                await mesh.pool.open_tunnel(CLIENT_ID, impostor_check, mesh.address, "10.0.0.1:80")
            assert mesh.pool.statistics().connections == 0
            await still_serves(mesh)


async def test_server_certificate_from_another_ca_is_refused_by_the_client(
    tmp_path: Path, ca: LocalCA, client_certs: StaticCertificates
) -> None:
    other = LocalCA.init(tmp_path / "other-ca", TD)
    rogue_server = certs_of(other.issue(SERVER_ID))
    with trio.fail_after(30):
        async with running_mesh(rogue_server, client_certs, echo) as mesh:
            with pytest.raises(
                HboneConnectError, match=r"TLS handshake .* failed: CERTIFICATE_VERIFY_FAILED"
            ):
                await mesh.pool.open_tunnel(CLIENT_ID, SERVER_ID, mesh.address, "10.0.0.1:80")


@pytest.mark.parametrize(
    "garbage",
    [
        b"hello, plaintext\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # h2c prior knowledge, without TLS
        b"",
    ],
)
async def test_plaintext_and_http1_on_the_hbone_port(
    server_certs: StaticCertificates, client_certs: StaticCertificates, garbage: bytes
) -> None:
    with trio.fail_after(30):
        async with running_mesh(server_certs, client_certs, echo) as mesh:
            raw = await trio.open_tcp_stream(*mesh.address)
            if garbage:
                await raw.send_all(garbage)
            else:
                await raw.send_eof()
            # The server hangs up (maybe after a TLS alert); it never answers in plaintext.
            answer = b""
            try:
                while chunk := await raw.receive_some(4096):
                    answer += chunk
            except trio.BrokenResourceError:
                pass
            assert b"HTTP/" not in answer
            await raw.aclose()
            while mesh.server.statistics().refused_connections == 0:
                await trio.sleep(0.01)
            await still_serves(mesh)


async def test_stalled_handshake_times_out(
    server_certs: StaticCertificates, client_certs: StaticCertificates
) -> None:
    from meshd.hbone.server import HboneServer

    server = HboneServer(server_certs.server_provider(), TD, echo, handshake_timeout=0.2)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, "127.0.0.1", 0)
            raw = await trio.open_tcp_stream(*address)
            assert await raw.receive_some(10) == b""  # silent client: hung up after the timeout
            assert server.statistics().refused_connections == 1
            await raw.aclose()
            nursery.cancel_scope.cancel()


async def test_connection_refused_names_the_likely_cause(client_certs: StaticCertificates) -> None:
    pool = HbonePool(client_certs.client_provider(), connect_timeout=5)
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            with pytest.raises(
                HboneConnectError, match=rf"connection refused: is meshd running on 127.0.0.1:{port}\?"
            ):
                await pool.open_tunnel(CLIENT_ID, SERVER_ID, ("127.0.0.1", port), "10.0.0.1:80")
            nursery.cancel_scope.cancel()


def test_contexts_are_tls13_h2_mutual(server_certs: StaticCertificates) -> None:
    c = server_certs
    for ctx in (
        server_context(c.cert_pem, c.key_pem, c.ca_pem),
        client_context(c.cert_pem, c.key_pem, c.ca_pem),
    ):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert client_context(c.cert_pem, c.key_pem, c.ca_pem).check_hostname is False
