"""Fixtures shared by the scheduler's unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.core.scheduler import Scheduler


@pytest.fixture
def leak_checked() -> Iterator[list[Scheduler]]:
    """Every scheduler a test registers must end with no waiter, no slot and no token held."""
    made: list[Scheduler] = []
    yield made
    for scheduler in made:
        assert scheduler.idle(), f"leak: {scheduler!r}"
        assert all(r.tokens_in_flight == 0 for r in scheduler.replicas), repr(scheduler)
