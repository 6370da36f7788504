"""Real meshd daemons as subprocesses, and the readiness wait that replaces sleeps."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

_counter = itertools.count(1)


def unique_loopback() -> str:
    """A loopback address no other test (or xdist worker) uses: 127.<pid-ish>.<n>.<n>."""
    n = next(_counter)
    return f"127.{(os.getpid() % 200) + 20}.{n // 250}.{n % 250 + 2}"


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric_sum(exposition: bytes, name: str, **labels: str) -> float:
    """The sum of the samples of metric `name` that carry `labels`, in a Prometheus exposition."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in exposition.decode().splitlines()
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items())
    )


@dataclass
class Meshd:
    """One `meshd run` subprocess. Addresses come from its own config (ip = the loopback it uses)."""

    config: Path
    ip: str
    overrides: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # added to the daemon's environment
    log_path: Path | None = None
    wrapper: Sequence[str] = ()  # a command prefix, e.g. read_only_mount(...)
    port_offset: int = 0  # added to every listener's port: two daemons on one IP
    set_plaintext: bool = True  # False: listen.plaintext keeps its default (beside listen.hbone)

    @property
    def label(self) -> str:
        return f"{self.config.stem} ({self.ip})"

    def port(self, default: int) -> int:
        return default + self.port_offset

    @property
    def readiness_url(self) -> str:
        return f"http://{self.ip}:{self.port(15021)}/healthz/ready"

    @property
    def admin_url(self) -> str:
        return f"http://{self.ip}:{self.port(15000)}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.ip}:{self.port(15020)}/metrics"

    def start(self, *extra: str, subcommand: str | None = "run") -> Meshd:
        """Launch; `subcommand=None` runs `meshd -c FILE KEY=VALUE...` with no `run` word."""
        self.log_path = self.config.with_suffix(f".{self.ip}.log")
        listen = [
            f"listen.hbone={self.ip}:{self.port(15008)}",
            f"listen.admin={self.ip}:{self.port(15000)}",
            f"listen.metrics={self.ip}:{self.port(15020)}",
            f"listen.readiness={self.ip}:{self.port(15021)}",
        ]
        if self.set_plaintext:
            listen.append(f"listen.plaintext={self.ip}:{self.port(15006)}")
        cmd = [*self.wrapper, sys.executable, "-m", "meshd", *([subcommand] if subcommand else [])]
        cmd += ["-c", str(self.config), *listen, *self.overrides, *extra]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self, timeout: float = 20.0) -> Meshd:
        """Poll /healthz/ready until 200; fail with the daemon's log if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"meshd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = http_get(self.readiness_url, timeout=1.0)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)  # polling the readiness endpoint, not a stand-in for it
        raise AssertionError(f"meshd not ready after {timeout}s:\n{self.log()}")

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples that carry `labels`, from /metrics."""
        return metric_sum(http_get(self.metrics_url)[1], name, **labels)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"meshd did not exit within {timeout}s of SIGTERM:\n{self.log()}"
                ) from None
        self._log.close()
        return self.proc.returncode


def read_only_mount(*paths: Path) -> list[str]:
    """A command prefix that runs the command in its own mount namespace with `paths` read-only
    (as a unit's ProtectSystem= makes them). Root ignores file modes, so a mount is the real test."""
    script = " && ".join(f"mount --bind {p} {p} && mount -o remount,bind,ro {p}" for p in paths)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{script} && exec "$@"', "sh"]


def meshd_cli(
    *args: str, stdin: str | None = None, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`meshd ARGS...` as a user runs it (`env` added to the environment); stdout and stderr as text."""
    return subprocess.run(
        [sys.executable, "-m", "meshd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        input=stdin,
        cwd=cwd,
        env={**os.environ, **env} if env else None,
    )


class HasLog(Protocol):
    """A daemon whose log a failed wait shows: `Meshd`, a netns lab's `NsMeshd`, a container."""

    @property
    def label(self) -> str: ...
    def log(self) -> str: ...


def wait_for(
    condition: Callable[[], object],
    *logs: HasLog,
    timeout: float = 15.0,
    what: str = "condition",
    interval: float = 0.05,
) -> float:
    """Poll `condition` until it is true and return the seconds that took: the one wait the tests use
    instead of a sleep. On timeout, fail with `what` and the tail of each daemon's log."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(interval)
    tails = "".join(f"\n--- {d.label} ---\n{d.log()[-4000:]}" for d in logs)
    raise AssertionError(f"{what} not met within {timeout}s{tails}")


@contextmanager
def running(daemon: Meshd) -> Iterator[Meshd]:
    """Start a daemon, wait until it is ready, and stop it however the block ends."""
    daemon.start()
    try:
        yield daemon.wait_ready()
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
