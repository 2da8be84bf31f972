"""Priority classes in the scheduler: class order, eviction of the newest lowest waiter."""

from __future__ import annotations

import pytest

from proxy.core.errors import QueueFull
from proxy.core.replicas import Replica
from proxy.core.scheduler import Lease, Scheduler, Waiter


class Log:
    """Notifications in order: the grants it keeps (released by :meth:`drain`) and errors."""

    def __init__(self, s: Scheduler) -> None:
        self.s = s
        self.order: list[str] = []
        self.errors: dict[str, object] = {}
        self.held: list[Lease] = []

    def wait(self, name: str, **kwargs: object) -> Waiter:
        def notify(result: object) -> bool:
            if isinstance(result, Lease):
                self.order.append(name)
                self.held.append(result)
            else:
                self.errors[name] = result
            return True

        got = self.s.submit(notify, **kwargs)  # type: ignore[arg-type]
        assert isinstance(got, Waiter), got
        return got

    def drain(self) -> None:
        while self.held:
            self.held.pop(0).release()


def one_slot(max_queue: int = 10, classes: int = 3, **kwargs: object) -> Scheduler:
    return Scheduler([Replica("r", "http://r", 1)], max_queue, classes=classes,
                     **kwargs)  # type: ignore[arg-type]


def test_higher_classes_are_served_first_fifo_within(leak_checked: list[Scheduler]) -> None:
    s = one_slot()
    leak_checked.append(s)
    log = Log(s)
    busy = s.submit(lambda _: True)
    for name, klass in [("b1", 2), ("s1", 1), ("i1", 0), ("s2", 1), ("i2", 0), ("b2", 2)]:
        log.wait(name, klass=klass)
    resend = log.wait("resend", klass=2, front=True)
    assert s.position(resend) == 1
    assert isinstance(busy, Lease)
    busy.release()
    log.drain()
    assert log.order == ["resend", "i1", "i2", "s1", "s2", "b1", "b2"]


def test_a_full_queue_evicts_the_newest_of_the_lowest_class(
    leak_checked: list[Scheduler],
) -> None:
    now = [0.0]
    s = one_slot(max_queue=3, clock=lambda: now[0])
    leak_checked.append(s)
    log = Log(s)
    busy = s.submit(lambda _: True)
    old_batch = log.wait("old_batch", klass=2)
    standard = log.wait("standard", klass=1)
    new_batch = log.wait("new_batch", klass=2)
    with pytest.raises(QueueFull):
        s.submit(lambda _: True, klass=2)  # nobody lower to make room for it
    log.wait("interactive", klass=0)
    err = log.errors.pop("new_batch")
    assert isinstance(err, QueueFull) and err.waited and err.status == 429
    assert err.retry_after_s is not None and err.retry_after_s >= 1
    assert not new_batch.queued and old_batch.queued and standard.queued
    assert s.queue_depth == 3
    log.wait("standard2", klass=1)  # evicts the last batch one
    assert not old_batch.queued and "old_batch" in log.errors
    with pytest.raises(QueueFull):
        s.submit(lambda _: True, klass=1)  # only its own class and higher wait now
    assert isinstance(busy, Lease)
    busy.release()
    log.drain()
    assert log.order == ["interactive", "standard", "standard2"]


def test_the_byte_bound_evicts_lower_classes_only_if_that_makes_room(
    leak_checked: list[Scheduler],
) -> None:
    s = one_slot(max_bytes=100)
    leak_checked.append(s)
    log = Log(s)
    busy = s.submit(lambda _: True)
    log.wait("s", klass=1, size=50)
    log.wait("b1", klass=2, size=20)
    log.wait("b2", klass=2, size=20)
    with pytest.raises(QueueFull, match="max_bytes"):
        s.submit(lambda _: True, klass=1, size=100)  # evicting both lower is not enough
    assert log.errors == {} and s.queued_bytes == 90
    log.wait("i", klass=0, size=35)  # 25 over: b2 (20) then b1 (20) go, newest first
    assert set(log.errors) == {"b1", "b2"} and s.queued_bytes == 85
    assert isinstance(busy, Lease)
    busy.release()
    log.drain()
    assert log.order == ["i", "s"]


def test_a_higher_class_waiter_does_not_block_another_models_replica(
    leak_checked: list[Scheduler],
) -> None:
    s = Scheduler([Replica("x", "http://x", 1, models=frozenset({"mx"})),
                   Replica("y", "http://y", 1, models=frozenset({"my"}))], 10, classes=2)
    leak_checked.append(s)
    log = Log(s)
    bx = s.submit(lambda _: True, model="mx")
    by = s.submit(lambda _: True, model="my")
    log.wait("x0", model="mx", klass=0)
    log.wait("y1", model="my", klass=1)
    log.wait("y0", model="my", klass=0)
    assert isinstance(by, Lease) and isinstance(bx, Lease)
    by.release()  # y's best: its class 0 waiter, though x's waiter is older and higher
    assert log.order == ["y0"]
    log.drain()
    assert log.order == ["y0", "y1"]
    bx.release()
    log.drain()
    assert log.order == ["y0", "y1", "x0"]


def test_a_newcomer_of_a_higher_class_takes_a_replica_kept_for_a_lower_one(
    leak_checked: list[Scheduler],
) -> None:
    """A free replica kept for a large batch waiter does not make an interactive one wait."""
    s = Scheduler([Replica("r", "http://r", 4, max_tokens=100)], 10, classes=2)
    leak_checked.append(s)
    log = Log(s)
    held = s.submit(lambda _: True, cost=60)
    log.wait("big_batch", klass=1, cost=80)
    small_batch = s.submit(lambda _: True, klass=1, cost=10)
    assert isinstance(small_batch, Waiter)  # kept for big_batch: same class, after it
    small = s.submit(lambda _: True, klass=0, cost=10)
    assert isinstance(small, Lease)  # higher class: the kept replica is its
    s.withdraw(small_batch)
    small.release()
    assert isinstance(held, Lease)
    held.release()
    log.drain()
    assert log.order == ["big_batch"]


def test_classes_can_change_only_when_no_waiter_is_left_out(
    leak_checked: list[Scheduler],
) -> None:
    s = one_slot(classes=3)
    leak_checked.append(s)
    busy = s.submit(lambda _: True)
    w = s.submit(lambda _: True, klass=2)
    with pytest.raises(ValueError, match="classes"):
        s.set_classes(2)
    with pytest.raises(ValueError, match="class 3"):
        s.submit(lambda _: True, klass=3)
    s.set_classes(4)
    extra = s.submit(lambda _: True, klass=3)
    assert isinstance(w, Waiter) and isinstance(extra, Waiter)
    s.withdraw(w)
    s.withdraw(extra)
    s.set_classes(1)
    assert isinstance(busy, Lease)
    busy.release()
