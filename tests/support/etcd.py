"""Real etcd members (Debian's etcd-server) for discovery tests, and the TLS material they need.

The PKI mirrors docs/discovery.md: an *etcd CA* signs the members' server/peer certificates and an
operator's client certificate (CN=root); etcd trusts client certificates from the etcd CA and from
the *mesh CA*, so a meshd node talks to etcd with its own SPIFFE node certificate. Nothing here
starts meshd; etcd and etcdctl must be installed (.ci/run installs them): a missing one fails.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"


def require_etcd() -> None:
    missing = [p for p in (ETCD, ETCDCTL) if shutil.which(p) is None]
    if missing:
        raise AssertionError(
            f"{', '.join(missing)} not installed: apt-get install etcd-server etcd-client (.ci/run does)"
        )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


@dataclass
class EtcdPki:
    dir: Path
    ca_cert: Path
    trusted_clients: Path  # bundle: etcd CA + mesh CA
    _ca_key: ec.EllipticCurvePrivateKey
    _ca: x509.Certificate

    @classmethod
    def create(cls, dir: Path, mesh_ca_cert: Path) -> EtcdPki:
        dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test etcd CA")])
        now = datetime.datetime.now(datetime.UTC)
        ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        ca_path = dir / "etcd-ca.crt"
        ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        bundle = dir / "clients-ca.crt"
        bundle.write_bytes(ca_path.read_bytes() + mesh_ca_cert.read_bytes())
        return cls(dir, ca_path, bundle, key, ca)

    def issue(self, name: str, *, cn: str, ips: Sequence[str] = ()) -> tuple[Path, Path]:
        """A certificate (server + client auth) for `ips`, CN `cn`; returns (cert, key) paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self._ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        if ips:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(i)) for i in ips]),
                critical=False,
            )
        cert = builder.sign(self._ca_key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return cert_path, key_path


@dataclass
class EtcdMember:
    """One member's command line; `prefix` runs it elsewhere (e.g. ["ip", "netns", "exec", NS])."""

    name: str
    ip: str
    data_dir: Path
    pki: EtcdPki
    client_port: int = 2379
    peer_port: int = 2380
    prefix: Sequence[str] = ()
    extra_ips: Sequence[str] = ()  # more addresses its certificate names (a relay in front of it)
    proc: subprocess.Popen[bytes] | None = None
    cert: tuple[Path, Path] = field(init=False)

    def __post_init__(self) -> None:
        ips = [self.ip, *self.extra_ips]
        self.cert = self.pki.issue(f"member-{self.name}", cn=f"member-{self.name}", ips=ips)

    @property
    def client_url(self) -> str:
        return f"https://{self.ip}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://{self.ip}:{self.peer_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.with_suffix(".log")

    def start(self, cluster: Sequence[EtcdMember], *, auth_by_cert: bool = True) -> EtcdMember:
        require_etcd()
        cert, key = self.cert
        initial = ",".join(f"{m.name}={m.peer_url}" for m in cluster)
        cmd = [
            *self.prefix,
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", "meshd-test",
            "--cert-file", str(cert), "--key-file", str(key),
            "--trusted-ca-file", str(self.pki.trusted_clients),
            "--client-cert-auth" if auth_by_cert else "--client-cert-auth=false",
            "--peer-cert-file", str(cert), "--peer-key-file", str(key),
            "--peer-trusted-ca-file", str(self.pki.ca_cert),
            "--peer-client-cert-auth",
            # Short timeouts: members notice a lost quorum within seconds.
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Etcdctl:
    """etcdctl as an operator (CN=root, from the etcd CA): not a meshd node."""

    endpoints: Sequence[str]
    pki: EtcdPki
    prefix: Sequence[str] = ()
    cert: tuple[Path, Path] = field(init=False)

    def __post_init__(self) -> None:
        self.cert = self.pki.issue("operator", cn="root")

    def run(self, *args: str, check: bool = True, timeout: float = 15) -> str:
        cert, key = self.cert
        cmd = [
            *self.prefix,
            ETCDCTL,
            f"--endpoints={','.join(self.endpoints)}",
            f"--cacert={self.pki.ca_cert}",
            f"--cert={cert}",
            f"--key={key}",
            "--command-timeout=3s",
            *args,
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env={"ETCDCTL_API": "3"}, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def healthy(self) -> bool:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.run("endpoint", "health", timeout=10)
            return True
        return False

    def wait_healthy(self, timeout: float = 30.0, members: Sequence[EtcdMember] = ()) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return
            time.sleep(0.2)  # polling etcd's health, not standing in for it
        logs = "\n".join(f"--- {m.name} ---\n{m.log()[-2000:]}" for m in members)
        raise AssertionError(f"etcd not healthy within {timeout}s\n{logs}")


@contextlib.contextmanager
def etcd_cluster(members: Sequence[EtcdMember]) -> Iterator[Sequence[EtcdMember]]:
    for m in members:
        m.start(members)
    try:
        yield members
    finally:
        for m in members:
            m.stop()


class Relay:
    """A TCP forwarder (threads) between a client and an etcd member: a network the test can cut.
    `cut()` closes every relayed connection and refuses new ones until `restore()`."""

    def __init__(self, listen_ip: str, target: tuple[str, int]) -> None:
        self.target = target
        self._server = socket.create_server((listen_ip, 0))
        self._server.settimeout(0.2)
        self.address = self._server.getsockname()[:2]
        self._open = threading.Event()
        self._open.set()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://{self.address[0]}:{self.address[1]}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._open.is_set():
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()  # RST: "connection refused" as the client sees it, near enough
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._server.close()
        self._thread.join(2)


def enable_rbac(ctl: Etcdctl, prefix: str, passwords: dict[str, str]) -> None:
    """The RBAC set-up docs/discovery.md shows: every node reads the prefix and writes only its own key;
    root (the operator, by certificate CN over gRPC) keeps full access."""
    ctl.run("user", "add", "root", "--no-password")
    ctl.run("user", "grant-role", "root", "root")
    ctl.run("role", "add", "meshd-read")
    ctl.run("role", "grant-permission", "meshd-read", "read", "--prefix", prefix)
    for node, password in passwords.items():
        user = f"meshd-{node}"
        ctl.run("user", "add", user, f"--new-user-password={password}", "--interactive=false")
        ctl.run("role", "add", user)
        ctl.run("role", "grant-permission", user, "readwrite", f"{prefix}nodes/{node}")
        ctl.run("user", "grant-role", user, "meshd-read")
        ctl.run("user", "grant-role", user, user)
    ctl.run("auth", "enable")
