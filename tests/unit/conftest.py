"""Fixtures shared by the unit tests: the scheduler's leak check, and bench/'s scripts."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

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


BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="session")
def bench_script() -> Callable[[str], ModuleType]:
    """Imports a script of bench/ (a folder of scripts that import each other, not a
    package) by name."""
    def load(name: str) -> ModuleType:
        sys.path.insert(0, str(BENCH))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(BENCH))

    return load
