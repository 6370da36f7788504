"""Hosts as Linux network namespaces joined by a bridge, for multi-host tests on one machine.

Layout: a namespace `<id>-br` holds bridge `br0`; each host is a namespace `<id>-hN` whose `eth0`
is a veth whose other end (`vN`) sits in the bridge namespace. Addresses come from 10.77.0.0/24
and exist only inside these namespaces: nothing is created in, or routed through, the host's own
network namespace, and every namespace is deleted at the end (deleting it destroys its veths).

Code runs "on" a host in two ways: a subprocess via `ip netns exec`, or a Python function in a
thread that has joined the namespace with setns(2) (`Host.call`): sockets it creates stay in that
namespace, whichever thread uses them afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import pytest

from tests.support.procs import http_get, metric_sum

SUBNET = "10.77.0"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Move the calling thread into the named network namespace (`ip netns add NAME`)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsUnavailable(RuntimeError):
    """This machine cannot build the namespaces (not root, no iproute2, no netns support)."""


def ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class Host:
    label: str  # h1, h2, ...
    ns: str
    ip: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
        """Run fn(*args) in a thread inside this host's network namespace."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                enter_netns(self.ns)
                box["value"] = fn(*args)
            except BaseException as exc:
                box["error"] = exc

        t = threading.Thread(target=target, name=f"in-{self.label}", daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"{fn.__name__} in {self.label} took over {timeout}s")
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def popen(self, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        out = open(log, "wb")  # noqa: SIM115 - the child holds it; closed when the child is reaped
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], stdout=out, stderr=subprocess.STDOUT)
        out.close()
        self.procs.append(proc)
        return proc

    def get(self, url: str) -> tuple[int, bytes]:
        return self.call(http_get, url)


class Namespaces:
    """Network namespaces a test made (named `<id>-...`) and the hosts in them; `close()` kills what
    runs in them and deletes them, and with them every veth and bridge inside."""

    def __init__(self, lab_id: str) -> None:
        self.id = lab_id
        self.hosts: list[Host] = []
        self._namespaces: list[str] = []

    def _add_ns(self, name: str) -> None:
        ip("netns", "add", name)
        self._namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        """Make what every host of this kind of lab plugs into (bridges, routers): each subclass's own."""
        raise NotImplementedError

    def built(self) -> Self:
        """This lab once `_build()` has run; NetnsUnavailable (not root, no iproute2, no netns support)
        with everything made so far deleted."""
        if os.geteuid() != 0:
            raise NetnsUnavailable("not running as root (network namespaces need CAP_SYS_ADMIN)")
        try:
            self._build()
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            self.close()
            raise NetnsUnavailable(str(exc)) from exc
        return self

    def started_on(self) -> list[Host]:
        """The hosts whose processes close() kills and reaps first."""
        return list(self.hosts)

    def close(self) -> None:
        """Kill what runs in the namespaces (ours by construction), then delete them."""
        for host in self.started_on():
            for proc in host.procs:
                if proc.poll() is None:
                    proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(5)
        for ns in reversed(self._namespaces):
            with contextlib.suppress(RuntimeError, OSError):
                for pid in ip("netns", "pids", ns).split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(RuntimeError, OSError):
                ip("netns", "del", ns)
        self._namespaces.clear()


N = TypeVar("N", bound=Namespaces)


@contextlib.contextmanager
def namespaces_or_fail(create: Callable[[], N], needs: str) -> Iterator[N]:
    """The lab `create()` builds, closed however the block ends; a machine that cannot build one fails
    the test (it is never skipped), saying what the test `needs`."""
    try:
        lab = create()
    except NetnsUnavailable as exc:
        pytest.fail(f"this machine cannot build network namespaces ({exc}); {needs}")
    try:
        yield lab
    finally:
        lab.close()


