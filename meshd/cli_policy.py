"""`meshd policy explain`: what the loaded policy decides for a connection or request, and why."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import click

from meshd.config.load import config_path, load_config
from meshd.discovery.catalog import local_catalog, merge
from meshd.discovery.vip import VipIndex
from meshd.errors import ConfigError
from meshd.policy.istio_import import Options, convert
from meshd.policy.load import load_policy_dir
from meshd.policy.query import ExplainQuery, NotServedHere, QueryError, answer, parse_headers
from meshd.waypoint.explain import explain_request


@click.group()
def policy() -> None:
    """Inspect authorization policy."""


@policy.command("explain")
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False), help="config file")
@click.option(
    "--admin",
    metavar="HOST:PORT",
    help="ask a running meshd: its in-memory config and policy (GET /policy/explain on its admin API)",
)
@click.option("--from", "source", required=True, metavar="SPIFFE_ID", help="source identity, or 'plaintext'")
@click.option("--to", "to", required=True, metavar="SERVICE:PORT", help="e.g. echo.default:7000")
@click.option(
    "--source-ip",
    help="the client's address (ip_blocks, when source.ip); without it 127.0.0.1 is evaluated and the "
    "answer says whether the address matters",
)
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
    source_ip: str | None,
    method: str | None,
    path_: str | None,
    host: str | None,
    headers: tuple[str, ...],
    as_json: bool,
) -> None:
    """Evaluate the policy files of a config for one connection (or HTTP request) and explain it:
    the decision, the policy and rule that made it (file:line), and why every other policy did not.
    Against a waypoint (its config, or --admin of a running one): the HTTP request as the waypoint
    decides it, for every workload of the service, and the route (with its filters) that would serve it."""
    try:
        query = ExplainQuery(
            source=source,
            to=to,
            source_ip=source_ip,
            method=method,
            path=path_,
            host=host,
            headers=parse_headers(headers),
        )
        if admin:
            results = _ask_daemon(admin, query)
        else:
            try:
                cfg = load_config(config_path(config_file))
                policies, _ = load_policy_dir(cfg.policy.dir, role="waypoint")
            except ConfigError as exc:
                for p in exc.problems:
                    click.echo(p.format(), err=True)
                sys.exit(2)
            if cfg.role == "waypoint":  # its own catalog only: the peers' services are known to a running one
                catalog = merge(local_catalog(cfg))
                vips = VipIndex(cfg.capture.vip_range)
                results = explain_request(catalog, policies, cfg.node_name, vips, query)
            else:
                results = [a.to_json() for a in answer(cfg, policies, query)]
    except NotServedHere as exc:
        raise click.ClickException(str(exc)) from None
    except QueryError as exc:
        raise click.BadParameter(str(exc), param_hint=f"--{exc.param}") from None
    if as_json:
        click.echo(json.dumps([{k: v for k, v in r.items() if k != "text"} for r in results], indent=2))
    else:
        for r in results:
            click.echo(f"{source} -> {r['workload']} ({r['address']})")
            click.echo(r["text"])
    sys.exit(0 if all(r["allowed"] for r in results) else 3)


@policy.command("import")
@click.argument("yaml_file", metavar="FILE.yaml", type=click.Path(dir_okay=False, allow_dash=True))
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="write the TOML here (default: standard output)"
)
@click.option(
    "--root-namespace",
    default="istio-system",
    show_default=True,
    help="Istio's root namespace: a policy there becomes mesh-wide",
)
@click.option(
    "--namespace",
    "default_namespace",
    default="default",
    show_default=True,
    help="the namespace of a policy whose metadata has none",
)
@click.option(
    "--trust-domain",
    help="rewrite principals of Istio's default trust domain cluster.local into this one (e.g. home.arpa)",
)
def policy_import(
    yaml_file: str, output: str | None, root_namespace: str, default_namespace: str, trust_domain: str | None
) -> None:
    """Convert Istio AuthorizationPolicy YAML (one or many documents, or a `kubectl get -o yaml` list) to
    meshd policy TOML. All or nothing: what meshd cannot express is refused, with FILE:LINE and why, and
    nothing is written (exit 2)."""
    name = "<stdin>" if yaml_file == "-" else yaml_file
    try:
        text = sys.stdin.read() if yaml_file == "-" else Path(yaml_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"cannot read {name}: {exc}") from None
    try:
        result = convert(text, name, Options(root_namespace, default_namespace, trust_domain))
    except ConfigError as exc:
        for p in exc.problems:
            click.echo(p.format(), err=True)
        click.echo(f"{name}: nothing converted ({len(exc.problems)} problem(s))", err=True)
        sys.exit(2)
    if output:
        try:
            Path(output).write_text(result.toml, encoding="utf-8")
        except OSError as exc:
            raise click.ClickException(f"cannot write {output}: {exc}") from None
        click.echo(f"{name}: {result.count} authorization policies written to {output}", err=True)
    else:
        click.echo(result.toml, nl=False)


def _ask_daemon(admin: str, query: ExplainQuery) -> list[dict[str, Any]]:
    """The running daemon's answer (its in-memory config and policy, as they are after reloads)."""
    params: list[tuple[str, str]] = [("from", query.source), ("to", query.to)]
    params += [("source_ip", query.source_ip)] if query.source_ip else []
    params += [(k, v) for k, v in (("method", query.method), ("path", query.path), ("host", query.host)) if v]
    params += [("header", f"{k}={v}") for k, v in query.headers.items()]
    url = f"http://{admin}/policy/explain?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            results: list[dict[str, Any]] = json.load(resp)["results"]
            return results
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read() or b"{}")
        if exc.code == 400 and "error" in body:
            kind = NotServedHere if body.get("not_served_here") else QueryError
            raise kind(body["error"], body.get("param", "to")) from None
        raise click.ClickException(f"meshd at {admin} answered {exc.code}: {body}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise click.ClickException(
            f"cannot reach meshd's admin API at {admin}: {exc} (is meshd running? pass --admin HOST:PORT)"
        ) from None
