"""mDNS discovery without a network: TXT parsing (tables + Hypothesis), interface and address choice,
the thread->trio bridge, and the peer poller driven by mDNS reports (autojump clock, fake fetch)."""

from __future__ import annotations

import ipaddress
import re
import threading

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from meshd.discovery.catalog import NodeCatalog
from meshd.discovery.mdns import (
    Announcement,
    Interface,
    MdnsConfigError,
    MdnsEvent,
    TxtError,
    _Listener,
    choose_address,
    parse_txt,
    select_interfaces,
    thread_poster,
)
from meshd.discovery.peers import PeerPoller, PeerTable
from meshd.units import Address
from tests.support.catalogs import one_workload_node

GOOD = {
    b"v": b"1",
    b"td": b"home.arpa",
    b"role": b"node",
    b"node": b"beta",
    b"port": b"15008",
    b"rev": b"0123abcd",
}


def test_announcement_round_trips_through_txt() -> None:
    ann = Announcement("home.arpa", "waypoint", "wp-1", 15008, "deadbeef00112233")
    txt = {k.encode(): v.encode() for k, v in ann.to_txt().items()}
    assert parse_txt(txt) == ann
    assert parse_txt(ann.to_txt()) == ann  # str keys too
    assert ann.instance == "wp-1._meshd._tcp.local."


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({b"v": None}, "'v' is missing"),
        ({b"v": b"2"}, "protocol version 2, this meshd speaks 1"),
        ({b"v": b"one"}, "not a number"),
        ({b"td": b"Bad Domain"}, "trust domain 'Bad Domain' is not valid"),
        ({b"role": b"king"}, "role 'king'"),
        ({b"node": b"-x"}, "node name '-x'"),
        ({b"node": b"x" * 64}, "node name"),
        ({b"port": b"0"}, "is not a port"),
        ({b"port": b"70000"}, "is not a port"),
        ({b"port": b"+80"}, "is not a port"),
        ({b"rev": b"xyz"}, "not a hex digest"),
        ({b"rev": None}, "'rev' is missing"),
        ({b"node": b"\xff"}, "not UTF-8"),
    ],
)
def test_bad_txt_is_rejected_with_a_reason(change: dict[bytes, bytes | None], reason: str) -> None:
    props: dict[bytes, bytes | None] = {**GOOD}
    for k, v in change.items():
        if v is None and k in (b"v", b"rev"):
            del props[k]
        else:
            props[k] = v
    with pytest.raises(TxtError, match=re.escape(reason)):
        parse_txt(props)


def test_key_case_and_extra_keys_are_tolerated() -> None:
    assert (
        parse_txt({b"V": b"1", **{k: v for k, v in GOOD.items() if k != b"v"}, b"extra": None}).node == "beta"
    )


@given(
    st.dictionaries(
        st.one_of(st.binary(max_size=12), st.text(max_size=12), st.sampled_from(list(GOOD))),
        st.one_of(st.none(), st.binary(max_size=40), st.text(max_size=40)),
        max_size=10,
    )
)
def test_random_txt_never_crashes(props: dict[object, object]) -> None:
    try:
        ann = parse_txt(props)
    except TxtError as exc:
        assert str(exc)  # rejected, with a reason
    else:
        assert ann.version == 1 and 0 < ann.hbone_port < 65536


@given(st.dictionaries(st.sampled_from(list(GOOD)), st.binary(max_size=20)))
def test_mutated_good_txt_parses_or_says_why(change: dict[bytes, bytes]) -> None:
    try:
        parse_txt({**GOOD, **change})
    except TxtError as exc:
        assert str(exc)


def iface(name: str, cidr: str | None, **kw: bool) -> Interface:
    return Interface(name, (ipaddress.IPv4Interface(cidr),) if cidr else (), **kw)


def test_default_interfaces_are_up_multicast_non_loopback_with_ipv4() -> None:
    avail = [
        iface("lo", "127.0.0.1/8", loopback=True, multicast=False),
        iface("eth0", "192.168.1.5/24"),
        iface("eth1", "10.0.0.2/8", up=False),
        iface("tun0", "10.8.0.1/24", multicast=False),
        iface("eth2", None),
    ]
    assert [i.name for i in select_interfaces(avail, ())] == ["eth0"]
    assert [i.name for i in select_interfaces(avail, ("tun0", "eth0"))] == ["tun0", "eth0"]
    with pytest.raises(MdnsConfigError, match=r"no interface wlan0 .*has: eth0, eth1, eth2, lo, tun0"):
        select_interfaces(avail, ("wlan0",))
    with pytest.raises(MdnsConfigError, match="eth2 has no IPv4"):
        select_interfaces(avail, ("eth2",))


def test_peer_address_prefers_a_shared_network() -> None:
    local = [ipaddress.IPv4Interface("10.77.0.1/24")]
    assert choose_address(["192.168.9.9", "10.77.0.3"], local) == "10.77.0.3"
    assert choose_address(["127.0.0.1", "192.168.9.9"], local) == "192.168.9.9"
    assert choose_address(["127.0.0.1", "0.0.0.0", "nonsense"], local) is None


async def test_listener_callbacks_from_a_foreign_thread_reach_trio_in_order() -> None:
    send, receive = trio.open_memory_channel[MdnsEvent](1)  # tiny: the thread must wait, not drop
    listener = _Listener(thread_poster(send, trio.lowlevel.current_trio_token()))

    def zeroconf_thread() -> None:
        for i in range(5):
            listener.add_service(None, "_meshd._tcp.local.", f"n{i}._meshd._tcp.local.")  # type: ignore[arg-type]
        listener.remove_service(None, "_meshd._tcp.local.", "n0._meshd._tcp.local.")  # type: ignore[arg-type]

    t = threading.Thread(target=zeroconf_thread)
    t.start()
    got = [await receive.receive() for _ in range(6)]
    await trio.to_thread.run_sync(t.join)
    assert [e.kind for e in got] == ["added"] * 5 + ["removed"]
    assert got[-1].name == "n0._meshd._tcp.local."


