"""Model routing in the scheduler core: each request goes only to replicas serving its model."""

from __future__ import annotations

import asyncio

import pytest

from proxy.core.errors import DeadlineUnreachable, ModelNotFound, QueueFull
from proxy.core.replicas import Replica
from proxy.core.scheduler import Lease, Scheduler, Waiter

M1 = frozenset({"m1"})
M2 = frozenset({"m2"})


def two_models(max_queue: int = 10) -> Scheduler:
    return Scheduler(
        [Replica("a", "http://a", 1, models=M1), Replica("b", "http://b", 1, models=M2)],
        max_queue,
    )




def take(s: Scheduler, **kwargs: object) -> Lease:
    got = s.submit(lambda _: True, **kwargs)  # type: ignore[arg-type]
    assert isinstance(got, Lease), got
    return got


def wait(s: Scheduler, told: list[object] | None = None, **kwargs: object) -> Waiter:
    def notify(result: object) -> bool:
        if told is not None:
            told.append(result)
        return True

    got = s.submit(notify, **kwargs)  # type: ignore[arg-type]
    assert isinstance(got, Waiter), got
    return got


def test_each_model_goes_only_to_its_replicas(leak_checked: list[Scheduler]) -> None:
    s = two_models()
    leak_checked.append(s)
    lb = take(s, model="m2")
    assert lb.replica.name == "b"
    w = wait(s, model="m2")  # b is full; a has a free slot but does not serve m2
    la = take(s, model="m1")
    assert la.replica.name == "a"
    (grant,) = lb.release()
    assert grant.waiter is w and grant.lease.replica.name == "b"
    grant.lease.release()
    la.release()


def test_a_model_nobody_serves_is_not_found_without_a_slot_or_a_wait(
    leak_checked: list[Scheduler],
) -> None:
    s = two_models()
    leak_checked.append(s)
    assert s.serves("m1") and s.serves("m2") and not s.serves("m3")
    with pytest.raises(ModelNotFound) as info:
        s.submit(lambda _: True, model="m3")
    err = info.value
    assert (err.status, err.code, err.type) == (404, "model_not_found", "invalid_request_error")
    assert "'m3'" in err.message and not err.waited
    assert repr(s) == "<Scheduler queued=0/10 [a 0/1, b 0/1]>"
    assert s.models() == ["m1", "m2"]


def test_no_model_named_goes_to_any_replica(leak_checked: list[Scheduler]) -> None:
    """POST /v1/tokenize names no model: it is served although every replica has a list."""
    s = two_models()
    leak_checked.append(s)
    assert s.serves(None)
    leases = [take(s), take(s)]
    assert {x.replica.name for x in leases} == {"a", "b"}
    for x in leases:
        x.release()


def test_model_blind_replicas_serve_any_model_as_before(leak_checked: list[Scheduler]) -> None:
    s = Scheduler([Replica("a", "http://a", 1), Replica("b", "http://b", 1, models=M2)], 10)
    leak_checked.append(s)
    assert s.serves("anything") and s.models() == ["m2"]
    x = take(s, model="anything")
    assert x.replica.name == "a"
    w = wait(s, model="anything")  # b serves only m2
    (grant,) = x.release()
    assert grant.waiter is w
    grant.lease.release()


def test_a_request_that_can_start_is_never_refused_for_a_full_queue(
    leak_checked: list[Scheduler],
) -> None:
    """No head-of-line blocking across models: m1's waiters fill the queue, m2 has room."""
    s = two_models(max_queue=1)
    leak_checked.append(s)
    busy = take(s, model="m1")
    w = wait(s, model="m1")
    with pytest.raises(QueueFull):
        s.submit(lambda _: True, model="m1")
    free = take(s, model="m2")  # the queue is full, but b is free and nobody waits for it
    assert free.replica.name == "b"
    free.release()
    s.withdraw(w)
    busy.release()


def test_pending_models_wait_and_are_settled_by_set_models(
    leak_checked: list[Scheduler],
) -> None:
    s = Scheduler([Replica("a", "http://a", 1, models=M1)], 10)
    leak_checked.append(s)
    assert s.add_replica("p", "http://p", 2, models_pending=True) == ()
    assert s.serves("m9")  # p's list is not read yet: it may serve m9
    told: list[object] = []
    w9 = wait(s, told, model="m9")
    w8 = wait(s, told, model="m8")
    assert s.depths() == {(0, "m9"): 1, (0, "m8"): 1}
    (grant,) = s.set_models(s.replicas[1], frozenset({"m9"}))
    assert grant.waiter is w9 and grant.lease.replica.name == "p"
    (err,) = [x for x in told if not isinstance(x, Lease)]  # m8 is told first, then m9 served
    assert isinstance(err, ModelNotFound) and err.waited and not w8.queued
    assert not s.serves("m8") and s.depths() == {}
    grant.lease.release()


