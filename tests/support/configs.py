"""Config text for test daemons: one place that knows the TOML shape the tests use."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from meshd.config.load import load_config
from meshd.config.model import Config
from meshd.errors import ConfigError
from meshd.identity.ca import LocalCA
from tests.support.paths import REPO
from tests.support.procs import Meshd

ECHO_PORT = 7000


def load_text(tmp: Path, text: str, *overrides: str) -> Config:
    """`text` written as tmp/meshd.toml and loaded, with `overrides` (KEY=VALUE) on top."""
    path = tmp / "meshd.toml"
    path.write_text(text)
    return load_config(path, overrides)


def problems_in(tmp: Path, text: str, *overrides: str) -> list[str]:
    """What loading `text` (see load_text) reports: each problem formatted, the file's path written F."""
    with pytest.raises(ConfigError) as info:
        load_text(tmp, text, *overrides)
    return [p.format().replace(str(tmp / "meshd.toml"), "F") for p in info.value.problems]


def node_config(
    path: Path,
    name: str,
    ca_dir: Path,
    *,
    peers: Sequence[str] = (),
    policy_dir: Path | None = None,
    body: str = "",
    trust_domain: str = "home.arpa",
) -> Path:
    """Write a node config (static peers only, mDNS off) and return its path."""
    peer_list = ", ".join(f'"{p}"' for p in peers)
    text = (
        f'trust_domain = "{trust_domain}"\nnode_name = "{name}"\n'
        f'[identity]\nca_dir = "{ca_dir}"\n'
        f'[discovery]\nmdns = false\npeers = [{peer_list}]\nrefresh = "1s"\n'
    )
    if policy_dir is not None:
        policy_dir.mkdir(exist_ok=True)
        text += f'[policy]\ndir = "{policy_dir}"\n'
    path.write_text(text + body)
    return path


def echo_workload(ip: str, port: int = ECHO_PORT) -> str:
    """An `echo` workload at ip:port serving the `echo` service (namespace default)."""
    return (
        f'[[workload]]\nname = "echo"\naddress = "{ip}"\nports = [{port}]\nservices = ["echo"]\n'
        f'[[service]]\nname = "echo"\nports = [{{ port = {port} }}]\n'
    )


def example_node(tmp_path: Path, ca: LocalCA, ip: str, *extra: str) -> Meshd:
    """configs/meshd.toml as shipped, on its own loopback address and the CA `ca` made at tmp_path/ca.
    Its [[upstream]] listener moves from 127.0.0.1:17000 to ip:17000, so suites running side by side
    (or a meshd on this machine) never contend for the port."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    config = tmp_path / "configs" / "meshd.toml"
    text = config.read_text()
    assert 'listen = "127.0.0.1:17000"' in text, "configs/meshd.toml's upstream listener moved"
    config.write_text(text.replace('listen = "127.0.0.1:17000"', f'listen = "{ip}:17000"'))
    return Meshd(
        config, ip, [f"identity.ca_dir={tmp_path / 'ca'}", f"node_name=n{ip.replace('.', '-')}", *extra]
    )
