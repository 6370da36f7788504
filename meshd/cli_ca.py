"""`meshd ca ...`: create a mesh CA, issue workload certificates, and inspect certificate files."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import click

from meshd.identity.ca import (
    BUNDLE_FILE,
    CA_CERT_FILE,
    CA_KEY_FILE,
    CERT_FILE,
    KEY_FILE,
    CAError,
    CertificateInfo,
    LocalCA,
    describe_certificate,
    load_pem_certificates,
    write_issued,
)
from meshd.identity.spiffe import InvalidSpiffeId, SpiffeId
from meshd.units import parse_duration


class CLIError(click.ClickException):
    """Printed as `error: <message>` on stderr, exit status 1, no traceback."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def _timestamp(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def humanize(d: timedelta) -> str:
    """A rough, readable span: `3649d23h`, `23h59m`, `4m30s`, `12s` (at most the two largest units)."""
    secs = int(abs(d.total_seconds()))
    for n, (unit, size) in enumerate(_UNITS):
        if secs >= size or unit == "s":
            text = f"{secs // size}{unit}"
            if n + 1 < len(_UNITS):
                next_unit, next_size = _UNITS[n + 1]
                rest = (secs % size) // next_size
                if rest:
                    text += f"{rest}{next_unit}"
            return text
    raise AssertionError("unreachable")


def status(info: CertificateInfo, now: datetime) -> str:
    if now < info.not_before:
        return f"NOT YET VALID (starts in {humanize(info.not_before - now)})"
    if now > info.not_after:
        return f"EXPIRED ({humanize(now - info.not_after)} ago)"
    return f"expires in {humanize(info.not_after - now)}"


@click.group()
def ca() -> None:
    """Run the mesh CA: create a root, issue workload certificates, inspect certificates."""


@ca.command("init")
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path), help="CA directory.")
@click.option("--trust-domain", required=True, help="Trust domain of the mesh, e.g. mesh.local.")
@click.option("--force", is_flag=True, help="Replace an existing CA key (old certificates stop verifying).")
def init_cmd(directory: Path, trust_domain: str, force: bool) -> None:
    """Create a self-signed root CA in DIR (ca.crt, ca.key)."""
    try:
        local = LocalCA.init(directory, trust_domain, force=force)
    except CAError as e:
        raise CLIError(str(e)) from None
    info = describe_certificate(local.cert)
    click.echo(f"created CA for trust domain {local.trust_domain} in {directory}")
    click.echo(f"  certificate: {directory / CA_CERT_FILE} (valid until {_timestamp(info.not_after)})")
    click.echo(f"  key:         {directory / CA_KEY_FILE} (mode 0600; keep it secret)")
    click.echo(f"  fingerprint: {info.fingerprint_sha256}")


