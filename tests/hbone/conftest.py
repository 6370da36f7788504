"""Fixtures for HBONE over real loopback TLS: the server's and the client's certificates from the
shared `ca` (tests/support/hbone_mesh.py has the server, pool and handlers they feed)."""

from __future__ import annotations

import pytest

from meshd.hbone.tls import StaticCertificates
from meshd.identity.ca import LocalCA
from tests.support.hbone_mesh import CLIENT_ID, SERVER_ID, certs_of


@pytest.fixture
def server_certs(ca: LocalCA) -> StaticCertificates:
    return certs_of(ca.issue(SERVER_ID))


@pytest.fixture
def client_certs(ca: LocalCA) -> StaticCertificates:
    return certs_of(ca.issue(CLIENT_ID))
