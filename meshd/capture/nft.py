"""meshd's own nftables table: ruleset text (pure) and applying/removing it with `nft -f`.

Rule 1: meshd touches one table, `ip meshd`, and nothing else: it never flushes the ruleset or
another table. Rule 2: installing is one `nft -f` transaction that creates the table if missing,
deletes it and defines it again, so a table left by a crashed meshd is replaced, never duplicated.

Chains:
- `output` (nat, hook output): TCP from this host to the VIP range -> the capture port (15001); UDP to
  a VIP:port listed in the `udp_vips` map -> the local UDP port meshd serves that service port on
  (the map is rewritten as the catalog changes, `udp_map_script`; conntrack turns the replies' source
  back into the VIP:port). UDP to a VIP:port not in the map is not redirected.
  meshd's own connections never go to a VIP, so they are not captured. With `dns.capture`, UDP and
  TCP to port 53 -> the DNS proxy, except packets marked DNS_MARK (the proxy's own forwarded queries).
- with inbound protection, for each workload port reachable from other hosts (not loopback):
  `prerouting` (nat) redirects plaintext to a PERMISSIVE port -> the plaintext port (15006);
  `input` (filter) drops it for a STRICT port. Traffic on `lo` (this host, meshd included) is untouched.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import trio

log = logging.getLogger("meshd.capture")

TABLE = "meshd"
UDP_MAP = "udp_vips"
FAMILY = "ip"
NFT_TIMEOUT = 10.0
CAP_NET_ADMIN = 12
# SO_MARK on the DNS proxy's forwarded queries, so that port-53 capture does not send them back to it
# ("MESH" in ASCII: unlikely to clash with marks other software sets).
DNS_MARK = 0x4D455348


@dataclass(frozen=True, slots=True)
class InboundRule:
    address: str  # workload address; "0.0.0.0" = any local address
    port: int
    action: Literal["redirect", "drop"]  # PERMISSIVE -> redirect to 15006; STRICT -> drop


def ruleset(
    vip_range: str,
    capture_port: int,
    plaintext_port: int,
    inbound: Sequence[InboundRule],
    dns_port: int | None = None,
) -> str:
    """The `nft -f` input that (re)creates meshd's table atomically. With `dns_port`, DNS queries
    (UDP and TCP to port 53) from this host go to the DNS proxy, except the proxy's own forwarded
    queries, which carry DNS_MARK."""
    net = ipaddress.IPv4Network(vip_range)
    t = f"{FAMILY} {TABLE}"
    lines = [
        f"table {t}",
        f"delete table {t}",
        f"table {t} {{",
        f"\tmap {UDP_MAP} {{",
        "\t\ttypeof ip daddr . udp dport : udp dport",
        "\t}",
        "\tchain output {",
        "\t\ttype nat hook output priority -100; policy accept;",
        f"\t\tip daddr {net} ip protocol tcp redirect to :{capture_port}",
        f"\t\tip daddr {net} ip protocol udp redirect to :ip daddr . udp dport map @{UDP_MAP}",
    ]
    if dns_port is not None:
        lines += [
            f"\t\tmeta mark {DNS_MARK:#x} return",
            f"\t\tudp dport 53 redirect to :{dns_port}",
            f"\t\ttcp dport 53 redirect to :{dns_port}",
        ]
    lines.append("\t}")
    redirects = [r for r in inbound if r.action == "redirect"]
    drops = [r for r in inbound if r.action == "drop"]
    if redirects:
        lines += ["\tchain prerouting {", "\t\ttype nat hook prerouting priority -100; policy accept;"]
        lines += [f"\t\t{_match(r)} redirect to :{plaintext_port}" for r in redirects]
        lines.append("\t}")
    if drops:
        lines += ["\tchain input {", "\t\ttype filter hook input priority 0; policy accept;"]
        lines += [f"\t\t{_match(r)} drop" for r in drops]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def udp_map_script(entries: Mapping[tuple[str, int], int]) -> str:
    """`nft -f` input that replaces the `udp_vips` map's elements in one transaction:
    (VIP, service port) -> the local UDP port serving it."""
    lines = [f"flush map {FAMILY} {TABLE} {UDP_MAP}"]
    if entries:
        items = ", ".join(f"{vip} . {port} : {local}" for (vip, port), local in sorted(entries.items()))
        lines.append(f"add element {FAMILY} {TABLE} {UDP_MAP} {{ {items} }}")
    return "\n".join(lines) + "\n"


def _match(r: InboundRule) -> str:
    dst = "" if ipaddress.ip_address(r.address).is_unspecified else f"ip daddr {r.address} "
    return f'iifname != "lo" {dst}tcp dport {r.port}'


def delete_command() -> str:
    return f"delete table {FAMILY} {TABLE}\n"


class NftUnavailable(RuntimeError):
    """Capture cannot be installed here; the message says why (for the log)."""


def has_net_admin(status_text: str) -> bool:
    """Whether CapEff in /proc/self/status text includes CAP_NET_ADMIN."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


async def run_nft(nft: str, script: str) -> None:
    """Feed `script` to `nft -f -`; NftUnavailable with the likely cause if that fails."""
    try:
        with trio.fail_after(NFT_TIMEOUT):
            proc = await trio.run_process(
                [nft, "-f", "-"], stdin=script.encode(), capture_stdout=True, capture_stderr=True, check=False
            )
    except FileNotFoundError:
        raise NftUnavailable(f"the nft binary {nft!r} was not found (install nftables)") from None
    except PermissionError as exc:
        raise NftUnavailable(f"cannot run {nft!r}: {exc}") from None
    except trio.TooSlowError:
        raise NftUnavailable(f"{nft!r} did not finish within {NFT_TIMEOUT:g}s") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        hint = " (meshd needs CAP_NET_ADMIN)" if "not permitted" in err.lower() else ""
        raise NftUnavailable(f"`{nft} -f` failed with exit {proc.returncode}{hint}: {err[:500]}")


async def install(nft: str, script: str) -> None:
    """Check CAP_NET_ADMIN, then replace meshd's table atomically."""
    try:
        status = await trio.Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    if status and not has_net_admin(status):
        raise NftUnavailable("meshd lacks CAP_NET_ADMIN, which nftables capture needs")
    await run_nft(nft, script)


async def remove(nft: str) -> None:
    """Delete meshd's table (shielded: runs while shutting down); failures are logged, not raised."""
    with trio.CancelScope(shield=True):
        try:
            await run_nft(nft, delete_command())
            log.info("capture removed", extra={"table": f"{FAMILY} {TABLE}"})
        except NftUnavailable as exc:
            log.warning("could not remove the nftables table %s %s: %s", FAMILY, TABLE, exc)
