"""Debian 12 hosts booted by a real systemd, for the package and unit tests (tests/test_deb.py).

This machine's PID 1 is not systemd, but a container boots one: a bookworm root made once by debootstrap
(cached under /var/cache/meshd-tests, keyed by everything that goes into it), an overlay per container so
the cache stays clean, `systemd-nspawn -b` on it, and `nsenter` into its namespaces to drive systemctl,
apt, dpkg and journalctl exactly as an admin's shell would.

Network: every container has a private network namespace (loopback only), or one we create here and join
to another by a veth pair with addresses from 10.213.0.0/24; nothing else on the host is touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support.procs import wait_for

CACHE = Path(os.environ.get("MESHD_TEST_CACHE", "/var/cache/meshd-tests"))
SUITE = "bookworm"
# What an admin's bookworm host has before `apt install ./meshd_*.deb`: a booted systemd, and the
# package's Depends (installed from the mirror here, because the containers have no route to it).
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "passwd", "iproute2")
_BUILDER = 1  # bump when the preparation below changes
_names = itertools.count(1)


def host_tools_missing() -> list[str]:
    return [t for t in ("debootstrap", "systemd-nspawn", "nsenter", "dpkg-deb", "ip") if not shutil.which(t)]


def debian_mirror() -> str:
    """The Debian mirror apt on this machine already uses for bookworm (deb822 or one-line sources)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(.+)$", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                for uri in uris.group(1).split():
                    if uri.rstrip("/").endswith("/debian"):
                        return uri
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s", text, re.M):
            if m.group(2) == SUITE and m.group(1).rstrip("/").endswith("/debian"):
                return m.group(1)
    raise RuntimeError("no Debian bookworm mirror in /etc/apt/sources.list*")


def cached_root() -> Path:
    """The bootstrapped bookworm root, made on first use (~2-3 min) and reused while its key matches."""
    mirror = debian_mirror()
    key = hashlib.sha256(json.dumps([SUITE, mirror, sorted(PACKAGES), _BUILDER]).encode()).hexdigest()[:16]
    root = CACHE / f"{SUITE}-{key}"
    if (root / ".meshd-test-root").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest run may be building it right now
        if (root / ".meshd-test-root").exists():
            return root
        for stale in CACHE.glob("tmp-*"):  # left by an interrupted run (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = CACHE / f"tmp-{key}-{os.getpid()}"
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(tmp), mirror],
            check=True,
            capture_output=True,
            timeout=1200,
        )
        (tmp / "etc/hostname").write_text("meshd-test\n")
        # Nothing in a test container needs a login prompt on the console, or apt's timers.
        for unit in ("console-getty.service", "apt-daily.timer", "apt-daily-upgrade.timer"):
            (tmp / "etc/systemd/system" / unit).unlink(missing_ok=True)
            (tmp / "etc/systemd/system" / unit).symlink_to("/dev/null")
        shutil.rmtree(tmp / "var/cache/apt/archives", ignore_errors=True)
        (tmp / "var/cache/apt/archives/partial").mkdir(parents=True)
        (tmp / ".meshd-test-root").write_text(f"{SUITE} {mirror} {' '.join(PACKAGES)}\n")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return root


class Container:
    """One booted bookworm host: an overlay of the cached root, systemd as its PID 1."""

    def __init__(self, base: Path, work: Path, netns: str | None = None) -> None:
        self.name = f"meshd-t{os.getpid()}-{next(_names)}"
        self.work = work
        self.netns = netns
        self.root = work / "root"
        self.log_path = work / "console.log"
        for d in ("upper", "ovl-work", "root"):
            (work / d).mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "mount", "-t", "overlay", "overlay", "-o",
                f"lowerdir={base},upperdir={work / 'upper'},workdir={work / 'ovl-work'}", str(self.root),
            ],
            check=True,
        )  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    def boot(self) -> None:
        net = [f"--network-namespace-path=/run/netns/{self.netns}"] if self.netns else ["--private-network"]
        nspawn = ["systemd-nspawn", "--register=no", "--keep-unit", "-q", f"--machine={self.name}", *net]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*nspawn, "-D", str(self.root), "-b", "--console=pipe"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._find_pid1, timeout=30, what=f"{self.name}: systemd as the container's PID 1")
        wait_for(self._booted, timeout=90, interval=0.5, what=f"{self.name}: is-system-running")

    def _find_pid1(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited {self.proc.returncode}:\n{self.console()}")
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError):
                text = status.read_text()
                ppid = re.search(r"^PPid:\s*(\d+)", text, re.M)
                nspid = re.search(r"^NSpid:\s*(\d+)\s+1$", text, re.M)
                if ppid and nspid and int(ppid.group(1)) == self.proc.pid:
                    self.pid1 = int(nspid.group(1))
                    return True
        return False

    def _booted(self) -> bool:
        out = self.sh("systemctl is-system-running", check=False).stdout.strip()
        return out in ("running", "degraded")

    def run(
        self, *argv: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        env["DEBIAN_FRONTEND"] = "noninteractive"
        out = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            input=input,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"{self.name}: {argv} exited {out.returncode}\n{out.stdout}\n{out.stderr}")
        return out

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-ec", script, check=check, timeout=timeout)

    def put(self, src: Path, dest: str) -> None:
        """Copy a host file into the container (as `scp` to the box would)."""
        target = self.root / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-o", "cat", check=False).stdout

    def console(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.pid1:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid1, 38)  # SIGRTMIN+4: systemd's "poweroff"
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        subprocess.run(["umount", "-l", str(self.root)], check=False)
        shutil.rmtree(self.work, ignore_errors=True)


@contextlib.contextmanager
def veth_pair(prefix: str) -> Iterator[tuple[str, str]]:
    """Two network namespaces joined by a veth pair: 10.213.0.1/24 and 10.213.0.2/24, loopback up."""
    a, b = f"{prefix}a", f"{prefix}b"
    try:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(
            ["ip", "-n", a, "link", "add", "host0", "type", "veth", "peer", "name", "host0", "netns", b],
            check=True,
        )
        for ns, addr in ((a, "10.213.0.1/24"), (b, "10.213.0.2/24")):
            subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", "host0"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "host0", "up"], check=True)
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
