"""The meshd command line, run as a user runs it: a real subprocess on real files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from meshd import __version__
from tests.support.paths import REPO
from tests.support.procs import meshd_cli


def write_config(tmp_path: Path, body: str, top: str = "") -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "meshd",
            "ca",
            "init",
            "--dir",
            str(tmp_path / "ca"),
            "--trust-domain",
            "home.arpa",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    path = tmp_path / "meshd.toml"
    path.write_text(top + 'trust_domain = "home.arpa"\nnode_name = "t"\n[identity]\nca_dir = "ca"\n' + body)
    return path


def test_version() -> None:
    out = meshd_cli("version")
    assert out.returncode == 0 and out.stdout.startswith(
        f"meshd {__version__} ("
    )  # (the build: test_build.py)


def test_config_check_accepts_the_shipped_example() -> None:
    # configs/meshd.toml points at ../demo-state/ca; a missing CA is a reported problem, not a crash.
    out = meshd_cli("config", "check", "-c", str(REPO / "configs" / "meshd.toml"))
    assert out.returncode in (0, 2), out.stderr
    assert "Traceback" not in out.stderr


def test_config_check_valid(tmp_path: Path) -> None:
    path = write_config(tmp_path, "")
    out = meshd_cli("config", "check", "-c", str(path))
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_config_check_reports_every_problem_with_file_and_line(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, "[listen]\nhbone = 'nowhere'\nadmn = '127.0.0.1:1'\n[[workload]]\nnam = 'x'\n"
    )
    out = meshd_cli("config", "check", "-c", str(path))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith(f"{path}:6: listen.hbone: "), lines
    assert lines[1].startswith(f"{path}:7: unknown key 'admn' in [listen] (did you mean 'admin'?)"), lines
    assert lines[2].startswith(f"{path}:8: missing key 'name' in [workload[0]]"), lines
    assert "Traceback" not in out.stderr


def test_config_check_reports_policy_files_too(tmp_path: Path) -> None:
    (tmp_path / "policy.d").mkdir()
    (tmp_path / "policy.d" / "bad.toml").write_text('[[authorization]]\nname = "x"\naction = "ALOW"\n')
    path = write_config(tmp_path, '[policy]\ndir = "policy.d"\n')
    out = meshd_cli("config", "check", "-c", str(path))
    assert out.returncode == 2
    assert f"{tmp_path / 'policy.d' / 'bad.toml'}:3: " in out.stderr, out.stderr


def test_config_check_notices_a_ca_of_another_trust_domain(tmp_path: Path) -> None:
    path = write_config(tmp_path, "")
    out = meshd_cli("config", "check", "-c", str(path), "trust_domain=other.example")
    assert out.returncode == 2
    assert "is a CA for 'home.arpa'" in out.stderr


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path, "")
    out = meshd_cli("config", "show", env={"MESHD_CONFIG": str(path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert '"node_name": "t"' in out.stdout


def test_unknown_override_names_the_closest_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, "")
    out = meshd_cli("-c", str(path), "listen.hbon=127.0.0.1:1")
    assert out.returncode == 2
    assert (
        out.stderr.strip() == "command line: unknown config key 'listen.hbon' (did you mean 'listen.hbone'?)"
    )


def test_run_with_a_broken_config_exits_2_without_traceback(tmp_path: Path) -> None:
    path = write_config(tmp_path, "", top="role = 'wp'\n")
    out = meshd_cli("run", "-c", str(path))
    assert out.returncode == 2
    assert "did you mean 'waypoint'" in out.stderr and "Traceback" not in out.stderr


def test_config_keys_lists_overridable_keys() -> None:
    out = meshd_cli("config", "keys")
    assert out.returncode == 0
    assert "listen.hbone" in out.stdout and "identity.cert_ttl" in out.stdout


def test_config_check_reads_the_cert_dir_and_says_what_each_identity_needs(tmp_path: Path) -> None:
    path = tmp_path / "meshd.toml"
    path.write_text(
        'node_name = "t"\n[identity]\ncert_dir = "certs"\n[[workload]]\nname = "web"\nports = [80]\n'
    )
    (tmp_path / "certs").mkdir()
    out = meshd_cli("config", "check", "-c", str(path))
    assert out.returncode == 2, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2, lines  # the node identity and the workload's
    assert lines[0].startswith(
        f"{path}:3: identity.cert_dir: no usable certificate for spiffe://home.arpa/ns/meshd-system/sa/node-t: "
    ), lines
    assert (
        f"put cert.pem, key.pem and ca.crt issued for spiffe://home.arpa/ns/default/sa/web in {tmp_path}/certs/default.web/"
        in lines[1]
    )
    # with the certificates in place: OK
    ca = tmp_path / "ca"
    assert meshd_cli("ca", "init", "--dir", str(ca), "--trust-domain", "home.arpa").returncode == 0
    for ident, folder in (
        ("meshd-system/sa/node-t", "meshd-system.node-t"),
        ("default/sa/web", "default.web"),
    ):
        issued = meshd_cli("ca", "issue", "--dir", str(ca), "--id", f"spiffe://home.arpa/ns/{ident}",
                       "--out", str(tmp_path / "certs" / folder))  # fmt: skip
        assert issued.returncode == 0, issued.stderr
    out = meshd_cli("config", "check", "-c", str(path))
    assert out.returncode == 0, out.stderr


def test_config_check_reads_the_state_dir_and_says_how_to_enroll(tmp_path: Path) -> None:
    path = tmp_path / "meshd.toml"
    path.write_text('node_name = "t"\n[identity]\nstate_dir = "state"\n')
    out = meshd_cli("config", "check", "-c", str(path))
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"{path}:3: identity.state_dir: "), line
    assert "has not enrolled" in line or "does not exist" in line, line
    assert f"(enroll this host: `meshd enroll --token-file FILE --state-dir {tmp_path}/state`" in line


def test_config_check_says_how_to_make_a_missing_ca(tmp_path: Path) -> None:
    path = tmp_path / "meshd.toml"
    path.write_text('node_name = "t"\n[identity]\nca_dir = "ca"\n')
    out = meshd_cli("config", "check", "-c", str(path))
    assert out.returncode == 2
    assert f"(make one with `meshd ca init --dir {tmp_path}/ca --trust-domain home.arpa`)" in out.stderr


def test_enroll_wants_the_token_from_a_file_or_stdin_and_says_so(tmp_path: Path) -> None:
    out = meshd_cli("enroll", "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 2
    assert "error: give the token with --token-file FILE or --token - (stdin)" in out.stderr
    empty = tmp_path / "t.token"
    empty.write_text("\n")
    out = meshd_cli("enroll", "--token-file", str(empty), "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 1 and f"the token from {empty} is empty" in out.stderr
    out = meshd_cli("enroll", "--token-file", str(tmp_path / "nope"), "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 1 and "cannot read the token" in out.stderr and "Traceback" not in out.stderr
