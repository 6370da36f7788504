"""The `meshd` command line.

`meshd [run] [-c FILE] [KEY=VALUE ...]` runs the daemon; with no subcommand the arguments go to
`run`, so `meshd role=waypoint` works as written. Other subcommands: `ca`, `config`, `enroll`, `version`.
Every user error prints `FILE:LINE: what is wrong (what to do)` or `error: ...`, never a traceback.

The commands import what they run (the daemon, trio, the CA) inside their function, so `meshd
--help`, `meshd version` and the admin commands start without loading the data plane; there is
no cycle behind those imports (`make lint` checks the layers).
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any

import click

from meshd import __version__
from meshd.build import describe
from meshd.cli_admin import peers, services, status
from meshd.cli_ca import ca
from meshd.cli_plugins import plugins
from meshd.cli_policy import policy
from meshd.config.load import config_path, load_config
from meshd.config.schema import describe_type, leaf_keys, to_plain
from meshd.errors import ConfigError, Problem, UserFacingError
from meshd.units import plural

EXIT_INVALID = 2  # `config check`: the configuration is invalid


class _RunByDefault(click.Group):
    """A group whose default subcommand is `run` when none is named."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not _names_subcommand(args, self.commands) and not {"--help", "-h"} & set(args):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _names_subcommand(args: list[str], commands: typing.Mapping[str, click.Command]) -> bool:
    it = iter(args)
    for arg in it:
        if arg in ("-c", "--config"):
            next(it, None)
            continue
        if arg.startswith("-"):
            continue
        return arg in commands
    return False


@click.group(cls=_RunByDefault, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """meshd: an ambient service mesh for hosts without Kubernetes.

    With no subcommand, runs the daemon: `meshd [-c FILE] [KEY=VALUE ...]`.
    """


def _fail_config(exc: ConfigError, code: int) -> typing.NoReturn:
    for problem in exc.problems:
        click.echo(problem.format(), err=True)
    sys.exit(code)


@main.command()
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False), help="config file")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def run(config_file: str | None, overrides: tuple[str, ...]) -> None:
    """Run the daemon (node, or waypoint with role=waypoint)."""
    import trio

    from meshd.daemon import Daemon
    from meshd.log import setup_logging

    path = config_path(config_file)
    try:
        config = load_config(path, overrides)
        setup_logging(config.log.level, config.log.format)
        daemon = Daemon(config, config_path=path, overrides=overrides)
        code = trio.run(_unwrapping(daemon.run))
    except ConfigError as exc:
        _fail_config(exc, EXIT_INVALID)
    except UserFacingError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # a bind failure is a ListenError (with its own hint); this is anything else
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)


def _unwrapping(fn: typing.Callable[[], typing.Awaitable[int]]) -> typing.Callable[[], typing.Awaitable[int]]:
    """Nurseries wrap errors in ExceptionGroups; a start-up failure the user must see comes out bare."""

    async def run() -> int:
        try:
            return await fn()
        except BaseExceptionGroup as group:
            leaves = list(_leaves(group))
            user_facing = [e for e in leaves if isinstance(e, ConfigError | OSError | UserFacingError)]
            if user_facing and len(user_facing) == len(leaves):
                raise user_facing[0] from None
            raise

    return run


def _leaves(exc: BaseException) -> typing.Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


@main.group()
def config() -> None:
    """Check and inspect configuration."""


@config.command("check")
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False), help="config file")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def config_check(config_file: str | None, overrides: tuple[str, ...]) -> None:
    """Validate the config file and every policy file; exit 2 listing every problem."""
    from meshd.ca_service.wiring import identity_source_problems
    from meshd.config.toml_lines import KeyLines
    from meshd.daemon import local_identities
    from meshd.policy.load import load_policy_dir

    path = config_path(config_file)
    problems: list[Problem] = []
    try:
        cfg = load_config(path, overrides)
    except ConfigError as exc:
        _fail_config(exc, EXIT_INVALID)
    lines = KeyLines(path.read_text(encoding="utf-8"))
    for sp in identity_source_problems(cfg, local_identities(cfg)):
        problems.append(Problem(str(path), lines.line_of(tuple(sp.key.split("."))), sp.message, sp.hint))
    warnings: list[Problem] = []
    try:
        _, warnings = load_policy_dir(cfg.policy.dir, role=cfg.role, trust_domain=cfg.trust_domain)
    except ConfigError as exc:
        problems.extend(exc.problems)
    for w in warnings:
        click.echo(f"warning: {w.format()}", err=True)
    if problems:
        _fail_config(ConfigError(problems), EXIT_INVALID)
    click.echo(
        f"{path}: OK ({plural(len(cfg.workloads), 'workload')}, {plural(len(cfg.services), 'service')}, "
        f"role {cfg.role})"
    )