def test_waiters_of_an_unhealthy_replicas_model_wait(leak_checked: list[Scheduler]) -> None:
    s = two_models()
    leak_checked.append(s)
    s.set_healthy(s.replicas[0], False)
    assert s.serves("m1")
    w = wait(s, model="m1")
    (grant,) = s.set_healthy(s.replicas[0], True)
    assert grant.waiter is w
    grant.lease.release()


async def test_on_queued_is_called_once_when_the_request_waits(
    leak_checked: list[Scheduler],
) -> None:
    s = two_models()
    leak_checked.append(s)
    queued: list[Waiter] = []
    held = await s.acquire(s.now() + 60, model="m1", on_queued=queued.append)
    assert queued == []  # a free slot at once: no wait, no heartbeat
    task = asyncio.create_task(s.acquire(s.now() + 60, model="m1", on_queued=queued.append))
    await asyncio.sleep(0)
    assert len(queued) == 1 and queued[0].queued and s.position(queued[0]) == 1
    held.release()
    lease = await task
    assert len(queued) == 1 and lease.replica.name == "a"
    lease.release()


def test_waiters_admitted_before_any_replica_wait_for_theirs(
    leak_checked: list[Scheduler],
) -> None:
    """Scaling up from zero: a request waits for whatever model; the first replica found,
    serving another model, does not refuse it (the one serving it may be the next)."""
    s = Scheduler([], 10)
    leak_checked.append(s)
    assert s.serves("m2")
    w = wait(s, model="m2")
    assert s.add_replica("a", "http://a", 1, models=M1) == ()
    assert w.queued and not s.serves("m3")
    (grant,) = s.add_replica("b", "http://b", 1, models=M2)
    assert grant.waiter is w
    grant.lease.release()


async def test_a_failing_on_queued_hook_leaves_no_waiter(leak_checked: list[Scheduler]) -> None:
    s = two_models()
    leak_checked.append(s)
    held = await s.acquire(s.now() + 60, model="m1")

    def broken(waiter: Waiter) -> None:
        raise RuntimeError("heartbeat failed")

    with pytest.raises(RuntimeError, match="heartbeat"):
        await s.acquire(s.now() + 60, model="m1", on_queued=broken)
    assert s.queue_depth == 0
    held.release()


def test_the_pick_among_a_models_replicas_is_least_loaded_round_robin(
    leak_checked: list[Scheduler],
) -> None:
    s = Scheduler([Replica("a", "http://a", 2, models=M1), Replica("x", "http://x", 4, models=M2),
                   Replica("b", "http://b", 2, models=M1)], 10)
    leak_checked.append(s)
    leases = [take(s, model="m1") for _ in range(4)]
    assert [x.replica.name for x in leases] == ["a", "b", "a", "b"]
    assert s.replicas[1].in_flight == 0
    for x in leases:
        x.release()
    avoided = take(s, model="m1", avoid=s.replicas[0])
    assert avoided.replica.name == "b"  # a just refused it: b, though both are idle
    avoided.release()


def test_position_and_early_refusal_count_only_waiters_of_the_same_replicas(
    leak_checked: list[Scheduler],
) -> None:
    """A request first in line for its model's replica is the head of its queue, whatever
    waits for other models: early refusal, Retry-After and the heartbeat's position say so
    (found by the acceptance review: '10 requests ahead' for an m2 request behind m1's)."""
    now = [0.0]
    s = Scheduler(
        [Replica("a", "http://a", 1, models=M1), Replica("b", "http://b", 1, models=M2)],
        20, clock=lambda: now[0],
    )
    leak_checked.append(s)
    for model in ("m1", "m2", "m1", "m2"):  # history: slots held 0.5 s each
        lease = take(s, model=model)
        now[0] += 0.5
        lease.release()
    held = [take(s, model="m1"), take(s, model="m2")]
    m1_waiters = [wait(s, model="m1") for _ in range(10)]
    # 10 m1 waiters at 0.5 s on one slot would be 5 s: an m1 request with 2 s is refused...
    with pytest.raises(DeadlineUnreachable, match="10 requests ahead"):
        s.submit(lambda _: True, model="m1", deadline=now[0] + 2)
    # ... but an m2 request is first in line for b, and waits.
    m2 = wait(s, model="m2", deadline=now[0] + 2)
    assert s.position(m2) == 1
    assert s.position(m1_waiters[-1]) == 10
    pending = list(held)
    while pending:  # release each lease, and each the releases granted, until none is left
        pending.extend(grant.lease for grant in pending.pop().release())
    assert m2.lease is not None and all(w.lease is not None for w in m1_waiters)