@ca.command("issue")
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path), help="CA directory.")
@click.option("--id", "spiffe_text", required=True, help="spiffe://<td>/ns/<namespace>/sa/<service-account>")
@click.option("--out", "outdir", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--ttl", default="24h", show_default=True, help="Lifetime, e.g. 1h, 24h, 7d.")
def issue_cmd(directory: Path, spiffe_text: str, outdir: Path, ttl: str) -> None:
    """Issue a workload certificate and key into OUT (cert.pem, key.pem, ca.crt)."""
    try:
        spiffe_id = SpiffeId.parse(spiffe_text)
    except InvalidSpiffeId as e:
        raise CLIError(
            f"{e} (write --id spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
        ) from None
    try:
        lifetime = parse_duration(ttl)
    except ValueError as e:
        raise CLIError(f"--ttl: {e}") from None
    try:
        local = LocalCA.load(directory)
        issued = local.issue(spiffe_id, ttl=lifetime)
        write_issued(issued, outdir)
    except CAError as e:
        raise CLIError(str(e)) from None
    click.echo(f"issued {spiffe_id.uri}, valid until {_timestamp(issued.not_after)}")
    click.echo(f"  {outdir / CERT_FILE}, {outdir / KEY_FILE} (0600), {outdir / BUNDLE_FILE}")
    if issued.not_after >= local.cert.not_valid_after_utc:
        click.echo(
            f"warning: lifetime cut to the CA root's expiry {_timestamp(issued.not_after)} "
            "(renew the CA with 'meshd ca init --force')",
            err=True,
        )


@ca.command("show")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per certificate.")
def show_cmd(file: Path, as_json: bool) -> None:
    """Describe each certificate in a PEM FILE (a chain is shown leaf first)."""
    try:
        data = file.read_bytes()
    except OSError as e:
        raise CLIError(
            f"cannot read {file}: {e.strerror} (give the path of a PEM certificate file)"
        ) from None
    try:
        certs = load_pem_certificates(data)
    except CAError as e:
        raise CLIError(f"{file}: {e}") from None
    now = datetime.now(UTC)
    infos = [describe_certificate(c) for c in certs]
    if as_json:
        out = [
            {
                "spiffe_id": i.spiffe_id,
                "subject": i.subject,
                "issuer": i.issuer,
                "not_before": _timestamp(i.not_before),
                "not_after": _timestamp(i.not_after),
                "expired": now > i.not_after,
                "expires_in_seconds": int((i.not_after - now).total_seconds()),
                "fingerprint_sha256": i.fingerprint_sha256,
                "is_ca": i.is_ca,
                "serial": f"{i.serial:x}",
            }
            for i in infos
        ]
        click.echo(json.dumps(out, indent=2))
        return
    for n, i in enumerate(infos):
        if n:
            click.echo("")
        if len(infos) > 1:
            click.echo(f"certificate {n + 1} of {len(infos)}{' (CA)' if i.is_ca else ''}")
        click.echo(f"spiffe id:   {i.spiffe_id or '(none)'}")
        click.echo(f"subject:     {i.subject or '(empty)'}")
        click.echo(f"issuer:      {i.issuer or '(empty)'}")
        click.echo(f"not before:  {_timestamp(i.not_before)}")
        click.echo(f"not after:   {_timestamp(i.not_after)} ({status(i, now)})")
        click.echo(f"sha256:      {i.fingerprint_sha256}")


# --- the CA service: tokens, revocation, rotation -------------------------------------------------


@ca.command("token")
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path), help="CA directory.")
@click.option("--node", required=True, help="Name of the node that will enroll (its node_name).")
@click.option("--workloads", default="", help="Identities it may hold: ns/sa,ns/sa,...")
@click.option("--ttl", default="1h", show_default=True, help="How long the token stays usable.")
@click.option(
    "--address",
    default=None,
    help="Enrollment endpoint HOST:PORT put in the token (default: hostname:15012).",
)
def token_cmd(directory: Path, node: str, workloads: str, ttl: str, address: str | None) -> None:
    """Print a single-use, expiring enrollment token for NODE (it pins this CA's root)."""
    import socket

    from meshd.ca_service.authority import CaAuthority
    from meshd.config.model import _NAME
    from meshd.units import Address

    if not _NAME.match(node):
        raise CLIError(f"--node {node!r} must be lowercase letters, digits, '.', '-', '_' (a node_name)")
    try:
        lifetime = parse_duration(ttl)
        where = Address.parse(address or f"{socket.gethostname()}:15012")
    except ValueError as e:
        raise CLIError(f"{e}") from None
    names = [w.strip() for w in workloads.split(",") if w.strip()]
    try:
        text = CaAuthority(directory, lifetime).mint_token(node, names, lifetime, str(where))
    except CAError as e:
        raise CLIError(str(e)) from None
    click.echo(text)
    click.echo(
        f"token for node {node} ({', '.join(names) or 'no workloads'}), single use, valid {humanize(lifetime)}; "
        f"on the new host: meshd enroll --token <token> --state-dir /var/lib/meshd",
        err=True,
    )


@ca.command("revoke")
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path), help="CA directory.")
@click.option("--node", required=True, help="Node name.")
@click.option("--undo", is_flag=True, help="Reinstate a revoked node.")
def revoke_cmd(directory: Path, node: str, undo: bool) -> None:
    """Stop renewing NODE's certificates (they die at expiry); --undo reinstates it."""
    from meshd.ca_service.authority import CaAuthority

    try:
        CaAuthority(directory, timedelta(hours=1)).revoke(node, undo=undo)
    except CAError as e:
        raise CLIError(str(e)) from None
    if undo:
        click.echo(f"node {node} reinstated: the CA renews its certificates again")
    else:
        click.echo(f"node {node} revoked: the CA refuses its renewals; its certificates die at expiry")


@ca.group("rotate")
def rotate() -> None:
    """Rotate the root: prepare (publish a new root), activate (sign with it), retire (drop the old)."""


@rotate.command("prepare")
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path), help="CA directory.")
def rotate_prepare(directory: Path) -> None:
    """Make a new root in DIR/next; the bundle trusts both, the old one still signs."""
    from meshd.ca_service import rotation

    try:
        new = rotation.prepare(directory)
    except CAError as e:
        raise CLIError(str(e)) from None
    click.echo(f"new root prepared: {describe_certificate(new.cert).fingerprint_sha256}")
    click.echo("trust bundle = old + new; wait for every node to refresh it, then: meshd ca rotate activate")


@rotate.command("activate")
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path), help="CA directory.")
def rotate_activate(directory: Path) -> None:
    """Sign with the prepared root from now on; the old root stays trusted (DIR/previous)."""
    from meshd.ca_service import rotation

    try:
        new = rotation.activate(directory)
    except CAError as e:
        raise CLIError(str(e)) from None
    click.echo(f"signing with the new root {describe_certificate(new.cert).fingerprint_sha256}")
    click.echo("after every certificate has renewed (one lifetime), run: meshd ca rotate retire")


@rotate.command("retire")
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path), help="CA directory.")
def rotate_retire(directory: Path) -> None:
    """Stop trusting the previous root."""
    from meshd.ca_service import rotation

    try:
        rotation.retire(directory)
    except CAError as e:
        raise CLIError(str(e)) from None
    click.echo("previous root retired: the trust bundle is the current root only")
