"""The scheduler core, with no sockets: caps, work conservation, FIFO, cancellation, timeouts."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.errors import DeadlineUnreachable, NoHealthyReplica, QueueFull, QueueTimeout
from proxy.core.estimate import start_in_s
from proxy.core.queue import FifoQueue
from proxy.core.replicas import Replica
from proxy.core.scheduler import Lease, Scheduler, Waiter

CORE = Path(__file__).resolve().parents[2] / "proxy" / "core"


def make(
    *caps: int,
    max_queue: int = 100,
    clock: list[float] | None = None,
    rng: Callable[[], float] = random.random,
) -> Scheduler:
    now = clock if clock is not None else [0.0]
    replicas = [Replica(f"r{i}", f"http://127.0.0.1:{9000 + i}", c) for i, c in enumerate(caps)]
    return Scheduler(replicas, max_queue, clock=lambda: now[0], rng=rng)




def test_core_imports_no_aiohttp() -> None:
    """Every module of proxy/core, imported together, pulls in no aiohttp."""
    names = sorted(p.stem for p in CORE.glob("*.py") if p.stem != "__init__")
    assert {"errors", "queue", "replicas", "scheduler"} <= set(names)
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module('proxy.core.' + name)\n"
        "print('aiohttp' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_lowest_load_first_ties_round_robin(leak_checked: list[Scheduler]) -> None:
    s = make(4, 2)
    leak_checked.append(s)
    leases = [s.submit(lambda _: True) for _ in range(6)]
    assert all(isinstance(x, Lease) for x in leases)
    # r0 0/4 vs r1 0/2 tie -> r0; then r1 (0 < 1/4); then r0 (1/4 < 1/2); ...
    assert [x.replica.name for x in leases if isinstance(x, Lease)] == [
        "r0", "r1", "r0", "r1", "r0", "r0",
    ]
    assert repr(s) == "<Scheduler queued=0/100 [r0 4/4, r1 2/2]>"
    for x in leases:
        assert isinstance(x, Lease)
        x.release()


def test_release_is_idempotent(leak_checked: list[Scheduler]) -> None:
    s = make(1)
    leak_checked.append(s)
    lease = s.submit(lambda _: True)
    assert isinstance(lease, Lease)
    lease.release()
    lease.release()
    assert repr(s) == "<Scheduler queued=0/100 [r0 0/1]>"


def test_fifo_and_handoff_on_release(leak_checked: list[Scheduler]) -> None:
    s = make(1)
    leak_checked.append(s)
    first = s.submit(lambda _: True)
    assert isinstance(first, Lease)
    order: list[int] = []
    held: list[Lease] = []

    def taker(i: int) -> object:
        def grant(lease: Lease) -> bool:
            order.append(i)
            held.append(lease)
            return True

        return grant

    waiters = [s.submit(taker(i)) for i in range(5)]  # type: ignore[arg-type]
    assert all(isinstance(w, Waiter) for w in waiters)
    assert repr(s) == "<Scheduler queued=5/100 [r0 1/1]>"
    first.release()
    while held:
        held.pop(0).release()
    assert order == [0, 1, 2, 3, 4]


def test_queue_full_and_zero_queue(leak_checked: list[Scheduler]) -> None:
    s = make(1, max_queue=1)
    leak_checked.append(s)
    lease = s.submit(lambda _: True)
    w = s.submit(lambda _: True)
    assert isinstance(w, Waiter)
    with pytest.raises(QueueFull) as info:
        s.submit(lambda _: True)
    assert info.value.retry_after_s == 1  # no completion seen yet: no estimate, 1 s
    assert w.queued and s.withdraw(w) == ()
    assert not w.queued and s.queue_depth == 0
    assert isinstance(lease, Lease)
    lease.release()

    z = make(1, max_queue=0)
    leak_checked.append(z)
    held = z.submit(lambda _: True)
    with pytest.raises(QueueFull):
        z.submit(lambda _: True)
    assert isinstance(held, Lease)
    held.release()


def test_no_healthy_replica_with_zero_queue(leak_checked: list[Scheduler]) -> None:
    s = make(2, max_queue=0)
    leak_checked.append(s)
    s.set_healthy(s.replicas[0], False)
    with pytest.raises(NoHealthyReplica):
        s.submit(lambda _: True)


def test_unhealthy_replica_is_skipped_and_recovery_serves_waiters(
    leak_checked: list[Scheduler],
) -> None:
    s = make(1, 1)
    leak_checked.append(s)
    s.set_healthy(s.replicas[0], False)
    a = s.submit(lambda _: True)
    assert isinstance(a, Lease) and a.replica.name == "r1"
    granted: list[Lease] = []
    w = s.submit(lambda lease: granted.append(lease) is None)
    assert isinstance(w, Waiter)
    s.set_healthy(s.replicas[0], True)
    assert [x.replica.name for x in granted] == ["r0"]
    a.release()
    granted[0].release()


def served(s: Scheduler, now: list[float], count: int, service_s: float) -> None:
    """``count`` requests, one after another, each holding its slot ``service_s``."""
    for _ in range(count):
        lease = s.submit(lambda _: True)
        assert isinstance(lease, Lease)
        now[0] += service_s
        lease.release()


def test_retry_after_is_one_second_without_history() -> None:
    """A cold proxy cannot estimate: it says 1 s, not 60 (callers obey it exactly)."""
    s = make(1)
    assert s.retry_after_s(1) == 1
    assert s.retry_after_s(500) == 1


def test_retry_after_is_position_times_mean_service_over_slots() -> None:
    now = [0.0]
    s = make(2, 2, clock=now, rng=lambda: 0.5)  # 4 slots
    served(s, now, 10, 2.0)  # mean service 2 s: capacity 4 slots / 2 s = 2 per second
    assert s.retry_after_s(8) == 4  # 8 ahead at 2/s
    assert s.retry_after_s(1) == 1  # 0.5 s, clamped up to 1
    assert s.retry_after_s(10_000) == 60  # clamped down
    s.set_healthy(s.replicas[1], False)  # half the slots: twice the wait
    assert s.retry_after_s(8) == 8
    now[0] += 1000.0  # the window forgot every measurement: no history again
    assert s.retry_after_s(8) == 1


def test_retry_after_rounds_at_random_so_callers_spread() -> None:
    now = [0.0]
    draws = [0.0]
    s = make(2, 2, clock=now, rng=lambda: draws[0])
    served(s, now, 10, 2.0)
    # 5 ahead at 2/s: 2.5 s, rounded up with probability 0.5.
    draws[0] = 0.49
    assert s.retry_after_s(5) == 3
    draws[0] = 0.5
    assert s.retry_after_s(5) == 2
    rng = random.Random(7)
    s2 = make(2, 2, clock=now, rng=rng.random)
    served(s2, now, 10, 2.0)
    values = [s2.retry_after_s(5) for _ in range(1000)]
    assert set(values) == {2, 3}
    assert 2.4 < sum(values) / len(values) < 2.6  # the mean stays the estimate


def test_queue_full_retry_after_uses_the_estimate() -> None:
    now = [0.0]
    s = make(1, max_queue=2, clock=now, rng=lambda: 0.5)
    served(s, now, 3, 3.0)
    lease = s.submit(lambda _: True)
    w1, w2 = s.submit(lambda _: True), s.submit(lambda _: True)
    with pytest.raises(QueueFull) as info:
        s.submit(lambda _: True)
    assert info.value.retry_after_s == 9  # third in line at one per 3 s
    for w in (w1, w2):
        assert isinstance(w, Waiter)
        s.withdraw(w)
    assert isinstance(lease, Lease)
    lease.release()


def test_queue_timeout_retry_after_uses_the_waiters_own_position() -> None:
    """The head of a long queue that times out is told its own wait, not the queue's length."""
    now = [0.0]
    s = make(1, clock=now, rng=lambda: 0.5)
    served(s, now, 3, 2.0)  # one slot, 2 s per request
    lease = s.submit(lambda _: True)
    told: list[object] = []
    head = s.submit(told.append, deadline=now[0] + 1)  # type: ignore[arg-type]
    for _ in range(9):
        s.submit(lambda _: True, deadline=now[0] + 60)
    now[0] += 1
    assert s.expire() == [head]
    (err,) = told
    assert isinstance(err, QueueTimeout)
    assert err.retry_after_s == 2  # first in line: one service time, not 10 of them
    middle = list(s._queue)[4]  # fifth in line
    s.withdraw(next(iter(s._queue)))
    assert s.position(middle) == 4
    for w in list(s._queue):
        s.withdraw(w)
    assert isinstance(lease, Lease)
    lease.release()