@config.command("keys")
def config_keys() -> None:
    """List every config key that KEY=VALUE can override, with its type."""
    from meshd.config.model import Config

    hints: dict[str, Any] = {}

    def docs(cls: type[Any], prefix: str = "") -> None:
        th = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = prefix + str(f.metadata.get("toml", f.name))
            hints[key] = f.metadata.get("doc", "")
            tp = th[f.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                docs(tp, key + ".")

    docs(Config)
    for key, tp in leaf_keys(Config).items():
        click.echo(f"{key:28} {describe_type(tp):36} {hints.get(key, '')}")


@config.command("show")
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False), help="config file")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def config_show(config_file: str | None, overrides: tuple[str, ...]) -> None:
    """Print the effective configuration (defaults filled in) as JSON."""
    import json

    try:
        cfg = load_config(config_path(config_file), overrides)
    except ConfigError as exc:
        _fail_config(exc, EXIT_INVALID)
    click.echo(json.dumps(to_plain(cfg), indent=2))


@main.command()
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    help="Read the token (from `meshd ca token` on the CA host) from FILE.",
)
@click.option(
    "--token",
    help="The token itself, or `-` to read it from stdin. Prefer --token-file or `-`: "
    "ps and shell history see arguments.",
)
@click.option(
    "--ca", "ca_address", default=None, help="CA enrollment endpoint HOST:PORT (default: from the token)."
)
@click.option(
    "--state-dir",
    default="/var/lib/meshd",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the node key, certificate and trust bundle go (then set identity.state_dir to it).",
)
def enroll(token_file: str | None, token: str | None, ca_address: str | None, state_dir: str) -> None:
    """Join the mesh: get this host's node certificate from the CA with a one-time token.

    The token comes from --token-file FILE, or stdin with `--token -`
    (`meshd enroll --token - < token.txt`)."""
    from pathlib import Path

    import trio

    from meshd.ca_service.client import EnrollError
    from meshd.ca_service.client import enroll as do_enroll
    from meshd.units import Address

    if (token is None) == (token_file is None):
        click.echo("error: give the token with --token-file FILE or --token - (stdin)", err=True)
        sys.exit(EXIT_INVALID)
    try:
        if token_file is not None:
            text = Path(token_file).read_text(encoding="utf-8")
        else:
            text = sys.stdin.read() if token == "-" else str(token)
    except (OSError, UnicodeDecodeError) as exc:
        click.echo(f"error: cannot read the token: {exc}", err=True)
        sys.exit(1)
    if not text.strip():
        click.echo(
            f"error: the token from {token_file or 'stdin'} is empty (paste the whole line `meshd ca token` printed)",
            err=True,
        )
        sys.exit(1)
    state = Path(state_dir).absolute()  # printed for the config: a relative path would resolve elsewhere
    try:
        where = Address.parse(ca_address) if ca_address else None
        result = trio.run(do_enroll, text.strip(), state, where)
    except (EnrollError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"enrolled as node {result.node}; node certificate valid until {result.not_after.isoformat()}")
    click.echo(f"  {state / 'cert.pem'}, {state / 'key.pem'} (0600), {state / 'ca.crt'}")
    click.echo(f"  CA {result.ca_identity} at {result.ca_hbone}")
    click.echo(f'  in the config: node_name = "{result.node}", [identity] state_dir = "{state}"')


@main.command()
def version() -> None:
    """Print meshd's version, and whether its data path is compiled."""
    click.echo(f"meshd {__version__} ({describe()})")


main.add_command(ca)
main.add_command(plugins)
main.add_command(policy)
for _admin_command in (status, peers, services):
    main.add_command(_admin_command)
