"""The scheduler core, with no sockets: caps, work conservation, FIFO, cancellation, timeouts."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.errors import NoHealthyReplica, QueueFull, QueueTimeout
from proxy.core.replicas import Replica
from proxy.core.scheduler import Lease, Scheduler, Waiter


def make(*caps: int, max_queue: int = 100, clock: list[float] | None = None) -> Scheduler:
    now = clock if clock is not None else [0.0]
    replicas = [Replica(f"r{i}", f"http://127.0.0.1:{9000 + i}", c) for i, c in enumerate(caps)]
    return Scheduler(replicas, max_queue, clock=lambda: now[0])


@pytest.fixture
def leak_checked() -> Iterator[list[Scheduler]]:
    """Every scheduler a test registers must end with no waiter and no slot held."""
    made: list[Scheduler] = []
    yield made
    for scheduler in made:
        assert scheduler.idle(), f"leak: {scheduler!r}"


def test_core_imports_no_aiohttp() -> None:
    code = "import sys, proxy.core.scheduler, proxy.core.replicas; print('aiohttp' in sys.modules)"
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
    assert info.value.retry_after_s == 60  # no completion seen yet: no estimate
    assert s.withdraw(w)
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


def test_retry_after_follows_drain_rate() -> None:
    now = [0.0]
    s = make(1, clock=now)
    for t in range(10):  # 10 completions over 9 s (clamped span 9): ~1.1/s
        now[0] = float(t)
        lease = s.submit(lambda _: True)
        assert isinstance(lease, Lease)
        lease.release()
    assert s.retry_after_s(1) == 1
    assert s.retry_after_s(20) == 18
    assert s.retry_after_s(10_000) == 60
    now[0] = 1000.0  # the window forgot them all
    assert s.retry_after_s(1) == 60


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
    loop = asyncio.get_running_loop()
    held = await s.acquire(loop.time() + 60)
    task = asyncio.create_task(s.acquire(loop.time() + 60))
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
    loop = asyncio.get_running_loop()
    held = await s.acquire(loop.time() + 60)
    a = asyncio.create_task(s.acquire(loop.time() + 60))
    b = asyncio.create_task(s.acquire(loop.time() + 60))
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
    loop = asyncio.get_running_loop()
    held = await s.acquire(loop.time() + 60)
    a = asyncio.create_task(s.acquire(loop.time() + 60))
    b = asyncio.create_task(s.acquire(loop.time() + 60))
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
    loop = asyncio.get_running_loop()
    held = await s.acquire(loop.time() + 60)
    with pytest.raises(QueueTimeout) as info:
        await s.acquire(loop.time())  # deadline already reached: the timer fires next turn
    assert info.value.retry_after_s is not None and 1 <= info.value.retry_after_s <= 60
    assert s.queue_depth == 0
    held.release()


async def test_timeout_with_no_healthy_replica_says_so(leak_checked: list[Scheduler]) -> None:
    s = make(1)
    leak_checked.append(s)
    s.set_healthy(s.replicas[0], False)
    loop = asyncio.get_running_loop()
    with pytest.raises(NoHealthyReplica):
        await s.acquire(loop.time())


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
             "reap", "timeout", "health", "requeue"]
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

    for op, k in ops:
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
            assert c.waiter is not None and s.withdraw(c.waiter)
            c.waiter = None
        elif op == "vanish" and queued:
            queued[k % len(queued)].gone = True  # future cancelled, handler not yet run
        elif op == "reap" and vanished:
            c = vanished[k % len(vanished)]
            assert c.waiter is not None
            s.withdraw(c.waiter)  # may already be gone: dispatch skipped it
            c.waiter = None
        elif op == "health":
            r = s.replicas[k % len(s.replicas)]
            s.set_healthy(r, not r.healthy)

        # -- invariants after every step --
        holding = [c for c in m.clients if c.lease is not None and not c.lease.released]
        for r in s.replicas:
            assert 0 <= r.in_flight <= r.max_concurrency, repr(s)
            assert r.in_flight == sum(1 for c in holding if c.lease and c.lease.replica is r)
        live_waiting = [c for c in m.clients if c.waiter is not None and not c.gone]
        if live_waiting:
            for r in s.replicas:
                assert not r.healthy or r.in_flight == r.max_concurrency, repr(s)
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
    assert len(s._completions) <= 61  # one minute of completions, not all of them