def test_front_requeue_goes_first_and_ignores_bound(leak_checked: list[Scheduler]) -> None:
    s = make(1, max_queue=1)
    leak_checked.append(s)
    lease = s.submit(lambda _: True)
    order: list[str] = []
    back = s.submit(lambda lz: order.append("back") is None and _keep(lz))
    front = s.submit(lambda lz: order.append("front") is None and _keep(lz), front=True)
    assert isinstance(back, Waiter) and isinstance(front, Waiter)
    assert isinstance(lease, Lease)
    lease.release()
    _drain_kept()
    assert order == ["front", "back"]


_kept: list[Lease] = []


def _keep(lease: Lease) -> bool:
    _kept.append(lease)
    return True


def _drain_kept() -> None:
    while _kept:
        _kept.pop(0).release()


# -- async waiting -------------------------------------------------------------------------


async def test_cancel_while_queued_leaves_at_once(leak_checked: list[Scheduler]) -> None:
    s = make(1)
    leak_checked.append(s)
    held = await s.acquire(s.now() + 60)
    task = asyncio.create_task(s.acquire(s.now() + 60))
    await asyncio.sleep(0)  # one turn: the task runs up to its await
    assert s.queue_depth == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert repr(s) == "<Scheduler queued=0/100 [r0 1/1]>"
    held.release()