def host_config(tmp: Path, label: str, discovery: str, body: str = "", *, top: str = "") -> Path:
    """Write tmp/<label>.toml: node `label` of home.arpa (CA in tmp/ca), more top-level keys `top`, the
    `[discovery]` table's lines `discovery`, then `body`; return its path."""
    path = tmp / f"{label}.toml"
    path.write_text(
        f'trust_domain = "home.arpa"\nnode_name = "{label}"\n{top}'
        f'[identity]\nca_dir = "{tmp / "ca"}"\n'
        f"[discovery]\n{discovery}" + body
    )
    return path


def capture_config(tmp: Path, label: str, peer_ip: str, body: str) -> Path:
    """A capture test's node: drains in 2 s, its one static peer at peer_ip, mDNS off."""
    discovery = f'mdns = false\npeers = ["{peer_ip}:15008"]\nrefresh = "1s"\n'
    return host_config(tmp, label, discovery, body, top='drain_timeout = "2s"\n')


class Lab(Namespaces):
    """Hosts on one bridge (one subnet): multicast reaches all of them."""

    def __init__(self, prefix: str = "mdt", subnet: str = SUBNET) -> None:
        super().__init__(prefix + secrets.token_hex(4))
        self.subnet = subnet
        self.bridge_ns = f"{self.id}-br"

    @classmethod
    def create(cls, prefix: str = "mdt", subnet: str = SUBNET) -> Lab:
        """`prefix` names the namespaces and `subnet` ("10.77.0") numbers the hosts: tests that may
        run beside others' labs give their own."""
        return cls(prefix, subnet).built()

    def _build(self) -> None:
        self._add_ns(self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", self.bridge_ns, "link", "set", "br0", "up")

    def add_host(self) -> Host:
        n = len(self.hosts) + 1
        host = Host(f"h{n}", f"{self.id}-h{n}", f"{self.subnet}.{n}")
        self._add_ns(host.ns)
        ip(
            "-n",
            self.bridge_ns,
            "link",
            "add",
            f"v{n}",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            host.ns,
        )
        ip("-n", self.bridge_ns, "link", "set", f"v{n}", "master", "br0", "up")
        ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        ip("-n", host.ns, "link", "set", "eth0", "multicast", "on", "up")
        self.hosts.append(host)
        return host


# ---- meshd and friends on a host ------------------------------------------------------------------


@dataclass
class NsMeshd:
    host: Host
    config: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def label(self) -> str:
        return self.host.label

    @property
    def log_path(self) -> Path:
        return self.config.with_suffix(".log")

    def start(self) -> NsMeshd:
        self.proc = self.host.popen(
            [sys.executable, "-m", "meshd", "run", "-c", str(self.config)], self.log_path
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"meshd on {self.host.label} exited {self.proc.returncode}:\n{self.log()}"
                )
            with contextlib.suppress(OSError):
                if self.host.get("http://127.0.0.1:15021/healthz/ready")[0] == 200:
                    return
            time.sleep(0.05)  # polling readiness, not standing in for it
        raise AssertionError(f"meshd on {self.host.label} not ready after {timeout}s:\n{self.log()}")

    def dump(self) -> dict[str, Any]:
        status, body = self.host.get("http://127.0.0.1:15000/config_dump")
        assert status == 200, body
        return json.loads(body)  # type: ignore[no-any-return]

    def nodes(self) -> list[str]:
        """The nodes in this daemon's catalog."""
        return list(self.dump()["catalog"]["nodes"])

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.host.get("http://127.0.0.1:15020/metrics")[1], name, **labels)

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@contextlib.contextmanager
def tagged_echo(host: Host, port: int) -> Iterator[None]:
    """A TCP server on host.ip:port answering `<label>:<what it received>` once the client half-closes."""
    server = host.call(socket.create_server, (host.ip, port))
    server.settimeout(0.2)
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(host.label.encode() + b":" + data)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(2)
        server.close()


def exchange(address: tuple[str, int], payload: bytes) -> bytes:
    """Send, half-close, read until closed (run it on a host with Host.call)."""
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
        return out
