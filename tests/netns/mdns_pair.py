"""Two MdnsDiscovery components (plus one of another trust domain) in one namespace and one trio run:
B's revision change reaches A as a new announcement, B's drain reaches A as a goodbye, and A never
reports itself or the other trust domain's node. Prints one JSON line with what A saw.
Run inside a namespace: python mdns_pair.py IFACE."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import trio

from meshd.discovery.mdns import MdnsDiscovery
from meshd.units import Address


async def main(iface: str) -> None:
    seen: list[list[str]] = []

    def make(node: str, td: str, rev: str, report: bool = False) -> MdnsDiscovery:
        return MdnsDiscovery(
            trust_domain=td,
            node=node,
            role="node",
            hbone=Address("0.0.0.0", 15008),
            interfaces=(iface,),
            revision=rev,
            on_peer=lambda name, _addr, r: report and seen.append(["peer", name, r]),  # type: ignore[func-returns-value]
            on_goodbye=lambda name: report and seen.append(["goodbye", name]),  # type: ignore[func-returns-value]
        )

    async def until(cond: Callable[[], bool]) -> None:
        with trio.fail_after(10):
            while not cond():
                await trio.sleep(0.05)

    a = make("alpha", "home.arpa", "aa", report=True)
    b = make("beta", "home.arpa", "b1")
    other = make("gamma", "elsewhere.test", "cc")
    async with trio.open_nursery() as nursery:
        for component in (a, b, other):
            await nursery.start(component.run)
        await until(lambda: ["peer", "beta._meshd._tcp.local.", "b1"] in seen)
        b.set_revision("b2")
        await until(lambda: ["peer", "beta._meshd._tcp.local.", "b2"] in seen)
        b.drain()
        await until(lambda: ["goodbye", "beta._meshd._tcp.local."] in seen)
        await until(lambda: "gamma._meshd._tcp.local." in a.statistics().ignored)
        stats = a.statistics()
        print(
            json.dumps({"seen": seen, "ignored": stats.ignored, "interfaces": stats.interfaces}), flush=True
        )
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
