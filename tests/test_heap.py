"""The collector settings a started daemon applies (meshd/heap.py), checked in a fresh interpreter so
this test process keeps its own."""

from __future__ import annotations

import subprocess
import sys

from meshd.heap import YOUNG_THRESHOLD

PROBE = """
import gc
from meshd.heap import settle_after_start
before = gc.get_freeze_count()
settle_after_start()
print(before, gc.get_freeze_count(), *gc.get_threshold())
"""


def test_settling_freezes_the_start_up_heap_and_raises_the_young_threshold() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    before, frozen, young, older, oldest = map(int, out.stdout.split())
    assert before == 0
    assert frozen > 1000  # the imported modules' objects at least
    assert (young, older, oldest) == (YOUNG_THRESHOLD, 10, 10)


ALLOCATOR_PROBE = """
import ctypes, sys

class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h)
    _fields_ = [(f, ctypes.c_size_t) for f in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    from meshd.heap import keep_large_buffers
    assert keep_large_buffers()
before = mallinfo2().hblks
block = bytearray(3 << 20)  # a 3 MiB block: above glibc's own mmap threshold, below meshd's
during = mallinfo2().hblks
del block
print(during - before)
"""


def test_large_buffers_come_from_the_heap_once_tuned() -> None:
    def mmapped_blocks(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", ALLOCATOR_PROBE, mode],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return int(out.stdout)

    assert mmapped_blocks("default") == 1  # glibc's default: its own mapping, unmapped when freed
    assert mmapped_blocks("tuned") == 0