async def test_cancel_while_granted_passes_slot_on(leak_checked: list[Scheduler]) -> None:
    s = make(1)
    leak_checked.append(s)
    held = await s.acquire(s.now() + 60)
    a = asyncio.create_task(s.acquire(s.now() + 60))
    b = asyncio.create_task(s.acquire(s.now() + 60))
    await asyncio.sleep(0)
    assert s.queue_depth == 2
    held.release()  # grants a's future synchronously ...
    a.cancel()  # ... and a is cancelled before it could resume
    with pytest.raises(asyncio.CancelledError):
        await a
    lease_b = await b  # the slot went on to b, not lost
    assert repr(s) == "<Scheduler queued=0/100 [r0 1/1]>"
    lease_b.release()


async def test_cancelled_future_is_skipped_by_dispatch(leak_checked: list[Scheduler]) -> None:
    """A waiter whose future is cancelled but whose handler has not run yet refuses grants."""
    s = make(1)
    leak_checked.append(s)
    held = await s.acquire(s.now() + 60)
    a = asyncio.create_task(s.acquire(s.now() + 60))
    b = asyncio.create_task(s.acquire(s.now() + 60))
    await asyncio.sleep(0)
    a.cancel()  # a's future is cancelled now; its except-block runs on the next turn
    held.release()
    lease_b = await b
    with pytest.raises(asyncio.CancelledError):
        await a
    lease_b.release()


async def test_queue_timeout(leak_checked: list[Scheduler]) -> None:
    s = make(1)
    leak_checked.append(s)
    held = await s.acquire(s.now() + 60)
    with pytest.raises(QueueTimeout) as info:
        await s.acquire(s.now())  # deadline already reached: the timer fires next turn
    assert info.value.retry_after_s is not None and 1 <= info.value.retry_after_s <= 60
    assert s.queue_depth == 0
    held.release()


async def test_timeout_with_no_healthy_replica_says_so(leak_checked: list[Scheduler]) -> None:
    s = make(1)
    leak_checked.append(s)
    s.set_healthy(s.replicas[0], False)
    with pytest.raises(NoHealthyReplica):
        await s.acquire(s.now())


async def test_a_later_waiter_with_an_earlier_deadline_is_not_held_by_the_first_timer(
    leak_checked: list[Scheduler],
) -> None:
    """One wake-up serves the queue, armed at the earliest deadline: a newcomer whose
    deadline comes first moves it forward, and the one behind it keeps waiting."""
    s = Scheduler([Replica("r0", "http://127.0.0.1:9000", 1)], 100)  # the real clock
    leak_checked.append(s)
    held = await s.acquire(s.now() + 60)
    patient = asyncio.create_task(s.acquire(s.now() + 60))
    await asyncio.sleep(0)
    with pytest.raises(QueueTimeout):
        await asyncio.wait_for(s.acquire(s.now() + 0.01), timeout=10)
    assert s.queue_depth == 1 and not patient.done()
    held.release()
    (await patient).release()


