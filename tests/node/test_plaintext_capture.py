"""Plaintext inbound (15006): reached only through a capture (netfilter REDIRECT, SO_ORIGINAL_DST).

A private network namespace holds a real `meshd run` (beta) and two echo workloads: `echo`
(PERMISSIVE, the default) on 127.0.0.3:7000 and `vault` (`mtls = "STRICT"`) on 127.0.0.4:7000. An
nft rule in the namespace redirects TCP to port 7000 from the test client's own source address
127.0.0.9 to 15006, so meshd's own connections to the workloads are never captured.

The test process enters the namespace from one worker thread (setns(2)): sockets made there, and
processes started from there, live in the namespace; the rest of the test stays outside it.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from meshd.identity.ca import LocalCA
from meshd.tools.echo import echo_server
from tests.netns.lab import enter_netns
from tests.support.procs import Meshd, http_get, metric_sum

pytestmark = pytest.mark.netns

T = TypeVar("T")
TIMEOUT = 20.0
MESHD_IP = "127.0.0.1"  # inside the namespace; REDIRECT sends captured connections to 127.0.0.1
ECHO = ("127.0.0.3", 7000)  # PERMISSIVE
VAULT = ("127.0.0.4", 7000)  # STRICT
CAPTURED_SRC = "127.0.0.9"  # only connections from here are redirected
OTHER_SRC = "127.0.0.8"

NFT_RULES = f"""
table ip meshdtest {{
  chain out {{
    type nat hook output priority -100; policy accept;
    ip saddr {CAPTURED_SRC} tcp dport {ECHO[1]} redirect to :15006
  }}
}}
"""


def _run(*cmd: str, stdin: str | None = None) -> None:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if proc.returncode != 0:
        pytest.fail(
            f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}\n"
            "this test needs root, network namespaces (ip netns) and nftables NAT in the kernel"
        )


class Netns:
    """A named network namespace and a worker thread that lives inside it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"netns-{name}")
        self.call(self._enter)

    def _enter(self) -> None:
        enter_netns(self.name)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 2 * TIMEOUT) -> T:
        """Run fn inside the namespace (sockets it opens and processes it starts stay there)."""
        return self._thread.submit(fn, *args).result(timeout)

    def close(self) -> None:
        self._thread.shutdown(wait=False)


@dataclass
class Beta:
    ns: Netns
    daemon: Meshd

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.ns.call(http_get, self.daemon.metrics_url)[1], name, **labels)

    def wait_log(self, pattern: str) -> str:
        """The access-log line matching pattern (meshd logs it as the connection ends; bounded)."""

        def poll() -> str:
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                for line in self.daemon.log().splitlines():
                    if re.search(pattern, line):
                        return line
                time.sleep(0.02)  # polling the daemon's own log, not a stand-in for readiness
            raise AssertionError(f"no log line matches {pattern!r}:\n{self.daemon.log()[-4000:]}")

        return poll()


def client(src: str, dst: tuple[str, int], payload: bytes) -> bytes:
    """Connect from `src`, send, half-close, return what came back before the close (run in the ns)."""
    with socket.socket() as s:
        s.settimeout(TIMEOUT)
        s.bind((src, 0))
        s.connect(dst)
        out = bytearray()
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            raise
        except OSError:  # reset, broken pipe, or already closed by the peer (ENOTCONN on shutdown)
            pass
        return bytes(out)


@pytest.fixture(scope="module")
def beta(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Beta]:
    if os.geteuid() != 0:
        pytest.fail("the plaintext capture test needs root (network namespaces and nftables)")
    if shutil.which("nft") is None:
        pytest.fail("`nft` not found: install nftables (Debian: apt-get install nftables)")
    if shutil.which("ip") is None:
        pytest.fail("`ip` not found: install iproute2")
    tmp = tmp_path_factory.mktemp("capture")
    name = f"meshd-t-{secrets.token_hex(4)}"
    _run("ip", "netns", "add", name)
    with ExitStack() as stack:
        stack.callback(subprocess.run, ["ip", "netns", "del", name], timeout=TIMEOUT, check=False)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        _run("ip", "netns", "exec", name, "nft", "-f", "-", stdin=NFT_RULES)
        ns = Netns(name)
        stack.callback(ns.close)
        for address in (ECHO, VAULT):
            ns.call(stack.enter_context, echo_server(*address))
        daemon = Meshd(config(tmp), MESHD_IP)
        stack.callback(_stop, daemon)
        ns.call(daemon.start)
        ns.call(daemon.wait_ready, timeout=3 * TIMEOUT)
        yield Beta(ns, daemon)


def _stop(daemon: Meshd) -> None:
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.stop()


def config(tmp: Path) -> Path:
    LocalCA.init(tmp / "ca", "home.arpa")
    path = tmp / "beta.toml"
    path.write_text(
        f'trust_domain = "home.arpa"\nnode_name = "beta"\n[identity]\nca_dir = "{tmp / "ca"}"\n'
        "[discovery]\nmdns = false\n"
        f'[[workload]]\nname = "echo"\naddress = "{ECHO[0]}"\nports = [{ECHO[1]}]\n'
        f'[[workload]]\nname = "vault"\naddress = "{VAULT[0]}"\nports = [{VAULT[1]}]\nmtls = "STRICT"\n'
    )
    return path


def test_captured_plaintext_reaches_a_permissive_workload(beta: Beta) -> None:
    labels = {"reporter": "destination", "destination_workload": "echo", "connection_security_policy": "none"}
    before = beta.metric("istio_tcp_connections_opened_total", **labels)
    payload = b"plaintext via capture\n" * 1000
    assert beta.ns.call(client, CAPTURED_SRC, ECHO, payload) == payload
    # It went through meshd (not straight to the echo): counted, and logged without an identity.
    line = beta.wait_log(
        rf"connection complete .*src\.addr={CAPTURED_SRC}:\d+ dst\.addr={ECHO[0]}:{ECHO[1]} "
    )
    assert "src.identity=None" in line and f"bytes_recv={len(payload)}" in line, line
    assert beta.metric("istio_tcp_connections_opened_total", **labels) == before + 1
    assert beta.metric("istio_tcp_received_bytes_total", **labels) >= len(payload)


def test_strict_workload_closes_captured_plaintext_without_a_byte(beta: Beta) -> None:
    before = beta.metric("meshd_tcp_connections_failed_total", reporter="destination", reason="UAEX")
    assert beta.ns.call(client, CAPTURED_SRC, VAULT, b"let me in") == b""
    beta.wait_log(
        rf"connection failed .*dst\.addr={VAULT[0]}:{VAULT[1]} .*plaintext refused: workload is STRICT"
    )
    assert (
        beta.metric("meshd_tcp_connections_failed_total", reporter="destination", reason="UAEX") == before + 1
    )
    assert beta.metric("istio_tcp_connections_opened_total", destination_workload="vault") == 0
    # The workload itself is up: only the mesh refused (a client outside the capture reaches it).
    assert beta.ns.call(client, OTHER_SRC, VAULT, b"direct") == b"direct"


def test_plaintext_port_without_a_capture_is_refused(beta: Beta) -> None:
    before = beta.metric("meshd_tcp_connections_failed_total", reporter="destination", reason="NR")
    # Dialling 15006 directly: no original destination, so nothing to forward to.
    assert beta.ns.call(client, OTHER_SRC, (MESHD_IP, 15006), b"where to?") == b""
    beta.wait_log(rf"connection failed .*src\.addr={OTHER_SRC}:\d+ .*without an original destination")
    assert (
        beta.metric("meshd_tcp_connections_failed_total", reporter="destination", reason="NR") == before + 1
    )
