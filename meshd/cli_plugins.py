"""`meshd plugins`: the plugins (built-in and installed through the `meshd` entry points) and the
filters each offers, as a table or `--json`: those installed now, or with `--admin HOST:PORT` those a
running daemon loaded at its start (a plugin installed since needs a restart)."""

from __future__ import annotations

import json
from typing import Any

import click

from meshd.cli_admin import fetch_json
from meshd.errors import UserFacingError


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option(
    "--admin",
    metavar="HOST:PORT",
    help="list what the meshd whose admin API is at HOST:PORT loaded (it loads plugins at start)",
)
def plugins(as_json: bool, admin: str | None) -> None:
    """List the plugins installed (or loaded by a running meshd) and the filters they offer."""
    from meshd.plugins.manager import make_plugin_manager, plugins_json

    if admin is not None:
        out: list[dict[str, Any]] = fetch_json(admin, "/plugins")
    else:
        try:
            out = plugins_json(make_plugin_manager())
        except UserFacingError as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    rows = [("PLUGIN", "SOURCE", "FILTERS", "HOOKS")]
    rows += [(i["name"], i["source"], ", ".join(i["filters"]) or "-", ", ".join(i["hooks"])) for i in out]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for r in rows:
        click.echo("  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3])
