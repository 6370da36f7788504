"""The DNS proxy's pure part: which queries get which answers (no sockets)."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import pytest

from meshd.capture.dns import decide, formerr, to_wire
from meshd.discovery.catalog import ServiceEntry, ServicePortEntry
from meshd.discovery.vip import allocate

SERVICES = {
    "echo.default": ServiceEntry(
        "echo", "default", (ServicePortEntry(7000, 7000, "tcp"), ServicePortEntry(80, 8080, "http"))
    ),
    "db.prod": ServiceEntry("db", "prod", (ServicePortEntry(5432, 5432, "tcp"),)),
}
VIPS = allocate(SERVICES)
ECHO = VIPS.by_service["echo.default"]


def answers(msg: dns.message.Message) -> list[str]:
    return [r.to_text() for rrset in msg.answer for r in rrset]


@pytest.mark.parametrize(
    ("name", "rdtype", "result", "rcode", "expected"),
    [
        ("echo.default.mesh", "A", "mesh", dns.rcode.NOERROR, [ECHO]),
        ("ECHO.Default.Mesh.", "A", "mesh", dns.rcode.NOERROR, [ECHO]),
        ("echo.default", "A", "mesh", dns.rcode.NOERROR, [ECHO]),
        ("echo.default.mesh", "AAAA", "empty", dns.rcode.NOERROR, []),
        ("echo.default.mesh", "TXT", "empty", dns.rcode.NOERROR, []),
        ("_7000._tcp.echo.default.mesh", "SRV", "mesh", dns.rcode.NOERROR, ["0 0 7000 echo.default.mesh."]),
        (
            "echo.default.mesh",
            "SRV",
            "mesh",
            dns.rcode.NOERROR,
            ["0 0 7000 echo.default.mesh.", "0 0 80 echo.default.mesh."],
        ),
        ("_7001._tcp.echo.default.mesh", "SRV", "nxdomain", dns.rcode.NXDOMAIN, []),
        ("nope.default.mesh", "A", "nxdomain", dns.rcode.NXDOMAIN, []),
        ("a.b.c.mesh", "A", "nxdomain", dns.rcode.NXDOMAIN, []),
        ("mesh", "SOA", "nxdomain", dns.rcode.NXDOMAIN, []),
    ],
)
def test_mesh_names(name: str, rdtype: str, result: str, rcode: int, expected: list[str]) -> None:
    q = dns.message.make_query(name, rdtype)
    d = decide(q, "mesh", SERVICES, VIPS)
    assert d.result == result and d.response is not None
    assert d.response.rcode() == rcode and d.response.id == q.id
    assert d.response.flags & dns.flags.AA and d.response.flags & dns.flags.QR
    assert answers(d.response) == expected


def test_srv_carries_the_vip_as_additional() -> None:
    d = decide(dns.message.make_query("_5432._tcp.db.prod.mesh", "SRV"), "mesh", SERVICES, VIPS)
    assert d.response is not None
    assert [r.to_text() for rrset in d.response.additional for r in rrset] == [VIPS.by_service["db.prod"]]


@pytest.mark.parametrize("name", ["example.com", "www.example.test", "nope.default", "mesh.example.com"])
def test_everything_else_is_forwarded_untouched(name: str) -> None:
    assert decide(dns.message.make_query(name, "A"), "mesh", SERVICES, VIPS).response is None


def test_domain_is_configurable() -> None:
    q = dns.message.make_query("echo.default.svc.home", "A")
    d = decide(q, "svc.home", SERVICES, VIPS)
    assert d.response is not None and answers(d.response) == [ECHO]
    assert (
        decide(dns.message.make_query("echo.default.mesh", "A"), "svc.home", SERVICES, VIPS).result
        == "forward"
    )


def test_non_query_opcode_is_notimp() -> None:
    q = dns.message.make_query("echo.default.mesh", "A")
    q.set_opcode(dns.opcode.NOTIFY)
    d = decide(q, "mesh", SERVICES, VIPS)
    assert d.result == "notimp" and d.response is not None and d.response.rcode() == dns.rcode.NOTIMP


def test_too_big_for_udp_is_truncated_and_tcp_is_not() -> None:
    many = {
        "big.default": ServiceEntry(
            "big", "default", tuple(ServicePortEntry(p, p, "tcp") for p in range(1, 60))
        )
    }
    vips = allocate(many)
    q = dns.message.make_query("big.default.mesh", "SRV", use_edns=False)
    d = decide(q, "mesh", many, vips)
    assert d.response is not None
    udp = dns.message.from_wire(to_wire(d.response, q, udp=True))
    assert udp.flags & dns.flags.TC and not udp.answer
    tcp = dns.message.from_wire(to_wire(d.response, q, udp=False))
    assert len(answers(tcp)) == 59


def test_formerr_for_garbage_that_has_a_header() -> None:
    q = dns.message.make_query("x.mesh", "A").to_wire()
    out = formerr(q[:12] + b"\xff\xff")
    assert out is not None and out[:2] == q[:2] and out[3] & 0xF == dns.rcode.FORMERR and out[2] & 0x80
    assert formerr(b"\x00") is None
