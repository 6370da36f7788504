"""Waypoint admission of a CONNECT naming a service hostname (ztunnel's double HBONE through a gateway
names the service, waypoint or not): the same tunnel as for the service's VIP:port. Pure."""

from __future__ import annotations

import pytest

from meshd.dataplane.proxied import Refused
from meshd.discovery.catalog import NodeCatalog, ServiceEntry, ServicePortEntry, merge
from meshd.discovery.vip import VipIndex
from meshd.hbone.server import InboundRequest
from meshd.hbone.target import parse_connect_target
from meshd.identity.spiffe import SpiffeId
from meshd.units import Address
from meshd.waypoint.admission import admit

TD = "home.arpa"
WEB = ServiceEntry("web", "default", (ServicePortEntry(80, 8080, "http"),), waypoint="wb")
OTHER = ServiceEntry("other", "default", (ServicePortEntry(80, 8080, "http"),), waypoint="elsewhere")
CLIENT = SpiffeId(TD, "default", "client")


def _request(authority: str) -> InboundRequest:
    return InboundRequest(
        "CONNECT",
        authority,
        None,
        (("forwarded", 'for="10.0.1.11:40000";host=web.default.svc.cluster.local'),),
        CLIENT,
        ("10.0.2.1", 50000),
        target=parse_connect_target(authority),
    )


def test_a_service_hostname_is_admitted_as_its_vip() -> None:
    catalog = merge(NodeCatalog("wb", TD, "waypoint", Address.parse("10.0.2.12:15008"), (), (WEB, OTHER)))
    vips = VipIndex()
    by_name = admit(_request("web.default.svc.cluster.local:80"), catalog, vips, "wb")
    vip = vips.table(catalog.services)[0].vip("web.default")
    assert vip is not None
    by_vip = admit(_request(f"{vip}:80"), catalog, vips, "wb")
    assert (by_name.service, by_name.port, by_name.vip) == (by_vip.service, by_vip.port, vip)
    assert by_name.source == CLIENT and by_name.src == "10.0.1.11:40000"


@pytest.mark.parametrize(
    ("authority", "status", "why"),
    [
        ("nosuch.default.svc.cluster.local:80", 503, "no service nosuch.default"),
        ("other.default.svc.cluster.local:80", 503, "not bound to waypoint 'wb'"),
        ("web.default.svc.cluster.local:81", 503, "has no port 81"),
        ("web.default:80", 400, "svc.cluster.local"),
    ],
)
def test_hostname_refusals(authority: str, status: int, why: str) -> None:
    catalog = merge(NodeCatalog("wb", TD, "waypoint", Address.parse("10.0.2.12:15008"), (), (WEB, OTHER)))
    with pytest.raises(Refused, match=why) as info:
        admit(_request(authority), catalog, VipIndex(), "wb")
    assert info.value.status == status
