"""Token budgets: a replica holds leases whose costs sum to at most its max_tokens_in_flight."""

from __future__ import annotations

import pytest

from proxy.core.errors import RequestTooLarge
from proxy.core.replicas import Replica
from proxy.core.scheduler import Lease, Scheduler, Waiter


def budgeted(*budgets: int | None, slots: int = 4) -> Scheduler:
    return Scheduler(
        [Replica(f"r{i}", f"http://r{i}", slots, max_tokens=b) for i, b in enumerate(budgets)],
        10,
    )


def take(s: Scheduler, cost: int, **kwargs: object) -> Lease:
    got = s.submit(lambda _: True, cost=cost, **kwargs)  # type: ignore[arg-type]
    assert isinstance(got, Lease), got
    return got


def wait(s: Scheduler, cost: int, told: list[object] | None = None) -> Waiter:
    def notify(result: object) -> bool:
        if told is not None:
            told.append(result)
        return True

    got = s.submit(notify, cost=cost)  # type: ignore[arg-type]
    assert isinstance(got, Waiter), got
    return got


def test_leases_hold_their_cost_until_released(leak_checked: list[Scheduler]) -> None:
    s = budgeted(100)
    leak_checked.append(s)
    a = take(s, 60)
    assert a.cost == 60 and s.replicas[0].tokens_in_flight == 60
    assert repr(s) == "<Scheduler queued=0/10 [r0 1/4 60/100 tokens]>"
    w = wait(s, 50)  # a slot is free, its tokens are not
    (grant,) = a.release()
    assert grant.waiter is w and grant.lease.cost == 50
    assert s.replicas[0].tokens_in_flight == 50
    grant.lease.release()
    assert a.release() == () and s.replicas[0].tokens_in_flight == 0


def test_a_request_too_large_for_every_replica_is_refused(
    leak_checked: list[Scheduler],
) -> None:
    s = budgeted(100, 300)
    leak_checked.append(s)
    with pytest.raises(RequestTooLarge) as info:
        s.submit(lambda _: True, cost=301)
    err = info.value
    assert (err.status, err.code, err.type) == (400, "request_too_large", "invalid_request_error")
    assert "301" in err.message and "300" in err.message
    big = take(s, 300)
    assert big.replica.name == "r1"
    big.release()
    unbounded = budgeted(100, None)
    leak_checked.append(unbounded)
    take(unbounded, 10_000).release()  # a replica with no budget takes any cost


def test_a_large_waiter_is_not_starved_by_small_ones(leak_checked: list[Scheduler]) -> None:
    """The replica is kept for the head that does not fit yet: a small request that would
    fit waits behind it instead of taking the tokens it waits for."""
    s = budgeted(100)
    leak_checked.append(s)
    first = take(s, 60)
    big = wait(s, 80)
    small = wait(s, 30)  # 60 + 30 fits, but the replica is kept for big
    assert s.replicas[0].tokens_in_flight == 60 and small.queued
    (grant,) = first.release()
    assert grant.waiter is big
    (grant2,) = grant.lease.release()
    assert grant2.waiter is small
    grant2.lease.release()


def test_withdrawing_the_kept_for_waiter_serves_the_next(leak_checked: list[Scheduler]) -> None:
    s = budgeted(100)
    leak_checked.append(s)
    first = take(s, 60)
    big = wait(s, 80)
    small = wait(s, 30)
    (grant,) = s.withdraw(big)
    assert grant.waiter is small and not small.queued
    grant.lease.release()
    first.release()


def test_a_lowered_budget_refuses_the_waiters_it_can_never_hold(
    leak_checked: list[Scheduler],
) -> None:
    s = budgeted(100)
    leak_checked.append(s)
    first = take(s, 60)
    told: list[object] = []
    wait(s, 80, told)
    assert s.set_token_limit(s.replicas[0], 70) == ()
    (err,) = told
    assert isinstance(err, RequestTooLarge) and err.waited
    assert s.queue_depth == 0
    first.release()
