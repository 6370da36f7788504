"""`meshd plugins`: the plugins loaded (built-in and installed through the `meshd` entry points) and
the filters each offers, as a table or `--json`."""

from __future__ import annotations

import dataclasses
import json

import click

from meshd.errors import UserFacingError


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def plugins(as_json: bool) -> None:
    """List the plugins loaded and the filters they offer."""
    from meshd.plugins.manager import filter_types, make_plugin_manager, plugin_infos

    try:
        pm = make_plugin_manager()
        infos = plugin_infos(pm)
        docs = {name: reg.type.doc for name, reg in filter_types(pm).items()}
    except UserFacingError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        out = [{**dataclasses.asdict(i), "filters": {f: docs[f] for f in i.filters}} for i in infos]
        click.echo(json.dumps(out, indent=2))
        return
    rows = [("PLUGIN", "SOURCE", "FILTERS", "HOOKS")]
    rows += [(i.name, i.source, ", ".join(i.filters) or "-", ", ".join(i.hooks)) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for r in rows:
        click.echo("  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3])
