"""Garbage-collector settings for a long-running proxy, applied once the daemon has started.

A proxied request frees almost everything it allocates by reference counting, so the cyclic collector
finds little; but with CPython's defaults (a young collection every 700 surviving container objects)
it ran ~120 young and ~1 full collection per second in a busy waypoint, and each full one walked every
object the daemon had made at start-up (~80k, ~25 ms with the event loop stopped: the p99 of the
waypoint path). Freezing the start-up heap takes those objects out of every later collection, and a
larger young threshold makes collections rarer (bench/README.md, "Plain DATA, the collector and a
larger compiled core").

Must never know: anything else.
"""

from __future__ import annotations

import gc

# Surviving container objects between young collections (CPython's default is 700). Higher means
# rarer collections, but the unreachable cycles that closed connections leave (what they hold was not
# traced) live longer, and memory with them: in a 3-minute soak the client node's RSS grew 70->79
# MiB at 700, 72->84 MiB at 5,000 and 75->115 MiB at 20,000 (bench/README.md, "Plain DATA, the collector and a larger compiled core").
YOUNG_THRESHOLD = 5_000


def settle_after_start() -> None:
    """Collect once, freeze what is left (config, catalog, imported modules) and raise the young
    threshold. Objects made later (connections, reloaded policy) are collected as usual."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
