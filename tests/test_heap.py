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
