"""systemd integration: the units verify, and the daemon speaks the notify protocol."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from meshd.identity.ca import LocalCA
from tests.support.configs import example_node
from tests.support.paths import REPO
from tests.support.procs import Meshd, http_get


def test_capture_dropin_grants_only_net_admin() -> None:
    text = (REPO / "systemd" / "meshd.service.d" / "capture.conf").read_text()
    assert "CapabilityBoundingSet=CAP_NET_ADMIN\n" in text and "AmbientCapabilities=CAP_NET_ADMIN\n" in text


@pytest.mark.parametrize("unit", ["meshd.service", "meshd-waypoint.service"])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, unit: str) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (apt-get install systemd)"
    meshd = shutil.which("meshd") or str(Path(REPO / ".venv/bin/meshd"))
    text = (REPO / "systemd" / unit).read_text().replace("/usr/bin/meshd", meshd)
    (tmp_path / unit).write_text(text)
    dropins = REPO / "systemd" / f"{unit}.d"
    if dropins.is_dir():  # checked too: systemd reads drop-ins from the unit path
        shutil.copytree(dropins, tmp_path / f"{unit}.d")
    out = subprocess.run(
        [analyze, "verify", str(tmp_path / unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
    )
    problems = [line for line in out.stderr.splitlines() if str(tmp_path) in line or unit in line]
    assert out.returncode == 0 and not problems, out.stderr


def test_notify_protocol_ready_watchdog_reloading_stopping(
    tmp_path: Path, ca: LocalCA, loopback: str, daemons: list[Meshd]
) -> None:
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(20)
    node = example_node(tmp_path, ca, loopback)
    daemons.append(node)
    node.env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    node.start()
    seen: list[str] = []

    def wait_message(field: str) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(field in m.split("\n") for m in seen):
                return
            seen.append(listener.recv(4096).decode())
        raise AssertionError(f"no {field} within 20 s; got {seen}\n{node.log()}")

    wait_message("READY=1")
    assert http_get(node.readiness_url)[0] == 200  # READY=1 only once every component is up
    seen.clear()
    wait_message("WATCHDOG=1")
    seen.clear()
    wait_message("WATCHDOG=1")  # repeated, from the event loop
    node.signal(signal.SIGHUP)
    wait_message("RELOADING=1")
    node.signal(signal.SIGTERM)
    wait_message("STOPPING=1")
    assert node.proc is not None and node.proc.wait(20) == 0
    listener.close()


def test_the_ca_folder_is_documented_under_the_state_directory() -> None:
    """Under the unit only /var/lib/meshd is writable (ProtectSystem=strict): a CA folder in /etc/meshd made the
    CA host fail on its first enrollment (read-only ca-state.lock). No doc or example may send it there."""
    docs = [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted(REPO.glob("configs/**/*.toml")),
    ]
    for doc in docs:
        assert "/etc/meshd/ca" not in doc.read_text(), f"{doc}: the CA folder belongs under /var/lib/meshd"
    for unit in ("meshd.service", "meshd-waypoint.service"):
        text = (REPO / "systemd" / unit).read_text()
        assert "StateDirectory=meshd\n" in text and "ProtectSystem=strict\n" in text
        assert "Environment=SHIV_ROOT=/var/lib/meshd/shiv\n" in text  # the pyz unpacks under the state dir
        assert "User=meshd\n" in text and "ExecStart=/usr/bin/meshd run" in text
