"""Answers for mesh names. Pure: bytes or a parsed query in, a decision out; no sockets, no clock.

Names (the domain is `dns.domain`, default `mesh`; matching is case-insensitive):
- `<service>.<namespace>.<domain>` and the short `<service>.<namespace>`: A = the service's VIP;
  AAAA and other types: NOERROR with no answer (VIPs are IPv4 only); SRV = one record per port.
- `_<port>._tcp.<service>.<namespace>.<domain>`: SRV for that service port (target: the full name,
  with its A record in the additional section). Ports have no names in meshd, so the port number is
  the `_name` label.
- any other name in the domain: NXDOMAIN (the mesh domain is ours alone).
- everything else (including a short name that is not a mesh service): forwarded, untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from meshd.discovery.catalog import ServiceEntry
from meshd.discovery.vip import VipTable

TTL = 30  # seconds; short, because a reload or a peer can add or remove services
UDP_PLAIN_LIMIT = 512  # a client without EDNS accepts no more over UDP

Result = Literal["mesh", "empty", "nxdomain", "forward", "formerr", "notimp"]


@dataclass(frozen=True, slots=True)
class Decision:
    result: Result  # also the `result` label of meshd_dns_queries_total
    response: dns.message.Message | None  # None: forward the query as it came


def parse(wire: bytes) -> dns.message.Message | None:
    """The query in `wire`, or None if it is not one: unparseable, or a response (QR set), which a
    proxy neither answers nor forwards (answering would raise, forwarding would reflect it)."""
    try:
        message = dns.message.from_wire(wire)
    except dns.exception.DNSException:
        return None
    return None if message.flags & dns.flags.QR else message


def formerr(wire: bytes) -> bytes | None:
    """A FORMERR for a query too broken to parse, if at least its id and flags are readable."""
    if len(wire) < 12 or wire[2] & 0x80:  # too short, or it is a response: say nothing
        return None
    out = bytearray(wire[:12])
    out[2] = 0x80 | (wire[2] & 0x79)  # QR, keep opcode and RD
    out[3] = dns.rcode.FORMERR
    out[4:12] = bytes(8)  # no sections
    return bytes(out)


def _split(name: dns.name.Name, domain: dns.name.Name) -> tuple[tuple[str, ...], bool]:
    """The labels before the mesh domain (lowercase), and whether the name is in the domain."""
    labels = tuple(
        label.decode("ascii", "replace").lower() for label in name.relativize(dns.name.root).labels
    )
    if name.is_subdomain(domain):
        return labels[: len(labels) - (len(domain.labels) - 1)], True
    return labels, False


def decide(
    query: dns.message.Message, domain: str, services: Mapping[str, ServiceEntry], vips: VipTable
) -> Decision:
    """What to do with one query (see the module docstring)."""
    if query.opcode() != dns.opcode.QUERY:
        return Decision("notimp", _response(query, dns.rcode.NOTIMP))
    if len(query.question) != 1:
        return Decision("formerr", _response(query, dns.rcode.FORMERR))
    q = query.question[0]
    mesh = dns.name.from_text(domain.lower().strip(".") or "mesh")
    labels, in_domain = _split(q.name, mesh)
    if q.rdclass != dns.rdataclass.IN:
        return Decision("nxdomain", _response(query, dns.rcode.NXDOMAIN)) if in_domain else _FORWARD
    port: int | None = None
    if len(labels) == 4 and labels[1] == "_tcp" and labels[0].startswith("_") and labels[0][1:].isdigit():
        port, labels = int(labels[0][1:]), labels[2:]
    svc = services.get(".".join(labels)) if len(labels) == 2 else None
    vip = vips.vip(svc.key) if svc is not None else None
    if svc is None or vip is None or (port is not None and svc.port(port) is None):
        if in_domain:
            return Decision("nxdomain", _response(query, dns.rcode.NXDOMAIN))
        return _FORWARD
    target = dns.name.from_text(f"{svc.name}.{svc.namespace}", mesh)
    r = _response(query, dns.rcode.NOERROR)
    if port is None and q.rdtype == dns.rdatatype.A:
        r.answer.append(dns.rrset.from_text(q.name, TTL, "IN", "A", vip))
    elif q.rdtype in (dns.rdatatype.SRV, dns.rdatatype.ANY):
        ports = [p.port for p in svc.ports if port is None or p.port == port]
        r.answer.append(
            dns.rrset.from_text_list(q.name, TTL, "IN", "SRV", [f"0 0 {p} {target}" for p in ports])
        )
        r.additional.append(dns.rrset.from_text(target, TTL, "IN", "A", vip))
    return Decision("mesh" if r.answer else "empty", r)


_FORWARD = Decision("forward", None)


def _response(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    r = dns.message.make_response(query)
    r.flags |= dns.flags.AA | dns.flags.RA
    r.set_rcode(rcode)
    return r


def to_wire(response: dns.message.Message, query: dns.message.Message, *, udp: bool) -> bytes:
    """The response as bytes within what the client accepts: over UDP, 512 bytes without EDNS (or
    the EDNS payload size); a response that does not fit is sent empty with TC set, so the
    client retries over TCP."""
    limit = 65535 if not udp else max(query.payload, UDP_PLAIN_LIMIT) if query.edns >= 0 else 512
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        short = _response(query, response.rcode())
        short.flags |= dns.flags.TC
        return short.to_wire()
