"""The heap of queued deadlines behind the scheduler's one wake-up: order and bounded size."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.deadlines import Deadlines
from proxy.core.queue import Waiter


def _waiter(deadline: float, seq: int) -> Waiter:
    waiter = Waiter(lambda _: True, deadline)
    waiter.seq = seq
    waiter.queued = True
    return waiter


def _due(d: Deadlines, now: float) -> list[Waiter]:
    out = []
    while (waiter := d.pop_due(now)) is not None:
        waiter.queued = False  # as the scheduler's expiry does
        out.append(waiter)
    return out


def test_due_waiters_come_earliest_first_and_the_ones_that_left_are_skipped() -> None:
    d = Deadlines()
    late, gone, early, tie = (_waiter(t, i) for i, t in enumerate((9.0, 1.0, 2.0, 2.0)))
    for n, waiter in enumerate((late, gone, early, tie), start=1):
        d.add(waiter, n)
    gone.queued = False  # served or withdrawn: its entry is stale
    assert d.earliest() == 2.0
    assert _due(d, 5.0) == [early, tie]  # equal deadlines: arrival order
    assert d.earliest() == 9.0 and _due(d, 8.999) == []
    late.queued = False
    assert d.prune() and d.earliest() is None and len(d) == 0


def test_waiters_that_leave_from_the_middle_cannot_grow_it_without_bound() -> None:
    """A hang-up storm: 10,000 waiters join, and all but the first leave (never reaching
    the top, where stale entries are dropped at once)."""
    d = Deadlines()
    first = _waiter(0.0, 0)
    d.add(first, 1)
    for seq in range(1, 10_001):
        waiter = _waiter(float(seq), seq)
        d.add(waiter, 2)
        waiter.queued = False
        assert len(d) <= 2 * 2 + 64 + 1
    assert d.earliest() == 0.0 and _due(d, 1e9) == [first]
    assert d.prune() and len(d) == 0


@settings(max_examples=100, deadline=None)
# Three in four leave: enough stale entries that adds rebuild the heap.
@given(st.lists(st.tuples(st.floats(0, 100), st.sampled_from([True, True, True, False])),
                min_size=100, max_size=300), st.floats(0, 100))
def test_due_is_exactly_the_queued_waiters_at_or_before_now(
    plan: list[tuple[float, bool]], now: float,
) -> None:
    """Waiters leave as others join (served or withdrawn from the middle), so later adds
    find stale entries and rebuild the heap, as the scheduler's queue does."""
    d = Deadlines()
    waiters = []
    for seq, (deadline, leaves) in enumerate(plan):
        waiter = _waiter(deadline, seq)
        waiters.append(waiter)
        d.add(waiter, sum(w.queued for w in waiters))
        assert len(d) <= 2 * sum(w.queued for w in waiters) + 64 + 1
        if leaves:
            waiter.queued = False
    expect = sorted((w for w in waiters if w.queued and w.deadline <= now),
                    key=lambda w: (w.deadline, w.seq))
    assert _due(d, now) == expect
    rest = [w.deadline for w in waiters if w.queued and w.deadline > now]
    assert d.earliest() == (min(rest) if rest else None)
