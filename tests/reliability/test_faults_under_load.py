"""Faults under load with real daemons: policy reloads every 100 ms, certificate renewal, and a
destination node SIGKILLed, each while several hash-checked transfers run through alpha's
upstream listeners (tests/reliability/load.py checks every byte that comes back).

alpha hosts the client and two upstreams: echo.default (on beta) and echo2.default (on gamma).
beta reads its certificates from `identity.cert_dir` (so the test can renew them) and has a
policy folder; gamma is a bystander whose transfers must never notice beta's faults.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshd.hbone.tls import client_context
from meshd.identity.ca import LocalCA, write_issued
from meshd.identity.spiffe import SpiffeId
from meshd.tools.echo import echo_server
from tests.reliability.load import Load, round_trip, start_load
from tests.support.configs import ECHO_PORT, echo_workload, node_config
from tests.support.procs import Meshd, running, unique_loopback, wait_for
from tests.support.reliability import Record

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TD = "home.arpa"
CLIENT = SpiffeId(TD, "default", "client")
ECHO = SpiffeId(TD, "default", "echo")
BETA_NODE = SpiffeId.node(TD, "beta")
RATE = 6e6  # bytes/s per transfer: load, with CPU left for three daemons on two cores

ALLOW = [
    '[[authorization]]\nname = "allow-client"\nnamespace = "default"\naction = "ALLOW"\n'
    '[[authorization.rules]]\nfrom = [{ principals = ["home.arpa/ns/default/sa/client"] }]\n',
    '[[authorization]]\nname = "allow-default"\nnamespace = "default"\naction = "ALLOW"\n'
    '[[authorization.rules]]\nfrom = [{ namespaces = ["default"] }]\n'
    '[[authorization]]\nname = "deny-other"\nnamespace = "default"\naction = "DENY"\n'
    '[[authorization.rules]]\nfrom = [{ principals = ["home.arpa/ns/other/sa/*"] }]\n',
]


@dataclass
class Mesh:
    alpha: Meshd
    beta: Meshd
    gamma: Meshd
    ca: LocalCA
    to_beta: Callable[[], socket.socket]
    to_gamma: Callable[[], socket.socket]
    beta_policy: Path
    beta_certs: Path


def _connector(address: tuple[str, int]) -> Callable[[], socket.socket]:
    return lambda: socket.create_connection(address, timeout=10)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("faults")
    ca = LocalCA.init(tmp / "ca", TD)
    a_ip, b_ip, g_ip = unique_loopback(), unique_loopback(), unique_loopback()
    alpha_cfg = node_config(
        tmp / "alpha.toml",
        "alpha",
        tmp / "ca",
        peers=[f"{b_ip}:15008", f"{g_ip}:15008"],
        body=f'[[workload]]\nname = "client"\naddress = "{a_ip}"\nports = [8000]\n'
        f'[[upstream]]\nservice = "echo.default"\nport = {ECHO_PORT}\nlisten = "{a_ip}:17000"\n'
        f'[[upstream]]\nservice = "echo2.default"\nport = {ECHO_PORT}\nlisten = "{a_ip}:17001"\n',
    )
    gamma_cfg = node_config(
        tmp / "gamma.toml",
        "gamma",
        tmp / "ca",
        peers=[f"{a_ip}:15008"],
        body=f'[[workload]]\nname = "echo2"\naddress = "{g_ip}"\nports = [{ECHO_PORT}]\nservices = ["echo2"]\n'
        f'[[service]]\nname = "echo2"\nports = [{{ port = {ECHO_PORT} }}]\n',
    )
    certs = tmp / "beta-certs"
    for ident in (ECHO, BETA_NODE):
        write_issued(ca.issue(ident), certs / f"{ident.namespace}.{ident.service_account}")
    beta_cfg = node_config(
        tmp / "beta.toml",
        "beta",
        tmp / "ca",
        peers=[f"{a_ip}:15008"],
        policy_dir=tmp / "beta-policy",
        body=echo_workload(b_ip),
    )
    beta_cfg.write_text(beta_cfg.read_text().replace(f'ca_dir = "{tmp / "ca"}"', f'cert_dir = "{certs}"'))
    (tmp / "beta-policy" / "allow.toml").write_text(ALLOW[0])
    with (
        echo_server(b_ip, ECHO_PORT),
        echo_server(g_ip, ECHO_PORT),
        running(Meshd(gamma_cfg, g_ip)) as gamma,
        running(Meshd(beta_cfg, b_ip)) as beta,
        running(Meshd(alpha_cfg, a_ip)) as alpha,
    ):
        mesh = Mesh(
            alpha,
            beta,
            gamma,
            ca,
            _connector((a_ip, 17000)),
            _connector((a_ip, 17001)),
            tmp / "beta-policy",
            certs,
        )
        wait_for(lambda: round_trip(mesh.to_beta, b"b") == b"b", alpha)
        wait_for(lambda: round_trip(mesh.to_gamma, b"g") == b"g", alpha)
        yield mesh


def _summary(load: Load, failed: int) -> dict[str, int]:
    return {
        "bytes_received": load.received,
        "bytes_corrupted": load.corrupted,
        "transfers": len(load.transfers),
        "transfers_failed": failed,
    }


def _lost_if_all_must_complete(load: Load) -> int:
    """Bytes corrupted, plus bytes sent and never echoed by transfers that had to complete."""
    return load.corrupted + sum(t.sent - t.received for t in load.transfers if not t.completed)


class Prober:
    """New short connections, one after another, while a fault runs: each must round-trip."""

    def __init__(self, connect: Callable[[], socket.socket]) -> None:
        self.ok = self.failed = 0
        self._stop = threading.Event()
        self._connect = connect
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            payload = b"probe %d " % i * 50
            if round_trip(self._connect, payload) == payload:
                self.ok += 1
            else:
                self.failed += 1
            i += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive(), "a probe connection hung"


def test_policy_reload_every_100ms_under_load(mesh: Mesh, record: Record) -> None:
    before = mesh.beta.metric("meshd_config_reloads_total", result="success")
    failed_before = mesh.beta.metric("meshd_config_reloads_total", result="failure")
    load = start_load(
        [
            ("beta-1", mesh.to_beta),
            ("beta-2", mesh.to_beta),
            ("beta-3", mesh.to_beta),
            ("gamma-1", mesh.to_gamma),
        ],
        rate=RATE,
    )
    load.wait_progress(1 << 16)
    probe = Prober(mesh.to_beta)
    reloads = 50
    for i in range(reloads):
        (mesh.beta_policy / "allow.toml").write_text(ALLOW[i % 2])
        mesh.beta.signal(signal.SIGHUP)
        if i % 5 == 0:
            mesh.alpha.signal(signal.SIGHUP)  # alpha reloads too (its upstream listeners must stay)
        time.sleep(0.1)  # the fault's cadence, not a wait for readiness
    probe.stop()
    load.stop()
    applied = mesh.beta.metric("meshd_config_reloads_total", result="success") - before
    failed = [t for t in load.transfers if not t.completed]
    lost = _lost_if_all_must_complete(load)
    record(
        "node under load (4 transfers + new connections)",
        f"{reloads} policy reloads at 100 ms ({applied:.0f} applied; probes {probe.ok} ok, {probe.failed} failed)",
        survived=not failed and probe.failed == 0 and lost == 0,
        bytes_sent=load.sent,
        bytes_lost=lost,
        requests=probe.ok + probe.failed,
        requests_failed=probe.failed,
        **_summary(load, len(failed)),
    )
    assert not failed, load.report()
    assert load.corrupted == 0 and lost == 0
    assert probe.failed == 0 and probe.ok > 0, (probe.ok, probe.failed, mesh.beta.log()[-3000:])
    assert applied >= 1 and mesh.beta.metric("meshd_config_reloads_total", result="failure") == failed_before
    assert mesh.alpha.proc is not None and mesh.alpha.proc.poll() is None


def _presented_leaf(mesh: Mesh, address: tuple[str, int]) -> bytes:
    """DER of the certificate a new connection to `address` is served with."""
    issued = mesh.ca.issue(CLIENT)
    ctx = client_context(issued.cert_pem, issued.key_pem, issued.ca_pem)
    with (
        socket.create_connection(address, timeout=5) as tcp,
        ctx.wrap_socket(tcp, server_hostname=None) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def test_certificate_renewal_under_load(mesh: Mesh, record: Record) -> None:
    beta_hbone = (mesh.beta.ip, 15008)
    old = _presented_leaf(mesh, beta_hbone)
    load = start_load(
        [("beta-1", mesh.to_beta), ("beta-2", mesh.to_beta), ("beta-3", mesh.to_beta)], rate=RATE
    )
    load.wait_progress(1 << 16)
    renewed = {ident: mesh.ca.issue(ident) for ident in (ECHO, BETA_NODE)}
    for ident, issued in renewed.items():
        write_issued(issued, mesh.beta_certs / f"{ident.namespace}.{ident.service_account}")
    new = _der(renewed[ECHO].cert_pem)
    assert new != old
    # cert_dir is re-read within 5 s: new connections are then served with the new certificate.
    took = time.monotonic()
    wait_for(lambda: _presented_leaf(mesh, beta_hbone) == new, mesh.beta, timeout=15)
    took = time.monotonic() - took
    fresh = round_trip(mesh.to_beta, b"after renewal")
    load.stop()
    failed = [t for t in load.transfers if not t.completed]
    lost = _lost_if_all_must_complete(load)
    record(
        "node under load (3 transfers)",
        f"certificate files replaced (cert_dir): new connections served with the new certificate after {took:.1f} s",
        survived=not failed and lost == 0 and fresh == b"after renewal",
        bytes_sent=load.sent,
        bytes_lost=lost,
        **_summary(load, len(failed)),
    )
    assert not failed, load.report()
    assert lost == 0 and fresh == b"after renewal"
    assert "certificate renewed" in mesh.beta.log()


def test_destination_node_sigkilled_mid_transfer(mesh: Mesh, record: Record) -> None:
    alpha_pid = mesh.alpha.proc.pid if mesh.alpha.proc else None
    to_beta = [(f"beta-{i}", mesh.to_beta) for i in range(3)]
    to_gamma = [(f"gamma-{i}", mesh.to_gamma) for i in range(2)]
    load = start_load([*to_beta, *to_gamma], rate=RATE)
    load.wait_progress(1 << 18)
    assert mesh.beta.proc is not None
    mesh.beta.proc.kill()
    mesh.beta.proc.wait(10)
    beta_t, gamma_t = load.transfers[:3], load.transfers[3:]
    # Bounded: every transfer to beta ends (alpha sees the HBONE connection die and closes ours).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(t.done.is_set() for t in beta_t):
        time.sleep(0.02)
    load.stop()
    hung = [t for t in load.transfers if t.hung]
    beta_failed = [t for t in beta_t if not t.completed]
    gamma_failed = [t for t in gamma_t if not t.completed]
    # alpha recovers without a restart: once beta is back, new connections to it work.
    mesh.beta.start()
    mesh.beta.wait_ready()
    recovered = time.monotonic()
    wait_for(lambda: round_trip(mesh.to_beta, b"back") == b"back", mesh.alpha, timeout=20)
    recovered = time.monotonic() - recovered
    same_alpha = (
        mesh.alpha.proc is not None and mesh.alpha.proc.pid == alpha_pid and mesh.alpha.proc.poll() is None
    )
    record(
        "node under load (3 transfers to beta, 2 to gamma)",
        f"destination node SIGKILLed mid-transfer: {len(beta_failed)}/3 to it ended early, "
        f"{len(gamma_failed)}/2 elsewhere failed; new connections after its restart in {recovered:.1f} s",
        survived=not hung and not gamma_failed and load.corrupted == 0 and same_alpha,
        bytes_sent=load.sent,
        bytes_lost=load.corrupted + sum(t.sent - t.received for t in gamma_failed),
        **_summary(load, len(beta_failed) + len(gamma_failed)),
    )
    assert not hung, load.report()
    assert load.corrupted == 0, load.report()
    assert len(beta_failed) == 3, load.report()  # all to the killed node, and only those
    assert not gamma_failed, load.report()
    assert all(t.received <= t.sent for t in beta_t)
    assert same_alpha
