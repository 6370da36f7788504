"""`meshd status`, `meshd peers`, `meshd services`: read a running meshd's admin API (/config_dump).

Human tables by default, `--json` for scripts. The admin address comes from `--admin`, else from
the config file (`-c`, $MESHD_CONFIG, /etc/meshd/meshd.toml) when it exists, else 127.0.0.1:15000.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from meshd.config.load import config_path, load_config
from meshd.errors import ConfigError
from meshd.units import Address, plural

DEFAULT_ADMIN = "127.0.0.1:15000"


def _admin_address(admin: str | None, config_file: str | None) -> str:
    if admin:
        return admin
    path = config_path(config_file)
    if config_file or path.exists():
        try:
            return str(load_config(path).listen.admin)
        except ConfigError as exc:
            raise click.ClickException(f"{exc} (or pass --admin HOST:PORT)") from None
    return DEFAULT_ADMIN


def fetch_dump(address: str) -> dict[str, Any]:
    data: dict[str, Any] = fetch_json(address, "/config_dump")
    return data


def fetch_json(address: str, path: str) -> Any:
    """GET a JSON endpoint of a running meshd's admin API; a ClickException saying what to check."""
    url = f"http://{address}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.load(resp)
    except (urllib.error.URLError, OSError) as exc:
        raise click.ClickException(
            f"cannot reach meshd's admin API at {address}: {exc} (is meshd running? pass --admin HOST:PORT)"
        ) from None


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _expires_in(iso: str) -> str:
    left = datetime.fromisoformat(iso) - datetime.now(UTC)
    secs = int(left.total_seconds())
    if secs <= 0:
        return "EXPIRED"
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m"


def status_text(d: dict[str, Any]) -> str:
    conns = d.get("connections", {})
    lines = [
        f"meshd {d['version']}  role {d['role']}  node {d['node_name']}  "
        f"{'ready' if d['ready'] else 'NOT READY'}  up {d['uptime_s']}s",
        f"{plural(len(d.get('peers', [])), 'peer')}, {plural(len(d['catalog']['services']), 'service')}, "
        f"{plural(len(d['catalog']['workloads']), 'workload')}; "
        f"connections: {conns.get('proxied', 0)} proxied now, "
        f"{conns.get('hbone_inbound', {}).get('connections', 0)} HBONE in, "
        f"{conns.get('pool', {}).get('connections', 0)} HBONE out",
        "",
        table(
            [
                (ident, c["not_after"], _expires_in(c["not_after"]), c["last_error"])
                for ident, c in d["certificates"].items()
            ],
            ["identity", "not after", "expires in", "last renewal error"],
        ),
    ]
    lines += etcd_lines(d.get("etcd"))
    if d["catalog"].get("conflicts"):
        lines += ["", "catalog conflicts:", *(f"  {c}" for c in d["catalog"]["conflicts"])]
    lines += reload_lines(d.get("reload") or {})
    return "\n".join(lines)


def etcd_lines(etcd: dict[str, Any] | None) -> list[str]:
    """One line on the etcd rendezvous (discovery.etcd): connected, or since when it is not."""
    if not etcd:
        return []
    entries = len(etcd.get("entries") or {})
    if etcd["connected"]:
        return [
            f"etcd: connected to {etcd['endpoint']}, revision {etcd['revision']}, {plural(entries, 'peer entry', 'peer entries')}"
        ]
    for_s = etcd.get("for_s")
    since = f" for {for_s}s" if for_s is not None else ""
    return [
        f"etcd: UNREACHABLE{since} ({etcd.get('last_error')}); serving from the last catalog, retrying",
    ]


def reload_lines(reload: dict[str, Any]) -> list[str]:
    """The last reload, and a refused one (kept until a later reload applies): what, when, where."""
    out = []
    last, refused = reload.get("last"), reload.get("refused")
    if last and last is not refused and last["result"] == "applied":
        out += ["", f"last reload: applied at {last['at']} ({last['trigger']})"]
    if refused:
        out += [
            "",
            f"RELOAD REFUSED at {refused['at']} ({refused['trigger']}); the config and policy from before stay in force:",
            *(f"  {p}" for p in refused["problems"]),
        ]
    return out


def peers_text(d: dict[str, Any]) -> str:
    rows = [
        (p["name"], p["address"], p["role"], p["how"], p["last_seen_s_ago"], p["revision"], p["last_error"])
        for p in d.get("peers", [])
    ]
    return table(rows, ["name", "address", "role", "found by", "last seen (s ago)", "revision", "last error"])


