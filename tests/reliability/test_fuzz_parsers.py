"""Every fuzz target, bounded for CI: arbitrary input gets the documented error or a good result.

`make fuzz` runs the same targets (fuzz/targets.py) with a time budget; a crash either finds lands
here as an `@example`.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz.targets import TARGETS, Target

CI = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


def _test_for(target: Target) -> Any:
    @CI
    @given(target.strategy)
    def run(value: Any) -> None:
        target.run(value)

    return run


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_survives_arbitrary_input(name: str) -> None:
    _test_for(TARGETS[name])()
