"""The pure etcd gateway layer (meshd/discovery/etcd_wire.py) and the poller's handling of etcd hints.
Gateway messages below are the shapes etcd 3.4's v3 JSON gateway sends (captured from etcd-server)."""

from __future__ import annotations

import json

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from meshd.discovery import etcd_wire as wire
from meshd.discovery.catalog import NodeCatalog
from meshd.discovery.peers import PeerPoller, PeerTable
from meshd.units import Address
from tests.support.catalogs import one_workload_node

PREFIX = "/meshd/home.arpa/"
HEADER = {"cluster_id": "1", "member_id": "2", "revision": "7", "raft_term": "2"}


def value(node: str = "beta", **change: object) -> bytes:
    raw = {"v": 1, "td": "home.arpa", "node": node, "role": "node", "hbone": "10.0.0.2:15008", "rev": "ab"}
    return json.dumps({**raw, **change}).encode()


def key(node: str) -> bytes:
    return f"{PREFIX}nodes/{node}".encode()


def kv(node: str, mod: int, val: bytes | None = None) -> dict[str, str]:
    return {
        "key": wire.b64(key(node)),
        "value": wire.b64(value(node) if val is None else val),
        "mod_revision": str(mod),
    }


# ---- requests and unary answers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "end"),
    [(b"/a/", b"/a0"), (b"a\xff", b"b"), (b"\xff\xff", b"\x00"), (b"", b"\x00")],
)
def test_prefix_range_end_is_etcds(prefix: bytes, end: bytes) -> None:
    assert wire.prefix_end(prefix) == end


def test_requests_are_the_gateways_json() -> None:
    assert wire.put(b"k", b"v", 5) == ("/v3/kv/put", {"key": "aw==", "value": "dg==", "lease": "5"})
    path, body = wire.watch_create(b"/a/", 8)
    assert path == "/v3/watch" and body["create_request"] == {
        "key": "L2Ev",
        "range_end": "L2Ew",
        "start_revision": "8",
    }
    assert wire.grant(9) == ("/v3/lease/grant", {"TTL": "9"})


def test_unary_answers() -> None:
    assert wire.parse_grant({"header": HEADER, "ID": "4111120371579292421", "TTL": "3"}) == wire.Lease(
        4111120371579292421, 3
    )
    # a keepalive for a lease that expired: no TTL in the answer
    assert wire.parse_keepalive({"result": {"header": HEADER, "ID": "1"}}).ttl == 0
    listing = wire.parse_range({"header": HEADER, "kvs": [kv("beta", 5)], "count": "1"})
    assert listing.revision == 7 and listing.kvs[0].key == key("beta")
    assert wire.parse_range({"header": HEADER}).kvs == ()
    with pytest.raises(wire.EtcdServerError) as err:
        wire.parse_put({"error": "etcdserver: requested lease not found", "message": "x", "code": 5})
    assert err.value.code == wire.NOT_FOUND
    with pytest.raises(wire.EtcdProtocolError):
        wire.parse_range({"header": HEADER, "kvs": [{"key": "!!"}]})


# ---- the watch stream ---------------------------------------------------------------------------

STREAM = b"".join(
    json.dumps(m).encode() + b"\n"
    for m in (
        {"result": {"header": HEADER, "created": True}},
        {"result": {"header": HEADER, "events": [{"kv": kv("beta", 8)}]}},
        {
            "result": {
                "header": HEADER,
                "events": [{"type": "DELETE", "kv": {"key": wire.b64(key("beta")), "mod_revision": "9"}}],
            }
        },
        {"result": {"header": HEADER, "canceled": True, "compact_revision": "3"}},
    )
)


@pytest.mark.parametrize("cut", range(0, len(STREAM), 7))
def test_watch_stream_cut_anywhere_decodes_the_same(cut: int) -> None:
    decoder = wire.WatchDecoder()
    events = decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:]) + decoder.close()
    assert [type(e) for e in events] == [
        wire.WatchCreated,
        wire.WatchChanges,
        wire.WatchChanges,
        wire.WatchCompacted,
    ]
    put, delete = events[1], events[2]
    assert isinstance(put, wire.WatchChanges) and put.changes[0].kind == "put"
    assert isinstance(delete, wire.WatchChanges) and delete.changes[0] == wire.Change(
        "delete", wire.KeyValue(key("beta"), b"", 9)
    )


def test_watch_errors_and_limits() -> None:
    with pytest.raises(wire.EtcdServerError, match="no leader"):
        wire.WatchDecoder().feed(b'{"error":{"grpc_code":14,"message":"etcdserver: no leader"}}\n')
    with pytest.raises(wire.EtcdProtocolError):
        wire.WatchDecoder(limit=10).feed(b"x" * 11)
    cancel = wire.WatchDecoder().feed(b'{"result":{"header":{},"canceled":true,"cancel_reason":"gone"}}\n')
    assert cancel == [wire.WatchCanceled("gone")]


# ---- entries ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (value(v=2), "entry version 2"),
        (value(td="other.arpa"), "trust domain 'other.arpa'"),
        (value(node="gamma"), "names node 'gamma' but sits under key 'beta'"),
        (value(role="root"), "role 'root'"),
        (value(hbone="0.0.0.0:15008"), "not an address a peer can dial"),
        (value(hbone="nope"), "hbone 'nope'"),
        (value(rev="xyz"), "revision"),
        (value(rev=None), "lacks string field(s) rev"),
        (b" " * 5000, "over the 4096 limit"),
    ],
)
def test_bad_entries_say_why(raw: bytes, why: str) -> None:
    with pytest.raises(wire.EntryError, match=None) as err:
        wire.decode_entry(key("beta"), raw, prefix=PREFIX, trust_domain="home.arpa")
    assert why in str(err.value)


