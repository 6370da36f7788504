"""`meshd ca init|issue|show`, through click's runner and once through `python -m meshd`."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from meshd.cli import main
from meshd.cli_ca import humanize
from meshd.identity.ca import LocalCA, load_pem_certificates, read_issued, verify_chain, write_issued
from meshd.identity.spiffe import SpiffeId
from tests.support.paths import REPO

TD = "mesh.local"
WEB_ID = f"spiffe://{TD}/ns/default/sa/web"


def run(*args: str) -> Result:
    return CliRunner().invoke(main, ["ca", *args])


def assert_user_error(r: Result, *fragments: str) -> None:
    """Exit 1, `error: ...` on stderr, no traceback."""
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    err = r.stderr
    assert err.startswith("error: "), err
    assert "Traceback" not in err and "Traceback" not in r.stdout
    assert "(" in err and err.rstrip().endswith(")"), f"no hint of what to do: {err}"
    for f in fragments:
        assert f in err, (f, err)


@pytest.fixture
def cadir(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    r = run("init", "--dir", str(d), "--trust-domain", TD)
    assert r.exit_code == 0, r.output
    return d


def test_init_issue_show_round_trip(cadir: Path, tmp_path: Path) -> None:
    assert stat.S_IMODE((cadir / "ca.key").stat().st_mode) == 0o600
    out = tmp_path / "web"
    r = run("issue", "--dir", str(cadir), "--id", WEB_ID, "--out", str(out), "--ttl", "2h")
    assert r.exit_code == 0, r.output
    assert WEB_ID in r.stdout
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    issued = read_issued(out)
    assert issued.spiffe_id == SpiffeId.parse(WEB_ID)
    assert timedelta(hours=2) <= issued.not_after - issued.not_before <= timedelta(hours=2, minutes=6)
    verify_chain(load_pem_certificates(issued.cert_pem)[0], load_pem_certificates(issued.ca_pem))

    r = run("show", str(out / "cert.pem"))
    assert r.exit_code == 0, r.output
    text = r.stdout
    assert f"spiffe id:   {WEB_ID}" in text
    assert "issuer:      CN=meshd root CA mesh.local,O=meshd" in text
    assert "not before:" in text and "not after:" in text
    assert "expires in 2h" in text or "expires in 1h59m" in text
    assert "certificate 2 of 2 (CA)" in text  # the chain's root is shown too
    assert "PRIVATE" not in text


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed")
def test_openssl_verifies_cli_output(cadir: Path, tmp_path: Path) -> None:
    out = tmp_path / "web"
    assert run("issue", "--dir", str(cadir), "--id", WEB_ID, "--out", str(out)).exit_code == 0
    r = subprocess.run(
        ["openssl", "verify", "-CAfile", str(cadir / "ca.crt"), str(out / "cert.pem")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        ["openssl", "x509", "-in", str(out / "cert.pem"), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"URI:{WEB_ID}" in r.stdout


def test_show_json(cadir: Path, tmp_path: Path) -> None:
    out = tmp_path / "web"
    assert run("issue", "--dir", str(cadir), "--id", WEB_ID, "--out", str(out)).exit_code == 0
    r = run("show", "--json", str(out / "cert.pem"))
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [d["is_ca"] for d in data] == [False, True]
    leaf = data[0]
    assert leaf["spiffe_id"] == WEB_ID
    assert leaf["subject"] == ""
    assert leaf["expired"] is False
    assert 0 < leaf["expires_in_seconds"] <= 24 * 3600
    assert len(leaf["fingerprint_sha256"].split(":")) == 32
    datetime.strptime(leaf["not_after"], "%Y-%m-%dT%H:%M:%SZ")
    int(leaf["serial"], 16)
    root = json.loads(run("show", "--json", str(cadir / "ca.crt")).stdout)
    assert len(root) == 1 and root[0]["spiffe_id"] == f"spiffe://{TD}"


def test_show_expired(tmp_path: Path) -> None:
    then = datetime.now(UTC) - timedelta(days=3)
    local = LocalCA.init(tmp_path / "ca", TD, now=then)
    write_issued(local.issue(SpiffeId.parse(WEB_ID), ttl=timedelta(hours=1), now=then), tmp_path / "old")
    r = run("show", str(tmp_path / "old" / "cert.pem"))
    assert r.exit_code == 0
    assert "EXPIRED (2d23h ago)" in r.stdout
    assert json.loads(run("show", "--json", str(tmp_path / "old" / "cert.pem")).stdout)[0]["expired"] is True


def test_issue_refuses_other_trust_domain(cadir: Path, tmp_path: Path) -> None:
    r = run(
        "issue",
        "--dir",
        str(cadir),
        "--id",
        "spiffe://evil.example/ns/default/sa/web",
        "--out",
        str(tmp_path / "o"),
    )
    assert_user_error(r, "outside this CA's trust domain", "spiffe://mesh.local/ns/")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "bad",
    [
        "web",
        "mesh.local/ns/default/sa/web",  # principal form, not a SPIFFE ID
        "spiffe://mesh.local/default/web",
        "spiffe://mesh.local/ns/default/sa/",
        "spiffe://mesh.local/ns/default/sa/web/extra",
        "spiffe://Mesh.Local/ns/default/sa/web",
        "spiffe://mesh.local/ns/de fault/sa/web",
        "",
    ],
)
def test_issue_refuses_malformed_id(cadir: Path, tmp_path: Path, bad: str) -> None:
    r = run("issue", "--dir", str(cadir), "--id", bad, "--out", str(tmp_path / "o"))
    assert_user_error(r, "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("ttl", ["soon", "24", "-1h", "0s"])
def test_issue_refuses_bad_ttl(cadir: Path, tmp_path: Path, ttl: str) -> None:
    r = run("issue", "--dir", str(cadir), "--id", WEB_ID, "--out", str(tmp_path / "o"), "--ttl", ttl)
    assert_user_error(r)


def test_issue_warns_when_capped_at_root_expiry(tmp_path: Path) -> None:
    LocalCA.init(tmp_path / "ca", TD, validity=timedelta(hours=1))
    r = run(
        "issue", "--dir", str(tmp_path / "ca"), "--id", WEB_ID, "--out", str(tmp_path / "o"), "--ttl", "7d"
    )
    assert r.exit_code == 0, r.output
    assert "warning: lifetime cut to the CA root's expiry" in r.stderr
    issued = read_issued(tmp_path / "o")
    assert issued.not_after - issued.not_before < timedelta(hours=2)


def test_init_refuses_existing_key_then_force_replaces(cadir: Path) -> None:
    before = (cadir / "ca.crt").read_bytes()
    r = run("init", "--dir", str(cadir), "--trust-domain", TD)
    assert_user_error(r, "already exists", "--force")
    assert (cadir / "ca.crt").read_bytes() == before
    r = run("init", "--dir", str(cadir), "--trust-domain", TD, "--force")
    assert r.exit_code == 0, r.output
    assert (cadir / "ca.crt").read_bytes() != before
    assert stat.S_IMODE((cadir / "ca.key").stat().st_mode) == 0o600


def test_init_refuses_bad_trust_domain(tmp_path: Path) -> None:
    assert_user_error(
        run("init", "--dir", str(tmp_path / "ca"), "--trust-domain", "Not Valid"), "trust domain"
    )


def test_issue_with_missing_dir(tmp_path: Path) -> None:
    r = run("issue", "--dir", str(tmp_path / "nope"), "--id", WEB_ID, "--out", str(tmp_path / "o"))
    assert_user_error(r, "does not exist", "meshd ca init")


def test_issue_with_file_as_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    r = run("issue", "--dir", str(tmp_path / "file"), "--id", WEB_ID, "--out", str(tmp_path / "o"))
    assert_user_error(r, "is not a directory")


def test_issue_with_corrupt_key(cadir: Path, tmp_path: Path) -> None:
    (cadir / "ca.key").write_bytes(b"corrupt")
    r = run("issue", "--dir", str(cadir), "--id", WEB_ID, "--out", str(tmp_path / "o"))
    assert_user_error(r, "ca.key", "not a readable PEM private key")


def test_issue_with_mismatched_key(cadir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert run("init", "--dir", str(other), "--trust-domain", TD).exit_code == 0
    shutil.copy(other / "ca.key", cadir / "ca.key")
    r = run("issue", "--dir", str(cadir), "--id", WEB_ID, "--out", str(tmp_path / "o"))
    assert_user_error(r, "does not match")


def test_issue_out_is_a_file(cadir: Path, tmp_path: Path) -> None:
    (tmp_path / "o").write_text("x")
    r = run("issue", "--dir", str(cadir), "--id", WEB_ID, "--out", str(tmp_path / "o"))
    assert_user_error(r, "not a directory")


def test_show_errors(cadir: Path, tmp_path: Path) -> None:
    assert_user_error(run("show", str(tmp_path / "missing.pem")), "cannot read")
    assert_user_error(run("show", str(cadir / "ca.key")), "no valid PEM certificate")
    assert_user_error(run("show", str(cadir)), "cannot read")


@pytest.mark.parametrize(
    ("d", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=12), "12s"),
        (timedelta(minutes=4, seconds=30), "4m30s"),
        (timedelta(hours=23, minutes=59, seconds=59), "23h59m"),
        (timedelta(hours=1, seconds=5), "1h"),
        (timedelta(days=3650), "3650d"),
        (timedelta(days=2, hours=23, minutes=1), "2d23h"),
    ],
)
def test_humanize(d: timedelta, text: str) -> None:
    assert humanize(d) == text


def test_python_dash_m_meshd(tmp_path: Path) -> None:
    """The real entry point: error text on stderr, exit 1, no traceback."""
    cmd = [sys.executable, "-m", "meshd", "ca"]
    ok = subprocess.run(
        [*cmd, "init", "--dir", str(tmp_path / "ca"), "--trust-domain", TD],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [
            *cmd,
            "issue",
            "--dir",
            str(tmp_path / "ca"),
            "--id",
            "spiffe://x/ns/a/sa/b",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
