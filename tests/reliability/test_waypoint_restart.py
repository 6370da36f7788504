"""A waypoint restarted under HTTP load: client -> alpha -> HBONE -> wp -> HBONE -> beta -> backend.
SIGKILL: requests while it is down fail cleanly (a 5xx or a connection error), none hangs (each is
bounded by a client timeout, which would count as a hang), and once the new waypoint is ready the
requests after it succeed, with no daemon restarted but the waypoint. SIGTERM: the same, and the
requests in flight when it was told to stop are answered (the drain lets them finish), exit 0."""

from __future__ import annotations

import http.client
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.support.http_backend import Backend, http_backend
from tests.support.mesh import Port, reviews, waypoint_path
from tests.support.procs import Meshd, unique_loopback, wait_for
from tests.support.reliability import Record

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PORT = 9080
UPSTREAM = 17080
CLIENT_TIMEOUT = 10.0


@dataclass
class Outcome:
    started: float
    status: int | None  # None: a connection error
    error: str = ""
    body: bytes = b""


@dataclass
class WaypointPath:
    alpha: Meshd
    beta: Meshd
    wp: Meshd
    http: tuple[str, int]
    backend: Backend


def get(mesh: WaypointPath, path: str) -> Outcome:
    """One request on a new connection (so a result belongs to this request alone)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(*mesh.http, timeout=CLIENT_TIMEOUT)
    try:
        conn.request("GET", path, headers={"connection": "close"})
        resp = conn.getresponse()
        return Outcome(started, resp.status, body=resp.read())
    except TimeoutError as exc:
        return Outcome(started, None, f"timeout: {exc}")
    except (OSError, http.client.HTTPException) as exc:
        return Outcome(started, None, f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


@dataclass
class HttpLoad:
    mesh: WaypointPath
    workers: int = 4
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> HttpLoad:
        for i in range(self.workers):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _run(self, worker: int) -> None:
        n = 0
        while not self.stop.is_set():
            out = get(self.mesh, f"/load/{worker}/{n}")
            with self.lock:
                self.outcomes.append(out)
            n += 1

    def ok(self) -> int:
        with self.lock:
            return sum(o.status == 200 for o in self.outcomes)

    def finish(self) -> list[Outcome]:
        self.stop.set()
        for t in self.threads:
            t.join(CLIENT_TIMEOUT + 5)
        assert not any(t.is_alive() for t in self.threads), "a request outlived its own timeout"
        return self.outcomes


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WaypointPath]:
    tmp = tmp_path_factory.mktemp("wprestart")
    a_ip, r_ip = unique_loopback(), unique_loopback()
    nodes = waypoint_path(tmp, a_ip, reviews("v1", r_ip, PORT), Port(PORT, "http"), UPSTREAM)
    with http_backend("reviews-v1", r_ip, PORT) as backend, nodes.running():
        m = WaypointPath(nodes["alpha"], nodes["beta"], nodes["wp"], (a_ip, UPSTREAM), backend)
        wait_for(lambda: get(m, "/warm").status == 200, m.alpha)
        yield m


def test_waypoint_sigkilled_and_restarted_under_http_load(mesh: WaypointPath, record: Record) -> None:
    pids = {d.config.stem: d.proc.pid for d in (mesh.alpha, mesh.beta) if d.proc}
    load = HttpLoad(mesh).start()
    wait_for(lambda: load.ok() >= 20, mesh.alpha)
    assert mesh.wp.proc is not None
    killed_at = time.monotonic()
    mesh.wp.proc.kill()
    mesh.wp.proc.wait(10)
    wait_for(lambda: any(o.started > killed_at and o.status != 200 for o in list(load.outcomes)), mesh.alpha)
    mesh.wp.start()
    mesh.wp.wait_ready()
    ready_at = time.monotonic()
    first = [get(mesh, f"/after/{i}") for i in range(5)]  # the first requests once it is ready
    wait_for(
        lambda: sum(o.started > ready_at and o.status == 200 for o in list(load.outcomes)) >= 20, mesh.alpha
    )
    outcomes = load.finish()

    hung = [o for o in outcomes if o.error.startswith("timeout")]
    unclean = [o for o in outcomes if o.status is not None and o.status != 200 and o.status < 500]
    down = [o for o in outcomes if killed_at <= o.started < ready_at]
    failed_during = [o for o in down if o.status != 200]
    after = [o for o in outcomes if o.started >= ready_at] + first
    failed_after = [o for o in after if o.status != 200]
    same = all(d.proc is not None and d.proc.pid == pids[d.config.stem] for d in (mesh.alpha, mesh.beta))
    record(
        "waypoint under HTTP load (4 clients)",
        f"waypoint SIGKILLed and restarted: {len(failed_during)}/{len(down)} requests while down failed "
        f"cleanly ({sum(o.status is not None for o in failed_during)} 5xx, "
        f"{sum(o.status is None for o in failed_during)} connection errors), "
        f"{len(failed_after)}/{len(after)} after ready failed",
        survived=not hung and not unclean and not failed_after and same,
        requests=len(outcomes) + len(first),
        requests_failed=len([o for o in outcomes if o.status != 200]),
    )
    assert not hung, hung[:3]
    assert not unclean, unclean[:3]  # a failure is a 5xx or a connection error, never a 4xx or a 200 lie
    assert all(o.body.startswith(b"reviews-v1 GET") for o in outcomes + first if o.status == 200)
    assert not failed_after, (failed_after[:3], mesh.alpha.log()[-2000:])
    assert same


def test_waypoint_drained_with_sigterm_under_http_load(mesh: WaypointPath, record: Record) -> None:
    load = HttpLoad(mesh).start()
    wait_for(lambda: load.ok() >= 20, mesh.alpha)
    slow: list[Outcome] = []
    # Two requests the backend answers after 1.5 s: in flight when the waypoint is told to stop.
    threads = [
        threading.Thread(target=lambda i=i: slow.append(get(mesh, f"/slow?ms=1500&n={i}")), daemon=True)
        for i in range(2)
    ]
    for t in threads:
        t.start()
    wait_for(lambda: sum(p.startswith("/slow") for p in mesh.backend.paths()) >= 2, mesh.wp)
    assert mesh.wp.proc is not None
    stopped_at = time.monotonic()
    mesh.wp.signal(signal.SIGTERM)
    exit_code = mesh.wp.proc.wait(20)
    exited_at = time.monotonic()
    for t in threads:
        t.join(CLIENT_TIMEOUT + 5)
    mesh.wp.start()
    mesh.wp.wait_ready()
    ready_at = time.monotonic()
    wait_for(
        lambda: sum(o.started > ready_at and o.status == 200 for o in list(load.outcomes)) >= 20, mesh.alpha
    )
    outcomes = load.finish()

    hung = [o for o in outcomes + slow if o.error.startswith("timeout")]
    unclean = [o for o in outcomes if o.status is not None and o.status != 200 and o.status < 500]
    down = [o for o in outcomes if stopped_at <= o.started < ready_at]
    failed_during = [o for o in down if o.status != 200]
    failed_after = [o for o in outcomes if o.started >= ready_at and o.status != 200]
    record(
        "waypoint under HTTP load (4 clients + 2 slow requests)",
        f"waypoint SIGTERMed (drained, exit {exit_code} after {exited_at - stopped_at:.1f} s) and restarted: "
        f"{sum(o.status == 200 for o in slow)}/2 requests in flight answered, "
        f"{len(failed_during)}/{len(down)} requests while down failed cleanly, "
        f"{len(failed_after)} after ready failed",
        survived=exit_code == 0
        and not hung
        and not unclean
        and not failed_after
        and len(slow) == 2
        and all(o.status == 200 for o in slow),
        requests=len(outcomes) + len(slow),
        requests_failed=len([o for o in outcomes + slow if o.status != 200]),
    )
    assert exit_code == 0
    assert [o.status for o in slow] == [200, 200], slow  # the drain let them finish
    assert all(o.body.startswith(b"reviews-v1 GET /slow") for o in slow)
    assert not hung, hung[:3]
    assert not unclean, unclean[:3]
    assert not failed_after, (failed_after[:3], mesh.alpha.log()[-2000:])