def test_an_entry_round_trips() -> None:
    entry = wire.NodeEntry("home.arpa", "beta", "waypoint", Address("10.0.0.2", 15008), "ab")
    assert wire.decode_entry(key("beta"), entry.encode(), prefix=PREFIX, trust_domain="home.arpa") == entry


# ---- the view -----------------------------------------------------------------------------------


def changes(*items: tuple[str, str, int, bytes | None]) -> wire.WatchChanges:
    out = []
    for kind, node, mod, val in items:
        out.append(
            wire.Change(
                "put" if kind == "put" else "delete",
                wire.KeyValue(key(node), b"" if kind == "delete" else (val or value(node)), mod),
            )
        )
    return wire.WatchChanges(0, tuple(out))


def test_view_turns_listings_and_changes_into_hints() -> None:
    view = wire.EtcdView(PREFIX, "home.arpa", "alpha")
    first = wire.Listing(
        10, (wire.KeyValue(key("beta"), value("beta"), 4), wire.KeyValue(key("alpha"), value("alpha"), 5))
    )
    assert view.reset(first) == [wire.Seen("beta", Address("10.0.0.2", 15008), "ab")]  # never ourselves
    assert view.reset(first) == []  # listed again, unchanged: nothing to say
    assert view.revision == 10
    hints = view.apply(changes(("put", "gamma", 11, None), ("delete", "beta", 12, None)))
    assert hints == [wire.Seen("gamma", Address("10.0.0.2", 15008), "ab"), wire.Gone("beta")]
    assert view.revision == 12
    assert view.apply(changes(("put", "beta", 12, None))) == []  # a resumed watch repeating its tail
    # a node's key overwritten with junk: what it said no longer holds, and the reason is kept
    hints = view.apply(changes(("put", "gamma", 13, b"junk")))
    assert hints == [wire.Gone("gamma"), wire.Ignored(key("gamma").decode(), "entry is not JSON")]
    assert view.ignored == {key("gamma").decode(): "entry is not JSON"}
    assert view.reset(wire.Listing(20, ())) == [] and view.ignored == {}


OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "junk", "delete"]),
        st.sampled_from(["alpha", "beta", "gamma"]),
        st.sampled_from(["10.0.0.2:15008", "10.0.0.3:15008"]),
    ),
    max_size=20,
)


@given(OPS)
def test_view_matches_a_model_and_a_relisting_agrees(ops: list[tuple[str, str, str]]) -> None:
    view = wire.EtcdView(PREFIX, "home.arpa", "alpha")
    model: dict[str, bytes] = {}
    live: set[str] = set()
    for mod, (op, node, hbone) in enumerate(ops, 1):
        val = value(node, hbone=hbone) if op == "put" else b"junk"
        if op == "delete":
            model.pop(node, None)
        else:
            model[node] = val
        for hint in view.apply(changes((op if op != "junk" else "put", node, mod, val))):
            if isinstance(hint, wire.Seen):
                live.add(hint.node)
            elif isinstance(hint, wire.Gone):
                live.discard(hint.node)
    expected = {n for n, v in model.items() if v != b"junk" and n != "alpha"}
    assert set(view.entries) == live == expected
    listing = wire.Listing(len(ops) + 1, tuple(wire.KeyValue(key(n), v, 1) for n, v in model.items()))
    assert [h for h in view.reset(listing) if not isinstance(h, wire.Ignored)] == []


# ---- the poller, fed by etcd hints --------------------------------------------------------------


A = Address("10.234.0.2", 15008)
B = Address("10.234.0.3", 15008)


async def test_etcd_hints_are_only_hints(autojump_clock: object) -> None:
    served = {A: one_workload_node("beta")}

    async def fetch(address: Address) -> NodeCatalog:
        await trio.sleep(0.01)
        if address not in served:
            raise ConnectionRefusedError("connection refused")
        return served[address]

    table = PeerTable(timeout=30)
    poller = PeerPoller(table, fetch, interval=10, on_change=lambda: None)
    names = lambda: sorted(r.catalog.node for r in table.records())  # noqa: E731
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        poller.etcd_seen("beta", A, "0")
        await trio.sleep(1)
        assert names() == ["beta"] and table.peers[A].how == "etcd"
        # forged: another name at beta's address adds nothing, and beta stays when it leaves
        poller.etcd_seen("mallory", A, "0")
        await trio.sleep(1)
        assert names() == ["beta"]
        poller.etcd_gone("mallory")
        assert names() == ["beta"]
        # forged: a name at an address that proves another node, known only through etcd
        served[B] = one_workload_node("gamma")
        poller.etcd_seen("evil", B, "0")
        await trio.sleep(1)
        assert names() == ["beta"] and "proved node 'gamma'" in (table.peers[B].last_error or "")
        poller.etcd_gone("evil")
        assert B not in table.peers
        # beta's entry gone (lease expired): withdrawn at once, even while mallory-like claims remain
        poller.etcd_seen("mallory", A, "0")
        poller.etcd_gone("beta")
        assert names() == []
        nursery.cancel_scope.cancel()
