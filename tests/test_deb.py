"""The Debian package and the shipped units, under a real systemd (booted in containers: tests/support/debian.py).

What an admin on Debian 12 does, command for command as docs/install.md says it: `apt-get install ./meshd_*.deb`,
a CA host and an enrolled host, `systemctl enable --now meshd` (Type=notify: returns once ready), traffic through
the mesh, `systemctl reload`, `systemctl stop` and the journal; an upgrade to a rebuilt package, remove, purge;
and the pyz under the same unit. Each of issue 21's "broken today" 1-3 has its test here:
  1. the documented install works   -> test_deb_ca_host_enrolls_a_second_host_and_carries_traffic
  2. the pyz under ProtectHome=yes  -> test_pyz_starts_under_the_shipped_unit
  3. a CA host under the unit       -> test_deb_ca_host_enrolls_a_second_host_and_carries_traffic
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshd.build import COMPILED_MODULES
from tests.support.debian import Container, cached_root, host_tools_missing, veth_pair
from tests.support.packages import build_pyz
from tests.support.paths import REPO
from tests.support.procs import wait_for

# The first test also builds the cached Debian root (debootstrap) on a fresh machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

VERSION = re.search(r'__version__ = "(.+)"', (REPO / "meshd" / "__init__.py").read_text()).group(1)  # type: ignore[union-attr]


def build_deb(out: Path, version: str = VERSION) -> Path:
    """`make deb`, as a user runs it (scripts/build-deb.sh), into OUT."""
    done = subprocess.run(
        ["make", "-s", "deb", f"DEB_VERSION={version}", f"DEB_OUT={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    deb = out / f"meshd_{version}_{arch}.deb"
    assert done.returncode == 0 and deb.is_file(), done.stdout + done.stderr
    return deb


@pytest.fixture(scope="module")
def base() -> Path:
    missing = host_tools_missing()
    assert not missing, f"missing {missing}: apt-get install systemd-container debootstrap iproute2"
    assert os.geteuid() == 0, "booting containers needs root"
    return cached_root()


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_deb(tmp_path_factory.mktemp("deb"))


Boot = Callable[..., Container]


@pytest.fixture
def boot(base: Path) -> Iterator[Boot]:
    """boot(netns=None) -> a booted Container; all are powered off and removed at the end."""
    made: list[Container] = []
    work = Path(tempfile.mkdtemp(prefix="meshd-ct-", dir="/var/tmp"))

    def start(netns: str | None = None) -> Container:
        c = Container(base, work / str(len(made)), netns)
        made.append(c)
        c.boot()
        return c

    yield start
    for c in made:
        c.close()
    shutil.rmtree(work, ignore_errors=True)


def install_deb(c: Container, deb: Path) -> None:
    """docs/install.md, "Install it on a host": copy the .deb over, `apt-get install ./meshd_*.deb`."""
    c.put(deb, f"/root/{deb.name}")
    c.sh(f"cd /root && apt-get install -y ./{deb.name}", timeout=300)


def enable_now(c: Container, unit: str = "meshd") -> None:
    """`systemctl enable --now` (Type=notify: returns once the daemon said READY=1), the journal on failure."""
    out = c.run("systemctl", "enable", "--now", unit, check=False, timeout=180)
    assert out.returncode == 0, f"{c.name}: {unit} did not start: {out.stderr}\n{c.journal(unit)[-4000:]}"
    assert c.run("systemctl", "is-active", unit).stdout.strip() == "active"


def main_pid_user(c: Container, unit: str) -> tuple[str, str]:
    pid = c.run("systemctl", "show", "-P", "MainPID", unit).stdout.strip()
    status = c.run("cat", f"/proc/{pid}/status").stdout
    uid = re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)  # type: ignore[union-attr]
    cap_eff = re.search(r"^CapEff:\s+(\w+)", status, re.M).group(1)  # type: ignore[union-attr]
    return c.run("id", "-nu", uid).stdout.strip(), cap_eff


def init_ca(c: Container) -> None:
    """docs/install.md: the mesh CA under the state directory, made by the meshd user (who must read it)."""
    c.run(
        "runuser",
        "-u",
        "meshd",
        "--",
        "meshd",
        "ca",
        "init",
        "--dir",
        "/var/lib/meshd/ca",
        "--trust-domain",
        "home.arpa",
    )


def assert_clean_journal(c: Container, unit: str) -> str:
    journal = c.journal(unit)
    for bad in ("Traceback", "Read-only file system", "Permission denied", "Failed with result"):
        assert bad not in journal, f"{c.name} {unit}: {bad!r} in the journal:\n{journal[-4000:]}"
    return journal


CA_HOST = """\
trust_domain = "home.arpa"
node_name = "alpha"
[identity]
ca_dir = "/var/lib/meshd/ca"
[ca]
serve = true
dir = "/var/lib/meshd/ca"
listen = "0.0.0.0:15012"
[discovery]
mdns = false
peers = ["10.213.0.2:15008"]
[[workload]]
name = "web"
namespace = "default"
service_account = "web"
address = "127.0.0.1"
ports = [8080]
services = ["web"]
[[service]]
name = "web"
namespace = "default"
ports = [{ port = 8080, target_port = 8080, protocol = "tcp" }]
"""

ENROLLED_HOST = """\
trust_domain = "home.arpa"
node_name = "beta"
[identity]
state_dir = "/var/lib/meshd"
[discovery]
mdns = false
peers = ["10.213.0.1:15008"]
[[workload]]
name = "client"
namespace = "default"
service_account = "client"
address = "10.213.0.2"
ports = [9000]
[[upstream]]
service = "web.default"
port = 8080
listen = "127.0.0.1:18080"
workload = "client"
"""

LISTENERS = [
    ("hbone", 15008),
    ("admin", 15000),
    ("metrics", 15020),
    ("readiness", 15021),
    ("plaintext", 15006),
]
WAYPOINT = (
    """\
