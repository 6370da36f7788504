"""`[discovery.etcd]`: what the config accepts, and the FILE:LINE problems it reports."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from tests.support.configs import load_text, problems_in

BASE = 'trust_domain = "home.arpa"\nnode_name = "alpha"\n[identity]\nca_dir = "./ca"\n[discovery]\n'


def test_an_inline_etcd_table_with_defaults(tmp_path: Path) -> None:
    text = (
        BASE + 'etcd = { endpoints = ["https://10.0.0.5:2379", "http://[::1]:2379"], ca = "etcd-ca.crt" }\n'
    )
    etcd = load_text(tmp_path, text).discovery.etcd
    assert etcd is not None and etcd.endpoints[1] == "http://[::1]:2379"
    assert etcd.ca == tmp_path / "etcd-ca.crt" and etcd.cert is None and etcd.prefix == ""
    assert etcd.lease_ttl == timedelta(seconds=30) and etcd.user == ""


def test_no_etcd_by_default(tmp_path: Path) -> None:
    assert load_text(tmp_path, BASE).discovery.etcd is None


@pytest.mark.parametrize(
    ("etcd", "expected"),
    [
        ("etcd = {}", "F:6: discovery.etcd needs at least one endpoint"),
        ('etcd = { endpoints = ["10.0.0.5:2379"] }', "is not http(s)://HOST:PORT"),
        ('etcd = { endpoints = ["https://a:2379"], cert = "c.pem" }', "set both cert and key, or neither"),
        (
            'etcd = { endpoints = ["https://a:2379"], user = "meshd-alpha" }',
            "set both user and password_file",
        ),
        ('etcd = { endpoints = ["https://a:2379"], prefix = "meshd" }', "must start and end with '/'"),
        ('etcd = { endpoints = ["https://a:2379"], lease_ttl = "1s" }', "lease_ttl must be at least 2s"),
        (
            'etcd = { endpoints = ["https://a:2379"], advertise = "0.0.0.0:15008" }',
            "not an address a peer can dial",
        ),
        ('etcd = { endpoint = ["https://a:2379"] }', "did you mean 'endpoints'?"),
    ],
)
def test_mistakes_are_reported_at_their_line(tmp_path: Path, etcd: str, expected: str) -> None:
    found = problems_in(tmp_path, BASE + etcd + "\n")
    assert any(expected in p for p in found), found