async def test_a_thread_posting_after_shutdown_does_not_hang_or_raise() -> None:
    send, receive = trio.open_memory_channel[MdnsEvent](0)
    post = thread_poster(send, trio.lowlevel.current_trio_token())
    receive.close()
    await trio.to_thread.run_sync(post, MdnsEvent("added", "x._meshd._tcp.local."))


# ---- the poller, fed by mDNS reports ------------------------------------------------------------


class FakePeers:
    """Peers by address; each fetch returns the current catalog or raises."""

    def __init__(self) -> None:
        self.catalogs: dict[Address, NodeCatalog] = {}
        self.fetches: list[Address] = []

    async def fetch(self, address: Address) -> NodeCatalog:
        self.fetches.append(address)
        await trio.sleep(0.01)
        if address not in self.catalogs:
            raise ConnectionRefusedError("connection refused")
        return self.catalogs[address]


A = Address("10.77.0.2", 15008)
B = Address("10.77.0.3", 15008)


async def test_mdns_peer_is_fetched_refreshed_and_withdrawn_on_goodbye(autojump_clock: object) -> None:
    peers = FakePeers()
    peers.catalogs[A] = one_workload_node("beta")
    table = PeerTable(timeout=30)
    changes: list[list[str]] = []

    def changed() -> None:
        changes.append(sorted(r.catalog.node for r in table.records()))

    poller = PeerPoller(table, peers.fetch, interval=10, on_change=changed)
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        poller.mdns_seen("beta._meshd._tcp.local.", A, "0")
        await trio.sleep(1)
        assert changes == [["beta"]] and table.peers[A].how == "mdns"
        # re-announced with the revision we hold: no extra fetch before the refresh interval
        poller.mdns_seen("beta._meshd._tcp.local.", A, peers.catalogs[A].revision)
        await trio.sleep(1)
        assert len(peers.fetches) == 1
        await trio.sleep(10)  # polled every refresh, like static peers
        assert len(peers.fetches) == 2
        # a new revision is fetched at once
        peers.catalogs[A] = one_workload_node("beta", "w2")
        poller.mdns_seen("beta._meshd._tcp.local.", A, peers.catalogs[A].revision)
        await trio.sleep(0.5)
        assert len(peers.fetches) == 3 and len(changes) == 2
        # goodbye: withdrawn now, and no longer polled
        poller.mdns_goodbye("beta._meshd._tcp.local.")
        assert changes[-1] == [] and A not in table.peers
        await trio.sleep(60)
        assert len(peers.fetches) == 3
        nursery.cancel_scope.cancel()


async def test_silent_mdns_peer_is_withdrawn_after_peer_timeout_and_comes_back(
    autojump_clock: object,
) -> None:
    peers = FakePeers()
    peers.catalogs[A] = one_workload_node("beta")
    table = PeerTable(timeout=30)
    changes: list[int] = []
    failures: list[int] = []
    poller = PeerPoller(
        table,
        peers.fetch,
        interval=10,
        on_change=lambda: changes.append(len(table.records())),
        on_failure=lambda: failures.append(1),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        poller.mdns_seen("beta._meshd._tcp.local.", A, "0")
        await trio.sleep(1)
        del peers.catalogs[A]  # crashed: no goodbye
        await trio.sleep(25)
        assert changes == [1]  # still there: last catalog kept within peer_timeout
        await trio.sleep(20)
        assert changes == [1, 0] and failures
        peers.catalogs[A] = one_workload_node("beta")
        await trio.sleep(11)
        assert changes == [1, 0, 1]
        nursery.cancel_scope.cancel()


async def test_rogue_that_never_answers_adds_nothing(autojump_clock: object) -> None:
    peers = FakePeers()
    table = PeerTable(timeout=30)
    changes: list[int] = []
    poller = PeerPoller(table, peers.fetch, interval=10, on_change=lambda: changes.append(1))
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        poller.mdns_seen("rogue._meshd._tcp.local.", B, "ff")
        await trio.sleep(100)
        assert changes == [] and table.records() == []
        assert table.peers[B].last_error == "ConnectionRefusedError: connection refused"
        nursery.cancel_scope.cancel()


async def test_goodbye_does_not_remove_a_static_peer_and_moves_follow_the_address(
    autojump_clock: object,
) -> None:
    peers = FakePeers()
    peers.catalogs[A] = one_workload_node("beta")
    peers.catalogs[B] = one_workload_node("beta")
    table = PeerTable(timeout=30)
    poller = PeerPoller(table, peers.fetch, interval=10, on_change=lambda: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run, (A,))
        poller.mdns_seen("beta._meshd._tcp.local.", A, "0")
        poller.mdns_goodbye("beta._meshd._tcp.local.")
        assert table.peers[A].how == "static" and table.peers[A].catalog is not None
        # an mDNS peer that re-announces at another address is followed there, the old one dropped
        poller.mdns_seen("gamma._meshd._tcp.local.", B, "0")
        await trio.sleep(1)
        C = Address("10.77.0.9", 15008)
        peers.catalogs[C] = one_workload_node("gamma")
        poller.mdns_seen("gamma._meshd._tcp.local.", C, "0")
        await trio.sleep(1)
        assert B not in table.peers and table.peers[C].catalog is not None
        nursery.cancel_scope.cancel()
