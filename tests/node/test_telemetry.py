"""Istio's labels as Istio writes them, and refusals that say who was refused, through real daemons:
alpha hosts two client workloads (`web` with app/version labels, `batch` without), each dialling
beta's echo through its own upstream; beta denies `batch`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshd.discovery.catalog import WorkloadEntry
from meshd.identity.ca import LocalCA
from meshd.identity.spiffe import SpiffeId
from meshd.observe.accesslog import WorkloadLabels
from meshd.tools.echo import echo_server
from tests.support.configs import ECHO_PORT, node_config
from tests.support.procs import Meshd, http_get, unique_loopback, wait_for
from tests.support.sockets import send_and_read

WEB_PORT, BATCH_PORT = 17100, 17101


@dataclass
class Pair:
    alpha: Meshd
    beta: Meshd
    alpha_ip: str

    def round_trip(self, port: int, data: bytes) -> bytes:
        return send_and_read((self.alpha_ip, port), data)


@pytest.fixture
def pair(tmp_path: Path, ca: LocalCA, daemons: list[Meshd]) -> Iterator[Pair]:
    a_ip, b_ip = unique_loopback(), unique_loopback()
    alpha_cfg = node_config(
        tmp_path / "alpha.toml",
        "alpha",
        tmp_path / "ca",
        peers=[f"{b_ip}:15008"],
        body=(
            f'[[workload]]\nname = "web"\nservice_account = "frontend"\naddress = "{a_ip}"\nports = [8000]\n'
            'labels = { app = "shop", version = "v3" }\n'
            f'[[workload]]\nname = "batch"\naddress = "{a_ip}"\nports = [8001]\n'
            f'[[upstream]]\nservice = "echo.default"\nport = {ECHO_PORT}\nlisten = "{a_ip}:{WEB_PORT}"\n'
            'workload = "web"\n'
            f'[[upstream]]\nservice = "echo.default"\nport = {ECHO_PORT}\nlisten = "{a_ip}:{BATCH_PORT}"\n'
            'workload = "batch"\n'
        ),
    )
    policy = tmp_path / "beta-policy"
    beta_cfg = node_config(
        tmp_path / "beta.toml",
        "beta",
        tmp_path / "ca",
        peers=[f"{a_ip}:15008"],
        policy_dir=policy,
        body=(
            f'[[workload]]\nname = "echo-v1"\nservice_account = "echo"\naddress = "{b_ip}"\nports = [{ECHO_PORT}]\n'
            'services = ["echo"]\nlabels = { "service.istio.io/canonical-name" = "echo-svc" }\n'
            f'[[service]]\nname = "echo"\nports = [{{ port = {ECHO_PORT} }}]\n'
        ),
    )
    (policy / "deny.toml").write_text(
        '[[authorization]]\nname = "no-batch"\nnamespace = "default"\naction = "DENY"\n'
        '[[authorization.rules]]\nfrom = [{ principals = ["home.arpa/ns/default/sa/batch"] }]\n'
    )
    with echo_server(b_ip, ECHO_PORT):
        beta = Meshd(beta_cfg, b_ip)
        alpha = Meshd(alpha_cfg, a_ip)
        daemons += [beta, alpha]
        beta.start()
        alpha.start()
        beta.wait_ready()
        alpha.wait_ready()
        # Each side names the other's workloads only once it has the other's catalog.
        wait_for(lambda: "batch.default" in catalog_workloads(beta), beta)
        wait_for(lambda: "echo-v1.default" in catalog_workloads(alpha), alpha)
        yield Pair(alpha, beta, a_ip)


def catalog_workloads(daemon: Meshd) -> list[str]:
    dump = json.loads(http_get(daemon.admin_url + "/config_dump")[1])
    return [w["workload"] for w in dump["catalog"]["workloads"]]


WEB_SOURCE = {
    "source_workload": "web",
    "source_workload_namespace": "default",
    "source_principal": "spiffe://home.arpa/ns/default/sa/frontend",
    "source_canonical_service": "shop",
    "source_canonical_revision": "v3",
    "source_app": "shop",
    "source_version": "v3",
    "source_cluster": "home.arpa",
}
ECHO_DESTINATION = {
    "destination_workload": "echo-v1",
    "destination_workload_namespace": "default",
    "destination_principal": "spiffe://home.arpa/ns/default/sa/echo",
    "destination_canonical_service": "echo-svc",
    "destination_canonical_revision": "latest",
    "destination_app": "echo-svc",
    "destination_version": "latest",
    "destination_cluster": "home.arpa",
    "destination_service": "echo.default",
    "destination_service_name": "echo",
    "destination_service_namespace": "default",
}


def test_tcp_metrics_carry_istio_workload_labels_at_both_ends(pair: Pair) -> None:
    assert pair.round_trip(WEB_PORT, b"labels") == b"labels"
    labels = {**WEB_SOURCE, **ECHO_DESTINATION, "request_protocol": "tcp", "response_flags": "-"}
    wait_for(
        lambda: pair.beta.metric("istio_tcp_connections_closed_total", reporter="destination", **labels) == 1,
        pair.beta,
    )
    assert pair.beta.metric("istio_tcp_received_bytes_total", reporter="destination", **labels) == 6
    wait_for(
        lambda: pair.alpha.metric("istio_tcp_connections_closed_total", reporter="source", **labels) == 1,
        pair.alpha,
    )


def test_a_denied_client_is_told_apart_in_metrics_and_access_log(pair: Pair) -> None:
    assert pair.round_trip(BATCH_PORT, b"x") == b""
    refused = {
        "reporter": "destination",
        "reason": "UAEX",
        # alpha's HBONE dial is not bound to its loopback address: the kernel picks 127.0.0.1
        "peer_address": "127.0.0.1",
        "source_workload": "batch",
        "source_workload_namespace": "default",
        "source_principal": "spiffe://home.arpa/ns/default/sa/batch",
        "destination_workload": "echo-v1",
        "destination_service": "echo.default",
    }
    wait_for(lambda: pair.beta.metric("meshd_tcp_connections_failed_total", **refused) == 1, pair.beta)
    # The allowed client is not counted as refused.
    assert pair.beta.metric("meshd_tcp_connections_failed_total", source_workload="web") == 0
    line = next(ln for ln in pair.beta.log().splitlines() if "connection failed" in ln and "no-batch" in ln)
    assert re.search(r"peer\.addr=127\.0\.0\.1:\d+ ", line), line
    assert "src.workload=batch" in line and "dst.workload=echo-v1" in line, line
    # The source side names the node it dialled and the workload it was refused for.
    wait_for(
        lambda: (
            pair.alpha.metric(
                "meshd_tcp_connections_failed_total",
                reporter="source",
                reason="UAEX",
                peer_address=pair.beta.ip,
                source_workload="batch",
            )
            == 1
        ),
        pair.alpha,
    )


@pytest.mark.parametrize(
    ("labels", "service", "revision"),
    [
        ({}, "web", "latest"),
        ({"app": "shop", "version": "v3"}, "shop", "v3"),
        (
            {"app.kubernetes.io/name": "k", "app": "a", "app.kubernetes.io/version": "9", "version": "v"},
            "k",
            "9",
        ),
        (
            {"service.istio.io/canonical-name": "c", "app": "a", "service.istio.io/canonical-revision": "r"},
            "c",
            "r",
        ),
        ({"app": "", "version": ""}, "web", "latest"),
    ],
)
def test_canonical_service_and_revision_follow_istios_label_order(
    labels: dict[str, str], service: str, revision: str
) -> None:
    w = WorkloadEntry("n", "web", "default", "sa", "10.0.0.1", (80,), (), tuple(sorted(labels.items())))
    assert WorkloadLabels.of(w, "home.arpa") == WorkloadLabels(
        "web", "default", service, revision, "home.arpa"
    )


def test_identities_without_a_catalog_workload() -> None:
    node = SpiffeId.node("home.arpa", "wp")
    assert WorkloadLabels.of_identity(node) == WorkloadLabels(
        "wp", "meshd-system", "wp", "latest", "home.arpa"
    )
    stranger = SpiffeId("home.arpa", "apps", "ghost")
    assert WorkloadLabels.of_identity(stranger) == WorkloadLabels(namespace="apps", cluster="home.arpa")
    assert WorkloadLabels.of_identity(None) == WorkloadLabels()
