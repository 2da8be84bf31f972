"""The passive outlier policy, on a clock the test passes in (no I/O, no sleeping)."""

from __future__ import annotations

import pytest

from proxy.core.outlier import CLEAN_S, MAX_EJECT_S, OutlierDetector


def fail(d: OutlierDetector, name: str, times: int, now: float, replicas: int = 4) -> list[float]:
    """The ejections decided by ``times`` failures at ``now``."""
    return [s for s in (d.failure(name, now, replicas) for _ in range(times)) if s is not None]


def test_eject_after_consecutive_failures_only() -> None:
    d = OutlierDetector(eject_after=5, eject_s=10, max_ejected_percent=50)
    assert fail(d, "a", 4, now=0) == []
    d.success("a")  # one good answer: the streak starts again
    assert fail(d, "a", 4, now=1) == []
    assert fail(d, "a", 1, now=1) == [10]
    assert d.ejected == 1


def test_failures_while_ejected_decide_nothing() -> None:
    d = OutlierDetector(eject_after=1, eject_s=10, max_ejected_percent=100)
    assert fail(d, "a", 1, now=0) == [10]
    assert fail(d, "a", 5, now=1) == []  # its last requests, still in flight
    assert not d.is_over("a", 9.9)
    assert d.is_over("a", 10)


def test_each_repeat_doubles_up_to_300_s() -> None:
    d = OutlierDetector(eject_after=1, eject_s=10, max_ejected_percent=100)
    now, seen = 0.0, []
    for _ in range(7):
        (duration,) = fail(d, "a", 1, now)
        seen.append(duration)
        now += duration
        d.lift("a", now)
        now += 1  # failing again within the clean minute
    assert seen == [10, 20, 40, 80, 160, MAX_EJECT_S, MAX_EJECT_S]


def test_a_clean_minute_after_coming_back_resets_the_doubling() -> None:
    d = OutlierDetector(eject_after=1, eject_s=10, max_ejected_percent=100)
    assert fail(d, "a", 1, now=0) == [10]
    d.lift("a", 10)
    assert fail(d, "a", 1, now=10 + CLEAN_S - 1) == [20]  # not clean long enough
    d.lift("a", 100)
    assert fail(d, "a", 1, now=100 + CLEAN_S) == [10]


def test_max_ejected_percent_caps_the_ejected_share() -> None:
    d = OutlierDetector(eject_after=2, eject_s=10, max_ejected_percent=50)
    assert fail(d, "a", 2, now=0, replicas=2) == [10]
    assert fail(d, "b", 5, now=0, replicas=2) == []  # a second of two would be 100 %
    d.lift("a", 10)
    assert fail(d, "b", 1, now=11, replicas=2) == [10]  # its failures stayed counted


@pytest.mark.parametrize(("percent", "replicas", "ejectable"),
                         [(50, 1, 0), (50, 3, 1), (50, 4, 2), (0, 4, 0), (100, 2, 2)])
def test_cap_examples(percent: int, replicas: int, ejectable: int) -> None:
    d = OutlierDetector(eject_after=1, eject_s=10, max_ejected_percent=percent)
    for i in range(replicas):
        d.failure(f"r{i}", 0, replicas)
    assert d.ejected == ejectable


def test_forget_and_configure() -> None:
    d = OutlierDetector(eject_after=1, eject_s=10, max_ejected_percent=100)
    assert fail(d, "a", 1, now=0) == [10]
    d.forget("a")
    assert d.ejected == 0
    d.configure(eject_after=3, eject_s=400, max_ejected_percent=100)
    assert fail(d, "a", 3, now=1) == [400]  # eject_s above 300 s is the cap itself
    with pytest.raises(ValueError):
        d.configure(eject_after=0, eject_s=1, max_ejected_percent=1)
