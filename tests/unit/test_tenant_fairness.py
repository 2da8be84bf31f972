"""Deficit round-robin among the tenants of a class: shares, bursts, bounds, positions."""

from __future__ import annotations

import pytest

from proxy.core.errors import DeadlineUnreachable, QueueFull
from proxy.core.replicas import Replica
from proxy.core.scheduler import Lease, Scheduler, TenantPolicy, Waiter


class Served:
    """Waiters that record the tenant of each grant and hold it until :meth:`next`."""

    def __init__(self, s: Scheduler) -> None:
        self.s = s
        self.order: list[str] = []
        self.held: list[Lease] = []

    def wait(self, tenant: str, **kwargs: object) -> Waiter:
        def notify(result: object) -> bool:
            assert isinstance(result, Lease)
            self.order.append(tenant)
            self.held.append(result)
            return True

        got = self.s.submit(notify, tenant=tenant, **kwargs)  # type: ignore[arg-type]
        assert isinstance(got, Waiter), got
        return got

    def next(self, count: int = 1) -> None:
        """Finish the oldest ``count`` leases (each hands its slot on)."""
        for _ in range(count):
            self.held.pop(0).release()


def busy_scheduler(policy: TenantPolicy | None = None) -> tuple[Scheduler, Served]:
    s = Scheduler([Replica("r", "http://r", 1)], 10_000, tenants=policy)
    served = Served(s)
    first = s.submit(lambda _: True)
    assert isinstance(first, Lease)
    served.held.append(first)
    return s, served


def test_backlogged_tenants_share_dispatches_by_weight(leak_checked: list[Scheduler]) -> None:
    s, served = busy_scheduler(TenantPolicy(weights={"a": 3.0, "b": 1.0}))
    leak_checked.append(s)
    for _ in range(60):
        served.wait("a")
    for _ in range(20):
        served.wait("b")  # arrived after all of a's: FIFO would serve a's 60 first
    served.next(40)  # the first lease, then 39 of theirs: 40 grants
    assert served.order[:8] == ["a", "a", "a", "b", "a", "a", "a", "b"]
    assert served.order.count("a") == 30 and served.order.count("b") == 10
    served.next(len(served.held) + s.queue_depth)


def test_fractional_weights_carry_their_credit_over(leak_checked: list[Scheduler]) -> None:
    s, served = busy_scheduler(TenantPolicy(weights={"a": 1.5, "b": 1.0}))
    leak_checked.append(s)
    for _ in range(40):
        served.wait("a")
        served.wait("b")
    served.next(50)
    assert served.order.count("a") == 30 and served.order.count("b") == 20
    served.next(len(served.held) + s.queue_depth)


def test_a_burst_delays_another_tenants_request_by_one_quantum(
    leak_checked: list[Scheduler],
) -> None:
    s, served = busy_scheduler(TenantPolicy(weights={"batch": 2.0}))
    leak_checked.append(s)
    for _ in range(1000):
        served.wait("batch")
    single = served.wait("user")
    assert s.position(single) == 3  # two of batch's quantum, then it
    served.next(3)
    assert served.order == ["batch", "batch", "user"]
    served.next(len(served.held) + s.queue_depth)


def test_a_tenant_that_empties_leaves_the_ring_and_forgets_its_credit(
    leak_checked: list[Scheduler],
) -> None:
    s, served = busy_scheduler()
    leak_checked.append(s)
    served.wait("a")
    served.next(1)  # a served and gone: no credit banked while idle
    for _ in range(3):
        served.wait("b")
    for _ in range(3):
        served.wait("a")  # joins at the end of the ring, behind b
    served.next(6)
    assert served.order == ["a", "b", "a", "b", "a", "b", "a"]
    served.next(len(served.held) + s.queue_depth)


def test_a_tenant_is_bounded_by_its_max_queued(leak_checked: list[Scheduler]) -> None:
    policy = TenantPolicy(max_queued={"batch": 2}, default_max_queued=1)
    s, served = busy_scheduler(policy)
    leak_checked.append(s)
    served.wait("batch")
    served.wait("batch")
    with pytest.raises(QueueFull, match="tenant 'batch'") as info:
        s.submit(lambda _: True, tenant="batch")
    assert info.value.status == 429 and not info.value.waited
    served.wait("other")
    with pytest.raises(QueueFull, match="tenant 'other'"):
        s.submit(lambda _: True, tenant="other")
    s.set_tenant_policy(TenantPolicy())  # a reload lifts the bounds
    served.wait("other")
    served.next(5)
    assert len(served.order) == 4


def test_positions_estimate_the_round_robin(leak_checked: list[Scheduler]) -> None:
    s, served = busy_scheduler(TenantPolicy(weights={"a": 2.0}))
    leak_checked.append(s)
    a = [served.wait("a") for _ in range(6)]
    b = [served.wait("b") for _ in range(3)]
    # a has two dispatches a turn, b one: a a b a a b a a b
    assert [s.position(w) for w in a] == [1, 2, 4, 5, 7, 8]
    assert [s.position(w) for w in b] == [3, 6, 9]
    served.next(10)
    assert served.order == ["a", "a", "b", "a", "a", "b", "a", "a", "b"]


def test_invalid_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="weight of tenant 'a'"):
        TenantPolicy(weights={"a": 0.0})
    with pytest.raises(ValueError, match="max_queued of tenant 'a'"):
        TenantPolicy(max_queued={"a": -1})


def test_early_refusal_uses_the_round_robin_position(leak_checked: list[Scheduler]) -> None:
    """Behind another tenant's backlog of 10, a tenant's first request is second in line
    (one of the backlog's quantum, then it): it can start well before a 5 s deadline at 2 s
    a request, while the backlog's own next cannot."""
    now = [0.0]
    s = Scheduler([Replica("r", "http://r", 1)], 100, clock=lambda: now[0], rng=lambda: 0.5)
    leak_checked.append(s)
    for _ in range(3):
        lease = s.submit(lambda _: True)
        assert isinstance(lease, Lease)
        now[0] += 2.0
        lease.release()
    held = s.submit(lambda _: True)
    backlog = [s.submit(lambda _: True, tenant="a", deadline=now[0] + 60) for _ in range(10)]
    with pytest.raises(DeadlineUnreachable):
        s.submit(lambda _: True, tenant="a", deadline=now[0] + 5)
    other = s.submit(lambda _: True, tenant="b", deadline=now[0] + 5)
    assert isinstance(other, Waiter) and s.position(other) == 2
    for w in [*backlog, other]:
        assert isinstance(w, Waiter)
        s.withdraw(w)
    assert isinstance(held, Lease)
    held.release()