async def test_one_loop_timer_serves_every_queued_deadline(
    leak_checked: list[Scheduler], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A timer per waiter cost a loop handle and a closure each (P5's memory per queued
    request); the queue needs one, and none is left pending once nobody timed waits."""
    loop = asyncio.get_running_loop()
    handles: list[asyncio.TimerHandle] = []
    call_at = loop.call_at  # asyncio's call_later() comes here too

    def counted(when: float, callback: Callable[..., object], *args: object,
                **kwargs: object) -> asyncio.TimerHandle:
        handle = call_at(when, callback, *args, **kwargs)  # type: ignore[arg-type]
        handles.append(handle)
        return handle

    s = make(1, max_queue=1000)
    leak_checked.append(s)
    held = await s.acquire(s.now() + 60)
    monkeypatch.setattr(loop, "call_at", counted)
    tasks = [asyncio.create_task(s.acquire(s.now() + 60)) for _ in range(200)]
    await asyncio.sleep(0)
    assert s.queue_depth == 200
    assert len(handles) == 1, f"{len(handles)} loop timers for 200 waiters"
    tasks[-1].cancel()  # the latest deadline leaves: the wake-up stays where it is
    await asyncio.gather(tasks[-1], return_exceptions=True)
    held.release()
    for task in tasks[:-1]:
        (await task).release()
    assert len(handles) == 1 and handles[0].cancelled()  # nobody waits: nothing pending


async def test_a_jump_of_the_injected_clock_does_not_hold_a_newcomer_behind_the_old_wake_up(
    leak_checked: list[Scheduler],
) -> None:
    """The wake-up is on the loop's clock, worked out when armed: after the scheduler's
    clock jumped 999.9 s, a deadline 0.15 s away is 0.15 s away, not behind one armed for
    1,000 s."""
    now = [0.0]
    s = make(1, clock=now)
    leak_checked.append(s)
    held = await s.acquire(s.now() + 1000)
    first = asyncio.create_task(s.acquire(1000.0))  # its wake-up: 1,000 s from now
    await asyncio.sleep(0)
    now[0] = 999.9
    second = asyncio.create_task(s.acquire(1000.05))
    await asyncio.sleep(0)
    now[0] = 1000.1  # both deadlines passed on the scheduler's clock
    with pytest.raises(QueueTimeout):
        await asyncio.wait_for(second, timeout=10)
    assert first.done()  # due too: expired by the same wake-up
    with pytest.raises(QueueTimeout):
        await first
    held.release()


async def test_a_waiter_whose_notify_raises_does_not_stop_the_others_expiring(
    leak_checked: list[Scheduler],
) -> None:
    """Told of its expiry, a submit() caller raised: the wake-up still re-arms, and the
    waiter behind it expires at its own deadline."""
    s = Scheduler([Replica("r0", "http://127.0.0.1:9000", 1)], 100)  # the real clock
    leak_checked.append(s)
    held = await s.acquire(s.now() + 60)
    told: list[object] = []

    def rude(result: object) -> bool:
        told.append(result)
        raise RuntimeError("a notify that raises")

    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        s.submit(rude, deadline=s.now())  # type: ignore[arg-type]
        with pytest.raises(QueueTimeout):
            await asyncio.wait_for(s.acquire(s.now() + 0.05), timeout=10)
    finally:
        loop.set_exception_handler(None)
    assert len(told) == 1 and isinstance(told[0], QueueTimeout)
    assert [str(e.get("exception")) for e in errors] == ["a notify that raises"]
    assert s.queue_depth == 0
    held.release()


# -- property: caps, conservation, FIFO, under random sequences ---------------------------


@dataclass
class Client:
    seq: int
    front: bool = False
    waiter: Waiter | None = None
    lease: Lease | None = None
    gone: bool = False  # its future was cancelled; its except-block has not run yet
    granted_at: int | None = None


@dataclass
class Model:
    scheduler: Scheduler
    clients: list[Client] = field(default_factory=list)
    grants: list[Client] = field(default_factory=list)


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["arrive", "arrive", "arrive", "finish", "finish", "cancel", "vanish",
             "reap", "timeout", "health", "requeue", "limit", "add", "remove"]
        ),
        st.integers(min_value=0, max_value=10_000),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(
    caps=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=3),
    max_queue=st.integers(min_value=0, max_value=6),
    ops=OPS,
)
def test_property_cap_conservation_fifo(
    caps: list[int], max_queue: int, ops: list[tuple[str, int]]
) -> None:
    m = Model(make(*caps, max_queue=max_queue))
    s = m.scheduler

    def granter(c: Client) -> object:
        def grant(lease: Lease) -> bool:
            if c.gone:
                return False
            c.lease = lease
            c.waiter = None
            m.grants.append(c)
            return True

        return grant

    def arrive(front: bool) -> None:
        c = Client(seq=len(m.clients), front=front)
        try:
            got = s.submit(granter(c), front=front)  # type: ignore[arg-type]
        except (QueueFull, NoHealthyReplica):
            return
        m.clients.append(c)
        if isinstance(got, Lease):
            c.lease = got
        else:
            c.waiter = got

    for step, (op, k) in enumerate(ops):
        before = {r.name: r.in_flight for r in s.replicas}
        queued = [c for c in m.clients if c.waiter is not None and not c.gone]
        holding = [c for c in m.clients if c.lease is not None and not c.lease.released]
        vanished = [c for c in m.clients if c.gone and c.waiter is not None]
        if op == "arrive":
            arrive(front=False)
        elif op == "requeue":
            arrive(front=True)
        elif op == "finish" and holding:
            lease = holding[k % len(holding)].lease
            assert lease is not None
            lease.release()
        elif op in ("cancel", "timeout") and queued:
            c = queued[k % len(queued)]
            assert c.waiter is not None and c.waiter.queued
            assert s.withdraw(c.waiter) == ()  # leaving frees no slot
            assert not c.waiter.queued
            c.waiter = None
        elif op == "vanish" and queued:
            queued[k % len(queued)].gone = True  # future cancelled, handler not yet run
        elif op == "reap" and vanished:
            c = vanished[k % len(vanished)]
            assert c.waiter is not None
            s.withdraw(c.waiter)  # may already be gone: dispatch skipped it
            c.waiter = None
        elif op == "health" and s.replicas:
            r = s.replicas[k % len(s.replicas)]
            s.set_healthy(r, not r.healthy)
        elif op == "limit" and s.replicas:
            s.set_limit(s.replicas[k % len(s.replicas)], 1 + k % 4)
        elif op == "add" and len(s.replicas) < 5:
            s.add_replica(f"n{step}", "http://127.0.0.1:1", 1 + k % 3)
        elif op == "remove" and sum(r.state == "active" for r in s.replicas) > 1:
            # At least one replica stays: a draining one still listed does not count.
            s.remove_replica(s.replicas[k % len(s.replicas)])

        # -- invariants after every step --
        holding = [c for c in m.clients if c.lease is not None and not c.lease.released]
        for r in s.replicas:
            # A lowered limit cuts nothing, but no step may grant past it.
            assert 0 <= r.in_flight <= max(r.max_concurrency, before.get(r.name, 0)), repr(s)
            assert r.state in ("active", "draining"), repr(s)
            assert r.state == "active" or r.in_flight > 0, repr(s)
            assert r.in_flight == sum(1 for c in holding if c.lease and c.lease.replica is r)
        live_waiting = [c for c in m.clients if c.waiter is not None and not c.gone]
        if live_waiting:
            for r in s.replicas:
                assert not r.takes_work or r.in_flight >= r.max_concurrency, repr(s)
        assert s.queue_depth <= max(max_queue, 0) + sum(1 for c in m.clients if c.front)

    # FIFO: among plain arrivals that were queued, grants follow arrival order.
    plain = [c.seq for c in m.grants if not c.front]
    assert plain == sorted(plain)

    # Drain everything: the scheduler must come back to idle.
    for c in m.clients:
        if c.waiter is not None:
            s.withdraw(c.waiter)
            c.waiter = None
    for _ in range(len(m.clients) + 1):
        for c in list(m.clients):
            if c.lease is not None and not c.lease.released:
                c.lease.release()
    assert s.idle(), repr(s)


def test_drain_rate_window_is_bounded_however_long_it_runs() -> None:
    now = [0.0]
    s = make(1, clock=now)
    for _ in range(10_000):
        now[0] += 1.0
        lease = s.submit(lambda _: True)
        assert isinstance(lease, Lease)
        lease.release()
    assert len(s._service) <= 13  # one minute of buckets, not every completion


# -- the wait queue ------------------------------------------------------------------------


def test_fifo_queue_order_positions_and_front() -> None:
    q = FifoQueue()
    a, b, c = (Waiter(lambda _: True, deadline=0.0) for _ in range(3))
    q.push(a)
    q.push(b)
    q.push(c, front=True)
    assert [q.position(w) for w in (c, a, b)] == [1, 2, 3]
    assert q.remove(a) and not q.remove(a)
    assert q.position(a) is None and q.position(b) == 2
    assert [q.pop(), q.pop(), q.pop()] == [c, b, None]
    assert len(q) == 0


def test_scheduler_tells_a_waiters_position() -> None:
    s = make(1)
    lease = s.submit(lambda _: True)
    first, second = s.submit(lambda _: True), s.submit(lambda _: True)
    again = s.submit(lambda _: True, front=True)
    assert isinstance(first, Waiter) and isinstance(second, Waiter)
    assert isinstance(again, Waiter)
    assert [s.position(w) for w in (again, first, second)] == [1, 2, 3]
    for w in (first, second, again):
        s.withdraw(w)
    assert isinstance(lease, Lease)
    lease.release()


# -- decisions: grants ---------------------------------------------------------------------


def test_release_returns_the_grant_it_made(leak_checked: list[Scheduler]) -> None:
    s = make(1)
    leak_checked.append(s)
    lease = s.submit(lambda _: True)
    w = s.submit(lambda _: True)
    assert isinstance(lease, Lease) and isinstance(w, Waiter)
    grants = lease.release()
    assert [(g.waiter, g.lease.replica.name) for g in grants] == [(w, "r0")]
    assert w.lease is grants[0].lease and not w.queued
    assert lease.release() == ()  # idempotent: no second grant
    grants[0].lease.release()


def test_withdraw_after_grant_passes_the_slot_on(leak_checked: list[Scheduler]) -> None:
    """A caller cancelled in the instant it was granted: its withdraw hands the slot on."""
    s = make(1)
    leak_checked.append(s)
    lease = s.submit(lambda _: True)
    a, b = s.submit(lambda _: True), s.submit(lambda _: True)
    assert isinstance(lease, Lease) and isinstance(a, Waiter) and isinstance(b, Waiter)
    (grant,) = lease.release()
    assert grant.waiter is a
    (passed,) = s.withdraw(a)
    assert passed.waiter is b and a.lease is None
    assert repr(s) == "<Scheduler queued=0/100 [r0 1/1]>"
    passed.lease.release()


def test_add_replica_serves_waiters_at_once(leak_checked: list[Scheduler]) -> None:
    s = make(1)
    leak_checked.append(s)
    lease = s.submit(lambda _: True)
    waiters = [s.submit(lambda _: True) for _ in range(3)]
    grants = s.add_replica("r1", "http://127.0.0.1:9100", 2)
    assert [g.waiter for g in grants] == waiters[:2]
    assert {g.lease.replica.name for g in grants} == {"r1"}
    assert repr(s) == "<Scheduler queued=1/100 [r0 1/1, r1 2/2]>"
    with pytest.raises(ValueError, match="already exists"):
        s.add_replica("r1", "http://127.0.0.1:9100", 2)
    assert isinstance(waiters[2], Waiter)
    s.withdraw(waiters[2])
    for g in grants:
        g.lease.release()
    assert isinstance(lease, Lease)
    lease.release()


def test_remove_drains_first_then_the_replica_is_gone(leak_checked: list[Scheduler]) -> None:
    retired: list[str] = []
    now = [0.0]
    replicas = [Replica("r0", "http://a", 2), Replica("r1", "http://b", 2)]
    s = Scheduler(replicas, 100, clock=lambda: now[0], on_retired=lambda r: retired.append(r.name))
    leak_checked.append(s)
    held = s.submit(lambda _: True)
    assert isinstance(held, Lease) and held.replica.name == "r0"
    assert s.remove_replica(s.replicas[0]) is False  # it holds work: draining
    assert repr(s) == "<Scheduler queued=0/100 [r0 1/2 draining, r1 0/2]>"
    more = [s.submit(lambda _: True) for _ in range(2)]
    assert [x.replica.name for x in more if isinstance(x, Lease)] == ["r1", "r1"]
    queued = s.submit(lambda _: True)
    assert isinstance(queued, Waiter)  # r0 has a free slot, but takes no new work
    assert held.release() == () and retired == ["r0"]  # its last work done: gone
    assert [r.name for r in s.replicas] == ["r1"]
    assert repr(s) == "<Scheduler queued=1/100 [r1 2/2]>"
    (grant,) = more[0].release()  # type: ignore[union-attr]
    assert grant.waiter is queued and grant.lease.replica.name == "r1"
    grant.lease.release()
    more[1].release()  # type: ignore[union-attr]
    assert s.remove_replica(s.replicas[0]) is True and retired == ["r0", "r1"]  # idle: at once


def test_set_limit_up_grants_down_cuts_nothing(leak_checked: list[Scheduler]) -> None:
    s = make(1)
    leak_checked.append(s)
    r0 = s.replicas[0]
    first = s.submit(lambda _: True)
    waiters = [s.submit(lambda _: True) for _ in range(3)]
    grants = s.set_limit(r0, 3)
    assert [g.waiter for g in grants] == waiters[:2]
    assert s.set_limit(r0, 1) == ()  # three in flight over a limit of one: none is cut
    assert repr(s) == "<Scheduler queued=1/100 [r0 3/1]>"
    assert isinstance(first, Lease)
    assert first.release() == () and grants[0].lease.release() == ()  # still at the limit
    (last,) = grants[1].lease.release()  # under the limit now: the next waiter goes
    assert last.waiter is waiters[2]
    last.lease.release()
    with pytest.raises(ValueError, match="max_concurrency"):
        s.set_limit(r0, 0)


def test_set_healthy_returns_grants(leak_checked: list[Scheduler]) -> None:
    s = make(1)
    leak_checked.append(s)
    r0 = s.replicas[0]
    assert s.set_healthy(r0, False) == ()
    w = s.submit(lambda _: True)
    assert isinstance(w, Waiter)
    assert s.set_healthy(r0, False) == ()  # no change, no decision
    (grant,) = s.set_healthy(r0, True)
    assert grant.waiter is w
    grant.lease.release()


# -- deadlines on the injected clock -------------------------------------------------------


async def test_deadline_is_decided_by_the_injected_clock(leak_checked: list[Scheduler]) -> None:
    now = [100.0]
    s = make(1, clock=now)
    leak_checked.append(s)
    held = await s.acquire(s.now() + 5)
    task = asyncio.create_task(s.acquire(s.now() + 5))  # the loop timer is 5 real seconds away
    await asyncio.sleep(0)
    assert s.expire() == [] and s.queue_depth == 1  # not yet on the scheduler's clock
    now[0] = 105.0
    (expired,) = s.expire()
    assert not expired.queued and s.queue_depth == 0
    with pytest.raises(QueueTimeout):
        await task
    held.release()


# -- the byte bound ------------------------------------------------------------------------


def test_queued_bodies_are_bounded_in_bytes(leak_checked: list[Scheduler]) -> None:
    s = Scheduler([Replica("r0", "http://a", 1)], 100, max_bytes=100)
    leak_checked.append(s)
    lease = s.submit(lambda _: True, size=10_000)  # a free slot: never queued, never counted
    assert isinstance(lease, Lease) and s.queued_bytes == 0
    big = s.submit(lambda _: True, size=60)
    assert isinstance(big, Waiter) and s.queued_bytes == 60
    with pytest.raises(QueueFull, match=r"queue\.max_bytes \(100 bytes\)") as info:
        s.submit(lambda _: True, size=41)
    assert info.value.reason == "queue_full" and info.value.retry_after_s is not None
    fits = s.submit(lambda _: True, size=40)  # exactly at the limit: not past it
    assert isinstance(fits, Waiter) and s.queued_bytes == 100
    again = s.submit(lambda _: True, size=50, front=True)  # admitted once: not refused now
    assert isinstance(again, Waiter) and s.queued_bytes == 150
    assert repr(s) == "<Scheduler queued=3/100 150/100 bytes [r0 1/1]>"
    s.withdraw(fits)
    assert s.queued_bytes == 110
    (grant,) = lease.release()  # the head leaves the queue with its body
    assert grant.waiter is again and s.queued_bytes == 60
    (grant2,) = grant.lease.release()
    assert grant2.waiter is big and s.queued_bytes == 0
    grant2.lease.release()


async def test_acquire_counts_the_body_while_it_waits(leak_checked: list[Scheduler]) -> None:
    s = Scheduler([Replica("r0", "http://a", 1)], 100, max_bytes=100)
    leak_checked.append(s)
    held = await s.acquire(s.now() + 60, size=500)
    task = asyncio.create_task(s.acquire(s.now() + 60, size=70))
    await asyncio.sleep(0)
    assert s.queued_bytes == 70
    with pytest.raises(QueueFull):
        await s.acquire(s.now() + 60, size=31)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s.queued_bytes == 0
    held.release()


# -- early refusal: a waiter that cannot start before its deadline -------------------------


def test_early_refusal_when_the_ones_ahead_take_longer_than_the_deadline(
    leak_checked: list[Scheduler],
) -> None:
    """One slot at 2 s a request: the 4th in line starts in about 3 x 2 s = 6 s at the
    earliest; a deadline 5 s away cannot be met and is refused now, one 7 s away waits."""
    now = [0.0]
    s = make(1, clock=now, rng=lambda: 0.5)
    leak_checked.append(s)
    served(s, now, 3, 2.0)
    lease = s.submit(lambda _: True)
    ahead = [s.submit(lambda _: True, deadline=now[0] + 60) for _ in range(3)]
    with pytest.raises(DeadlineUnreachable) as info:
        s.submit(lambda _: True, deadline=now[0] + 5)
    assert info.value.status == 429 and info.value.reason == "deadline_unreachable"
    assert info.value.retry_after_s == 8  # fourth in line at one per 2 s
    assert not info.value.waited
    assert s.queue_depth == 3  # the refused one never joined
    fourth = s.submit(lambda _: True, deadline=now[0] + 7)
    assert isinstance(fourth, Waiter)
    for w in [*ahead, fourth]:
        assert isinstance(w, Waiter)
        s.withdraw(w)
    assert isinstance(lease, Lease)
    lease.release()


def test_no_early_refusal_without_history_for_the_head_or_a_resend(
    leak_checked: list[Scheduler],
) -> None:
    now = [0.0]
    s = make(1, clock=now, rng=lambda: 0.5)
    leak_checked.append(s)
    lease = s.submit(lambda _: True)
    # No completion measured yet: the rate is unknown, so nobody is refused early.
    cold = [s.submit(lambda _: True, deadline=now[0] + 0.001) for _ in range(5)]
    assert all(isinstance(w, Waiter) for w in cold)
    for w in cold:
        s.withdraw(w)  # type: ignore[arg-type]
    assert isinstance(lease, Lease)
    lease.release()
    served(s, now, 3, 2.0)
    lease = s.submit(lambda _: True)
    # Nobody ahead: the next slot to free is its, however short its deadline.
    head = s.submit(lambda _: True, deadline=now[0] + 0.001)
    assert isinstance(head, Waiter)
    # A resend re-enters at the head and was admitted once already: never refused early.
    others = [s.submit(lambda _: True, deadline=now[0] + 60) for _ in range(5)]
    resend = s.submit(lambda _: True, deadline=now[0] + 0.001, front=True)
    assert isinstance(resend, Waiter)
    for w in [head, *others, resend]:
        s.withdraw(w)  # type: ignore[arg-type]
    lease.release()  # type: ignore[union-attr]


def test_no_early_refusal_while_no_replica_is_usable(leak_checked: list[Scheduler]) -> None:
    """With no healthy replica the line does not move at any measured rate: it waits (its
    deadline still ends it), rather than being refused on a guess."""
    now = [0.0]
    s = make(1, clock=now, rng=lambda: 0.5)
    leak_checked.append(s)
    served(s, now, 3, 2.0)
    s.set_healthy(s.replicas[0], False)
    waiters = [s.submit(lambda _: True, deadline=now[0] + 1) for _ in range(5)]
    assert all(isinstance(w, Waiter) for w in waiters)
    for w in waiters:
        s.withdraw(w)  # type: ignore[arg-type]


def test_start_estimate_is_the_ones_ahead_at_the_measured_rate() -> None:
    assert start_in_s(1, 4, 2.0) == 0.0
    assert start_in_s(9, 4, 2.0) == 4.0
    assert start_in_s(9, 4, None) is None
    assert start_in_s(9, 0, 2.0) is None
