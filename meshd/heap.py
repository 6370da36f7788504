"""Memory settings for a long-running proxy: the C allocator's, applied as the daemon starts, and the
garbage collector's, applied once it has started.

The allocator: glibc's malloc serves blocks above 128 KiB with a fresh mmap and gives them back to the
kernel when freed (its threshold grows with what is freed, but the heap top is trimmed as soon as
more than twice that lies free). The data path's buffers are just that size (256 KiB socket reads,
up to 1 MiB HTTP/2 frames, TLS output), so every chunk paid page faults and page clearing: ~8% of the
sending node's CPU in a bulk transfer (`perf record`, bench/README.md "Allocator thresholds").
Raising both thresholds keeps such blocks in the heap for reuse.

The collector: a proxied request frees almost everything it allocates by reference counting, so the
cyclic collector finds little; but with CPython's defaults (a young collection every 700 surviving
container objects) it ran ~120 young and ~1 full collection per second in a busy waypoint, and each
full one walked every object the daemon had made at start-up (~80k, ~25 ms with the event loop
stopped: the p99 of the waypoint path). Freezing the start-up heap takes those objects out of every
later collection, and a larger young threshold makes collections rarer (bench/README.md, "Plain DATA,
the collector and a larger compiled core").

Must never know: anything else.
"""

from __future__ import annotations

import ctypes
import gc

# Surviving container objects between young collections (CPython's default is 700). Higher means
# rarer collections, but the unreachable cycles that closed connections leave (what they hold was not
# traced) live longer, and memory with them: in a 3-minute soak the client node's RSS grew 70->79
# MiB at 700, 72->84 MiB at 5,000 and 75->115 MiB at 20,000 (bench/README.md, "Plain DATA, the collector and a larger compiled core").
YOUNG_THRESHOLD = 5_000


# glibc's mallopt parameters (malloc.h) and the values meshd sets: blocks up to MMAP_THRESHOLD come
# from the heap, and up to TRIM_THRESHOLD of free memory at its top is kept rather than returned.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 16 * 1024 * 1024


def keep_large_buffers() -> bool:
    """Tell glibc's malloc to keep data-path-sized blocks in its heap. False where the C library
    is not glibc (no `mallopt`) or refuses: the defaults then stay, which is only slower."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def settle_after_start() -> None:
    """Collect once, freeze what is left (config, catalog, imported modules) and raise the young
    threshold. Objects made later (connections, reloaded policy) are collected as usual."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
