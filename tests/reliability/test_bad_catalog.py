"""A peer that serves a bad catalog: a real daemon (alpha) with a fake peer `mallory` (a real
HBONE server with a genuine node certificate from the mesh CA) as a static peer, next to a real
peer `beta` hosting echo. Whatever mallory serves, nothing bad enters alpha's catalog, each failed
fetch is counted, and alpha stays healthy and keeps routing to beta."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshd.discovery.catalog import MAX_CATALOG_BYTES
from meshd.identity.ca import LocalCA
from meshd.identity.spiffe import SpiffeId
from meshd.tools.echo import echo_server
from tests.reliability.fake_peer import FakePeer
from tests.reliability.load import round_trip
from tests.support.configs import ECHO_PORT
from tests.support.mesh import Mesh, Upstream, client_host, echo_host
from tests.support.procs import Meshd, http_get, unique_loopback, wait_for
from tests.support.reliability import Record

TD = "home.arpa"
UPSTREAM_PORT = 17000
FAILURES = "meshd_catalog_fetch_failures_total"


@dataclass
class World:
    alpha: Meshd
    beta: Meshd
    mallory: FakePeer
    upstream: tuple[str, int]
    tmp: Path

    def dump(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(http_get(self.alpha.admin_url + "/config_dump")[1])
        return result

    def mallory_peer(self) -> dict[str, Any]:
        want = f"{self.mallory.ip}:15008"
        return next(p for p in self.dump()["peers"] if p["address"] == want)

    def connect(self) -> socket.socket:
        return socket.create_connection(self.upstream, timeout=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("badcatalog")
    ca = LocalCA.init(tmp / "ca", TD)
    a_ip, b_ip, m_ip = unique_loopback(), unique_loopback(), unique_loopback()
    nodes = Mesh(
        tmp,
        [
            client_host(
                "alpha",
                a_ip,
                Upstream("echo.default", ECHO_PORT, f"{a_ip}:{UPSTREAM_PORT}"),
                more_peers=[f"{m_ip}:15008"],
            ),
            echo_host("beta", b_ip, ECHO_PORT),
        ],
    )
    mallory = FakePeer(m_ip, ca.issue(SpiffeId.node(TD, "mallory")), TD)
    mallory.set(b"not yet")
    with mallory, echo_server(b_ip, ECHO_PORT), nodes.running():
        alpha, beta = nodes["alpha"], nodes["beta"]
        w = World(alpha, beta, mallory, (a_ip, UPSTREAM_PORT), tmp)
        wait_for(lambda: w.dump()["catalog"]["nodes"] == ["alpha", "beta"], alpha)
        yield w


def catalog(node: str, *, td: str = TD, workloads: list[dict[str, Any]] | None = None, **extra: Any) -> bytes:
    doc: dict[str, Any] = {
        "version": 1,
        "node": node,
        "trust_domain": td,
        "role": "node",
        "hbone": "127.0.0.1:15008",
        "workloads": workloads if workloads is not None else [],
        "services": [],
        **extra,
    }
    return json.dumps(doc).encode()


def workload(name: str, address: str, services: list[str], **over: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": "default",
        "service_account": name,
        "address": address,
        "ports": [ECHO_PORT],
        "services": services,
        "labels": {},
        **over,
    }


def healthy(w: World) -> None:
    assert w.alpha.proc is not None and w.alpha.proc.poll() is None, w.alpha.log()[-3000:]
    assert http_get(w.alpha.readiness_url)[0] == 200
    for i in range(3):  # routed to beta's echo (mallory refuses tunnels: a reply proves it was beta)
        assert round_trip(w.connect, b"ping %d" % i) == b"ping %d" % i


def serve_and_expect_refusal(w: World, body: bytes | None, error: str, *, endless: bool = False) -> None:
    """Serve a bad catalog until alpha has fetched and refused it; nothing of it enters."""
    before = w.alpha.metric(FAILURES)
    served = w.mallory.set(body, endless=endless)
    wait_for(
        lambda: (
            w.mallory.served >= served + 1
            and w.alpha.metric(FAILURES) >= before + 1
            and error in (w.mallory_peer()["last_error"] or "")
        ),
        w.alpha,
    )
    dump = w.dump()
    assert dump["catalog"]["nodes"] == ["alpha", "beta"]
    assert {x["workload"]: x["node"] for x in dump["catalog"]["workloads"]} == {
        "client.default": "alpha",
        "echo.default": "beta",
    }
    assert dump["catalog"]["services"] == ["echo.default"]
    assert w.mallory_peer()["name"] is None
    healthy(w)


def _bad_bodies(w: World) -> list[tuple[str, bytes, str]]:
    m = w.mallory.ip
    big = catalog(
        "mallory", workloads=[workload("big", m, [], labels={"pad": "x" * (MAX_CATALOG_BYTES + 1)})]
    )
    return [
        # Ordered so that no two in a row fail with the same words (each wait sees its own refusal).
        ("over 4 MiB (valid JSON otherwise)", big, "4194304"),
        ("truncated JSON", catalog("mallory")[:-9], "not JSON"),
        ("JSON array", b"[1, 2, 3]", "unsupported catalog version"),
        (
            "service account a number",
            catalog("mallory", workloads=[workload("x", m, [], service_account=5)]),
            "malformed",
        ),
        ("not UTF-8", b"\xff\xfe\x00" * 1000, "not JSON"),
        ("wrong version", catalog("mallory", version=2), "unsupported catalog version"),
        ("port 70000", catalog("mallory", workloads=[workload("x", m, [], ports=[70000])]), "malformed"),
        ("other trust domain", catalog("mallory", td="evil.example"), "trust domain"),
        ("address not an IP", catalog("mallory", workloads=[workload("x", "evil.example", [])]), "malformed"),
        (
            "claims to be node beta (its certificate says mallory)",
            catalog("beta", workloads=[workload("echo", m, ["echo.default"])]),
            "claims node 'beta'",
        ),
        ("missing services", json.dumps({"version": 1, "node": "mallory"}).encode(), "malformed"),
    ]


def test_bad_catalogs_never_enter(world: World, record: Record) -> None:
    for what, body, error in _bad_bodies(world):
        serve_and_expect_refusal(world, body, error)
        record(
            "catalog fetch (peer)", f"catalog {what}: refused, fetch failure counted", bytes_sent=len(body)
        )


def test_endless_catalog_body_is_cut_off(world: World, record: Record) -> None:
    peak = _kib(world.alpha, "VmHWM")  # the peak: a fetch that buffers junk frees it afterwards
    serve_and_expect_refusal(world, None, "larger than", endless=True)
    grown = (_kib(world.alpha, "VmHWM") - peak) / 1024
    assert grown < 16, f"alpha's peak RSS grew {grown:.0f} MiB fetching an endless catalog"
    record(
        "catalog fetch (peer)",
        f"catalog body that never ends: cut off (peak RSS +{grown:.0f} MiB)",
        bytes_sent=world.mallory.streamed,
    )


def test_catalog_claiming_other_nodes_workloads(world: World, record: Record) -> None:
    m = world.mallory.ip
    body = catalog(
        "mallory",
        workloads=[
            workload("client", m, []),  # alpha's own: ours wins
            workload("echo", m, ["echo.default"]),  # beta's: the lower node name (beta) wins
            workload("extra", m, []),  # new: accepted
        ],
        services=[
            {
                "name": "echo",
                "namespace": "default",
                "ports": [{"port": 1, "target_port": 1, "protocol": "tcp"}],
            }
        ],
    )
    world.mallory.set(body)
    wait_for(lambda: "mallory" in world.dump()["catalog"]["nodes"], world.alpha)
    cat = world.dump()["catalog"]
    owners = {x["workload"]: x["node"] for x in cat["workloads"]}
    assert owners == {"client.default": "alpha", "echo.default": "beta", "extra.default": "mallory"}
    conflicts = "\n".join(cat["conflicts"])
    assert "workload client.default: claimed by node mallory and node alpha; keeping alpha" in conflicts
    assert "workload echo.default: claimed by node mallory and node beta; keeping beta" in conflicts
    assert "service echo.default: node mallory defines it differently" in conflicts
    assert "catalog conflict" in world.alpha.log()
    healthy(world)  # echo still reaches beta's echo, on the port beta defined
    record(
        "catalog fetch (peer)", "catalog claiming other nodes' workloads and services: ours/lowest name kept"
    )


def _kib(d: Meshd, field: str) -> int:
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")