role = "waypoint"
node_name = "wp"
[listen]
"""
    + "".join(f'{k} = "127.0.0.2:{port}"\n' for k, port in LISTENERS)
    + """\
[identity]
ca_dir = "/var/lib/meshd/ca"
[discovery]
mdns = false
"""
)

FETCH = """\
import sys, urllib.request
print(urllib.request.urlopen("http://127.0.0.1:18080/hello.txt", timeout=5).read().decode(), end="")
"""


def test_deb_ca_host_enrolls_a_second_host_and_carries_traffic(deb: Path, boot: Boot) -> None:
    with veth_pair(f"mdeb{secrets.token_hex(3)}-") as (ns_a, ns_b):
        alpha = boot(ns_a)
        beta = boot(ns_b)
        for c in (alpha, beta):
            install_deb(c, deb)
            version = c.run("meshd", "version").stdout
            # The package ships the compiled core (scripts/compile_core.py, built here with mypyc), and
            # it loads under Debian's own python3.
            n = len(COMPILED_MODULES)
            assert version.startswith("meshd ") and f"compiled core, {n} of {n} modules" in version, version
            assert c.run("dpkg-query", "-W", "-f=${Version}", "meshd").stdout == VERSION
            assert c.run("getent", "passwd", "meshd").stdout.split(":")[5] == "/var/lib/meshd"
            assert c.run("systemctl", "is-enabled", "meshd", check=False).stdout.strip() == "disabled"

        # The CA host: the CA folder under the state directory, made by the meshd user.
        init_ca(alpha)
        alpha.run("sh", "-c", "cat > /etc/meshd/meshd.toml", input=CA_HOST)
        alpha.run("meshd", "config", "check", "-c", "/etc/meshd/meshd.toml")
        alpha.sh("mkdir -p /srv/web && echo 'hello through the mesh' > /srv/web/hello.txt")
        alpha.run(
            "systemd-run", "--unit=web", "python3", "-m", "http.server", "--bind", "127.0.0.1",
            "--directory", "/srv/web", "8080",
        )  # fmt: skip
        enable_now(alpha)
        assert main_pid_user(alpha, "meshd") == ("meshd", "0000000000000000")  # not root, no capabilities

        token_out = alpha.run(
            "runuser", "-u", "meshd", "--", "meshd", "ca", "token", "--dir", "/var/lib/meshd/ca",
            "--node", "beta", "--workloads", "default/client", "--ttl", "1h", "--address", "10.213.0.1:15012",
        )  # fmt: skip
        token = token_out.stdout.strip().splitlines()[-1]
        assert token.startswith("meshd-enroll-v1."), token_out.stdout + token_out.stderr

        # The enrolled host: enrollment as the meshd user, then the unit.
        enrolled = beta.run(
            "runuser",
            "-u",
            "meshd",
            "--",
            "meshd",
            "enroll",
            "--token",
            token,
            "--state-dir",
            "/var/lib/meshd",
        )
        assert "enrolled as node beta" in enrolled.stdout + enrolled.stderr
        beta.run("sh", "-c", "cat > /etc/meshd/meshd.toml", input=ENROLLED_HOST)
        enable_now(beta)

        def fetched() -> bool:
            out = beta.run("python3", "-c", FETCH, check=False, timeout=20)
            return out.returncode == 0 and out.stdout == "hello through the mesh\n"

        wait_for(fetched, timeout=60, interval=0.5, what="beta's app reaches alpha's web through the mesh")
        ca_log = assert_clean_journal(alpha, "meshd")
        assert "CA enrolled node beta" in ca_log and "CA issued a certificate" in ca_log, ca_log[-3000:]

        # Reload: the unit's ExecReload (SIGHUP) reaches the daemon, which re-reads nothing unchanged;
        # after an edit it reloads. The daemon stays up and keeps carrying traffic.
        pid = beta.run("systemctl", "show", "-P", "MainPID", "meshd").stdout.strip()
        beta.run("systemctl", "reload", "meshd")
        wait_for(
            lambda: "SIGHUP: config and policy unchanged since they were last read" in beta.journal("meshd"),
            timeout=30,
            interval=0.2,
            what="SIGHUP handled",
        )
        beta.run("sh", "-c", "printf '[log]\\naccess_log = false\\n' >> /etc/meshd/meshd.toml")
        beta.run("systemctl", "reload", "meshd")
        wait_for(
            lambda: "config and policy reloaded" in beta.journal("meshd"),
            timeout=30,
            interval=0.2,
            what="reload logged",
        )
        assert beta.run("systemctl", "show", "-P", "MainPID", "meshd").stdout.strip() == pid
        wait_for(fetched, timeout=30, interval=0.5, what="traffic after the reload")

        # Stop: drain, exit 0, journal clean.
        for c in (beta, alpha):
            c.run("systemctl", "stop", "meshd")
            show = c.run("systemctl", "show", "-p", "ActiveState,Result,ExecMainStatus", "meshd").stdout
            assert set(show.split()) == {"ActiveState=inactive", "Result=success", "ExecMainStatus=0"}, show
            journal = assert_clean_journal(c, "meshd")
            assert "meshd stopped" in journal, journal[-3000:]


def test_deb_upgrade_keeps_config_and_state_then_remove_and_purge(
    deb: Path, boot: Boot, tmp_path: Path
) -> None:
    c = boot()
    install_deb(c, deb)
    init_ca(c)
    config = '# edited by the admin\nnode_name = "solo"\n[identity]\nca_dir = "/var/lib/meshd/ca"\n'
    config += "[discovery]\nmdns = false\n[listen]\n"  # on 127.0.0.1: the waypoint below takes 127.0.0.2
    config += "".join(f'{k} = "127.0.0.1:{port}"\n' for k, port in LISTENERS)
    c.run("sh", "-c", "cat > /etc/meshd/meshd.toml", input=config)
    enable_now(c)
    # Capture's drop-in (docs/install.md) is the one way the daemon gets a capability: CAP_NET_ADMIN, only that.
    c.sh(
        "install -D -m 0644 /usr/share/doc/meshd/examples/systemd/meshd.service.d/capture.conf "
        "/etc/systemd/system/meshd.service.d/capture.conf && systemctl daemon-reload && systemctl restart meshd"
    )
    assert main_pid_user(c, "meshd") == ("meshd", f"{1 << 12:016x}")  # CAP_NET_ADMIN is capability 12
    # The waypoint unit beside it (its own listeners; the same state folder and CA).
    c.run("sh", "-c", "cat > /etc/meshd/waypoint.toml", input=WAYPOINT)
    enable_now(c, "meshd-waypoint")
    assert main_pid_user(c, "meshd-waypoint") == ("meshd", "0000000000000000")
    key_before = c.run("sha256sum", "/var/lib/meshd/ca/ca.key").stdout
    pid_before = c.run("systemctl", "show", "-P", "MainPID", "meshd").stdout.strip()
    wp_pid_before = c.run("systemctl", "show", "-P", "MainPID", "meshd-waypoint").stdout.strip()

    newer = build_deb(tmp_path, f"{VERSION}+rebuild1")
    install_deb(c, newer)
    assert c.run("dpkg-query", "-W", "-f=${Version}", "meshd").stdout == f"{VERSION}+rebuild1"
    assert c.run("cat", "/etc/meshd/meshd.toml").stdout == config  # the admin's conffile, untouched
    assert c.run("sha256sum", "/var/lib/meshd/ca/ca.key").stdout == key_before  # state kept
    # The running daemon was restarted onto the new files, and is ready again.
    assert c.run("systemctl", "is-active", "meshd").stdout.strip() == "active"
    assert c.run("systemctl", "show", "-P", "MainPID", "meshd").stdout.strip() not in ("0", pid_before)
    assert c.run("systemctl", "is-active", "meshd-waypoint").stdout.strip() == "active"
    wp_pid = c.run("systemctl", "show", "-P", "MainPID", "meshd-waypoint").stdout.strip()
    assert wp_pid not in ("0", wp_pid_before)
    assert_clean_journal(c, "meshd")
    assert_clean_journal(c, "meshd-waypoint")

    c.run("apt-get", "remove", "-y", "meshd")  # remove: the daemons stop; configuration and state stay
    for unit in ("meshd", "meshd-waypoint"):
        assert c.run("systemctl", "is-active", unit, check=False).stdout.strip() == "inactive"
    assert c.run("test", "-e", "/usr/bin/meshd", check=False).returncode != 0
    assert c.run("cat", "/etc/meshd/meshd.toml").stdout == config
    assert c.run("sha256sum", "/var/lib/meshd/ca/ca.key").stdout == key_before
    c.run("apt-get", "purge", "-y", "meshd")  # purge: both go
    for gone in ("/etc/meshd", "/var/lib/meshd", "/usr/lib/meshd", "/lib/systemd/system/meshd.service"):
        assert c.run("test", "-e", gone, check=False).returncode != 0, f"{gone} survived the purge"
    assert "meshd" not in c.run("dpkg-query", "-W", "-f=${Package}\\n", check=False).stdout.split()


def test_deb_contents_units_and_conffiles(deb: Path) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    files = {line.split()[5].removeprefix(".") for line in listing.splitlines()}
    info = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True, text=True).stdout
    assert info.split() == ["/etc/meshd/meshd.toml"]
    for unit in ("meshd.service", "meshd-waypoint.service"):
        text = (REPO / "systemd" / unit).read_text()
        assert f"/lib/systemd/system/{unit}" in files
        docs = re.search(r"^Documentation=(.+)$", text, re.M).group(1).split()  # type: ignore[union-attr]
        for url in docs:  # every Documentation= link names a file the package installs
            assert url.removeprefix("file://") in files, url
        exec_start = re.search(r"^ExecStart=(\S+)", text, re.M).group(1)  # type: ignore[union-attr]
        assert exec_start == "/usr/bin/meshd" and exec_start in files
        assert "User=meshd\n" in text and "ReadWritePaths" not in text
    assert "/usr/lib/meshd/bin/meshd" in files and "/usr/lib/meshd/pyvenv.cfg" in files


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pyz(tmp_path_factory.mktemp("pyz") / "meshd.pyz")


def test_pyz_starts_under_the_shipped_unit(pyz: Path, boot: Boot) -> None:
    """docs/install.md, "The pyz under systemd": the shipped unit (ProtectHome=yes, ProtectSystem=strict)
    with an ExecStart drop-in; shiv unpacks into SHIV_ROOT under /var/lib/meshd, not /root/.shiv."""
    c = boot()
    c.put(pyz, "/root/meshd.pyz")
    for unit in ("meshd.service", "meshd-waypoint.service"):
        c.put(REPO / "systemd" / unit, f"/root/systemd/{unit}")
    c.put(REPO / "systemd" / "pyz.conf", "/root/systemd/pyz.conf")
    c.sh(pyz_install_commands())
    init_ca(c)
    config = 'node_name = "pyz"\n[identity]\nca_dir = "/var/lib/meshd/ca"\n[discovery]\nmdns = false\n'
    c.run("sh", "-c", "cat > /etc/meshd/meshd.toml", input=config)
    enable_now(c)
    assert main_pid_user(c, "meshd")[0] == "meshd"
    assert c.run("test", "-d", "/var/lib/meshd/shiv", check=False).returncode == 0
    c.run("systemctl", "stop", "meshd")
    assert "meshd stopped" in assert_clean_journal(c, "meshd")


def pyz_install_commands() -> str:
    """The shell block of docs/install.md's pyz section, run from a folder holding meshd.pyz and systemd/."""
    text = (REPO / "docs" / "install.md").read_text()
    block = re.search(r"<!-- pyz-install -->\n```sh\n(.*?)```", text, re.S)
    assert block, "docs/install.md lost its pyz install block"
    return "cd /root\n" + block.group(1)
