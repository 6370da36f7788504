"""Catalogs across networks: what a gateway serves at `/meshd/v1/network-catalog`. Pure: no I/O.

Nodes of one network reach each other and fetch each other's catalogs directly. Nodes of another
network cannot, so a gateway serves, as its own node identity and to node identities of its trust
domain only, the node catalogs it knows: those of the networks it fronts (its merged catalog) and
those it fetched from other networks' gateways. A receiver keeps only catalogs of networks other than
its own (its own it learns first-hand) and only from a peer whose catalog says it is a gateway.

Trust: this relays claims, it does not create any. A node listed here still has to prove, in the
inner TLS handshake, that it holds the certificate of the identity it is dialled as; the CA issues a
workload's certificate only to the node that hosts it (docs/design.md, "Identity").
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from meshd.discovery.catalog import MAX_CATALOG_BYTES, Catalog, CatalogError, NodeCatalog

NETWORK_CATALOG_PATH = "/meshd/v1/network-catalog"
NETWORK_CATALOG_VERSION = 1


def served_catalogs(
    catalog: Catalog, fronted: Iterable[str], remote: Iterable[NodeCatalog]
) -> list[NodeCatalog]:
    """What a gateway serves: every node catalog of the networks it fronts (itself included), and the
    remote networks' catalogs it fetched; one per node name, sorted."""
    networks = set(fronted)
    mine = [catalog.local, *(p.catalog for p in catalog.peers.values())]
    out = {c.node: c for c in mine if c.network in networks}
    for c in remote:
        out.setdefault(c.node, c)
    return [out[n] for n in sorted(out)]


def encode_network_catalog(network: str, catalogs: Iterable[NodeCatalog]) -> bytes:
    doc: dict[str, Any] = {
        "version": NETWORK_CATALOG_VERSION,
        "network": network,
        "catalogs": [c.to_json() for c in catalogs],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def decode_network_catalog(data: bytes, *, trust_domain: str, own_network: str) -> list[NodeCatalog]:
    """The node catalogs of other networks in a gateway's answer (those of `own_network` dropped).
    CatalogError if it is malformed, too large, or of another trust domain."""
    if len(data) > MAX_CATALOG_BYTES:
        raise CatalogError(f"network catalog is {len(data)} bytes, over the {MAX_CATALOG_BYTES} limit")
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CatalogError(f"network catalog is not JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("version") != NETWORK_CATALOG_VERSION:
        raise CatalogError("unsupported network catalog version")
    entries = raw.get("catalogs")
    if not isinstance(entries, list):
        raise CatalogError("network catalog without a 'catalogs' list")
    out = []
    for entry in entries:
        cat = NodeCatalog.decode(json.dumps(entry).encode(), trust_domain=trust_domain)
        if cat.network != own_network:
            out.append(cat)
    return out