def _ports(entry: dict[str, Any]) -> str:
    """ "80->8080/http, 7000/tcp": service port, the workloads' port when it differs, protocol."""
    out = []
    for p in entry["ports"]:
        target = f"->{p['target_port']}" if p["target_port"] != p["port"] else ""
        out.append(f"{p['port']}{target}/{p['protocol']}")
    return ", ".join(out)


def services_text(d: dict[str, Any]) -> str:
    by_service: dict[str, list[str]] = {s: [] for s in d["catalog"]["services"]}
    for w in d["catalog"]["workloads"]:
        for s in w["services"]:
            by_service.setdefault(s, []).append(f"{w['workload']}@{w['node']}")
    # An older daemon's dump has no service_entries: its ports and waypoint show as "-".
    entries = {e["service"]: e for e in d["catalog"].get("service_entries", [])}
    waypoints = d["catalog"].get("waypoints", {})

    def waypoint(s: str) -> str | None:
        w = waypoints.get(s)
        if w is not None:
            return f"{w['waypoint']} (by {w['binding']})"
        return "none" if s in entries else None

    rows = [
        (
            s,
            _ports(entries[s]) if s in entries else None,
            waypoint(s),
            len(eps),
            ", ".join(eps) or "(no endpoints)",
        )
        for s, eps in sorted(by_service.items())
    ]
    return table(rows, ["service", "ports", "waypoint", "endpoints", "workloads"])


def _command(
    name: str, render: Callable[[dict[str, Any]], str], select: Callable[[dict[str, Any]], Any], doc: str
) -> click.Command:
    @click.command(name, help=doc)
    @click.option("--admin", metavar="HOST:PORT", help="admin API address (default: from the config file)")
    @click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False), help="config file")
    @click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
    def command(admin: str | None, config_file: str | None, as_json: bool) -> None:
        dump = fetch_dump(_admin_address(admin, config_file))
        if as_json:
            json.dump(select(dump), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            click.echo(render(dump))

    return command


status = _command(
    "status", status_text, lambda d: d, "Role, identity expiry, peers, services and connection counts."
)
_peers = _command(
    "peers", peers_text, lambda d: d.get("peers", []), "The peers this meshd knows, and how it found them."
)

_WILDCARDS = ("0.0.0.0", "::", "")


def prometheus_sd(d: dict[str, Any]) -> list[dict[str, Any]]:
    """Prometheus file_sd groups: this meshd and every peer whose catalog names its metrics address.
    This meshd's own wildcard metrics address is given as its HBONE host (127.0.0.1 if that is a
    wildcard too: the file is read by a Prometheus on this host)."""
    config = d["config"]
    own = Address.parse(d["listeners"].get("metrics") or config["listen"]["metrics"])
    hbone = Address.parse(config["listen"]["hbone"])
    if own.host in _WILDCARDS:
        own = Address(hbone.host if hbone.host not in _WILDCARDS else "127.0.0.1", own.port)
    groups = [
        {
            "targets": [str(own)],
            "labels": {"meshd_node": d["node_name"], "meshd_role": d["role"], "meshd_found_by": "self"},
        }
    ]
    for p in d.get("peers", []):
        if p.get("metrics") and p.get("name"):
            labels = {"meshd_node": p["name"], "meshd_role": p["role"], "meshd_found_by": p["how"]}
            groups.append({"targets": [p["metrics"]], "labels": labels})
    return groups


def write_atomically(path: Path, text: str) -> None:
    """Prometheus re-reads a file_sd file when it changes: it must never see half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


@click.command("peers", help=_peers.help)
@click.option("--admin", metavar="HOST:PORT", help="admin API address (default: from the config file)")
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False), help="config file")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option(
    "--prometheus-sd",
    "sd_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="write a Prometheus file_sd JSON file of this meshd's and its peers' metrics endpoints",
)
def peers(admin: str | None, config_file: str | None, as_json: bool, sd_file: Path | None) -> None:
    dump = fetch_dump(_admin_address(admin, config_file))
    if sd_file is not None:
        groups = prometheus_sd(dump)
        try:
            write_atomically(sd_file, json.dumps(groups, indent=2) + "\n")
        except OSError as exc:
            raise click.ClickException(f"cannot write {sd_file}: {exc.strerror or exc}") from None
        click.echo(f"{sd_file}: {plural(len(groups), 'target')}")
    elif as_json:
        json.dump(dump.get("peers", []), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        click.echo(peers_text(dump))


services = _command(
    "services", services_text, lambda d: d["catalog"], "Services in the merged catalog and their endpoints."
)
