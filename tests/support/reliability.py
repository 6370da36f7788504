"""The type of the `record` fixture (tests/reliability/conftest.py), for annotations in tests."""

from __future__ import annotations

from collections.abc import Callable

# record(surface, fault, survived=True, bytes_sent=0, bytes_lost=0, **extra)
Record = Callable[..., None]
