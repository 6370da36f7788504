"""`meshd policy explain`: what the loaded policy decides for a connection or request, and why."""

from __future__ import annotations

import json
import sys

import click

from meshd.cli_admin import fetch_dump
from meshd.config.load import config_path, load_config
from meshd.config.model import Config, WorkloadConfig
from meshd.errors import ConfigError
from meshd.identity.spiffe import InvalidSpiffeId, SpiffeId
from meshd.policy.evaluate import ConnectionAttrs, RequestAttrs
from meshd.policy.explain import explain, render
from meshd.policy.load import load_policy_dir


@click.group()
def policy() -> None:
    """Inspect authorization policy."""


def _destinations(cfg: Config, to: str) -> tuple[list[WorkloadConfig], int]:
    target, sep, port_text = to.rpartition(":")
    if not sep or not port_text.isdigit():
        raise click.BadParameter(f"{to!r} is not SERVICE:PORT (e.g. echo.default:7000)", param_hint="--to")
    port = int(port_text)
    name, _, ns = target.partition(".")
    ns = ns or "default"
    key = f"{name}.{ns}"
    svc = next((s for s in cfg.services if s.key == key), None)
    target_port = next((p.target for p in svc.ports if p.port == port), port) if svc else port
    serving = [
        w
        for w in cfg.workloads
        if w.namespace == ns and (key in w.services or name in w.services) and target_port in w.ports
    ]
    named = [w for w in cfg.workloads if (w.name, w.namespace) == (name, ns) and port in w.ports]
    found = serving or named
    if not found:
        hosted = ", ".join(f"{w.name}.{w.namespace}:{list(w.ports)}" for w in cfg.workloads) or "none"
        raise click.ClickException(
            f"no workload in this config serves {key} port {port} (workloads here: {hosted}); "
            "policy is enforced where the workload runs: use that node's config"
        )
    return found, (target_port if serving else port)


@policy.command("explain")
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False), help="config file")
@click.option(
    "--admin",
    metavar="HOST:PORT",
    help="explain with the config a running meshd was started with (read from its /config_dump)",
)
@click.option("--from", "source", required=True, metavar="SPIFFE_ID", help="source identity, or 'plaintext'")
@click.option("--to", "to", required=True, metavar="SERVICE:PORT", help="e.g. echo.default:7000")
@click.option("--source-ip", default="127.0.0.1", show_default=True, help="source address (ip_blocks)")
@click.option("--method", help="HTTP method (evaluates as the waypoint)")
@click.option("--path", "path_", help="HTTP path (evaluates as the waypoint)")
@click.option("--host", help="HTTP host (evaluates as the waypoint)")
@click.option("--header", "headers", multiple=True, metavar="K=V", help="request header (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def policy_explain(
    config_file: str | None,
    admin: str | None,
    source: str,
    to: str,
    source_ip: str,
    method: str | None,
    path_: str | None,
    host: str | None,
    headers: tuple[str, ...],
    as_json: bool,
) -> None:
    """Evaluate the policy files of a config for one connection (or HTTP request) and explain it:
    the decision, the policy and rule that made it (file:line), and why every other policy did not."""
    overrides: list[str] = []
    if admin:
        dump = fetch_dump(admin)
        if not dump.get("config_file"):
            raise click.ClickException(f"the meshd at {admin} does not report its config file")
        config_file = dump["config_file"]
        overrides = list(dump.get("overrides", []))
    try:
        cfg = load_config(config_path(config_file), overrides)
        policies, _ = load_policy_dir(cfg.policy.dir, role="waypoint")
    except ConfigError as exc:
        for p in exc.problems:
            click.echo(p.format(), err=True)
        sys.exit(2)
    try:
        src = None if source == "plaintext" else SpiffeId.parse_principal(source)
    except InvalidSpiffeId as exc:
        raise click.BadParameter(str(exc), param_hint="--from") from None
    header_map: dict[str, str] = {}
    for h in headers:
        k, sep, v = h.partition("=")
        if not sep:
            raise click.BadParameter(f"{h!r} is not K=V", param_hint="--header")
        header_map[k.strip().lower()] = v
    l7 = any(x is not None for x in (method, path_, host)) or bool(header_map)
    workloads, port = _destinations(cfg, to)
    results = []
    for w in workloads:
        conn = ConnectionAttrs(
            source=src,
            source_ip=source_ip,
            destination_ip=w.address,
            destination_port=port,
            workload_namespace=w.namespace,
            workload_name=w.name,
            workload_labels=w.labels,
        )
        attrs: ConnectionAttrs | RequestAttrs = conn
        if l7:
            attrs = RequestAttrs(conn, (method or "GET").upper(), path_ or "/", host or to, header_map)
        results.append((w, explain(policies, attrs)))
    if as_json:
        out = [{"workload": f"{w.name}.{w.namespace}", **ex.to_json()} for w, ex in results]
        click.echo(json.dumps(out, indent=2))
    else:
        for w, ex in results:
            click.echo(f"{source} -> {w.name}.{w.namespace} ({w.address}:{port})")
            click.echo(render(ex))
    sys.exit(0 if all(ex.decision.allowed for _, ex in results) else 3)
