"""Admission control: one bounded FIFO queue in front of per-replica concurrency slots.

This is the heart of batchgate and does no I/O (it must not import aiohttp; a test checks).
Decisions are made synchronously, in :meth:`Scheduler._dispatch`, at the only moments capacity
can appear: a request arrives, a slot is released, a replica turns healthy. The async
:meth:`Scheduler.acquire` only waits for the decision, so there is no polling loop and no gap
between one request finishing and the next starting.

Guarantees:

* a replica never has more than ``max_concurrency`` leases out;
* while anyone waits, every healthy replica has all of its slots leased (work conservation);
* waiters are served in arrival order; a retried request may re-enter at the head;
* a waiter that is cancelled leaves the queue at once; a slot granted to a waiter that is
  cancelled in the same instant passes to the next waiter, never lost;
* each :class:`Lease` gives its slot back exactly once, however often ``release`` is called.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from proxy.core.errors import NoHealthyReplica, ProxyError, QueueFull, QueueTimeout
from proxy.core.replicas import Replica

#: How far back completions count towards the drain rate behind ``Retry-After``.
DRAIN_WINDOW_S = 60.0
RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 60


class Lease:
    """One slot on one replica, held for exactly as long as the request uses it."""

    __slots__ = ("_scheduler", "released", "replica")

    def __init__(self, scheduler: Scheduler, replica: Replica) -> None:
        self._scheduler = scheduler
        self.replica = replica
        self.released = False

    def release(self) -> None:
        """Give the slot back (idempotent). Safe to call from ``finally`` on any path."""
        self._scheduler.release(self)

    def __repr__(self) -> str:
        return f"<Lease {self.replica.name}{' released' if self.released else ''}>"


#: Called with the lease when a queued waiter is granted a slot. Returns False when the waiter
#: can no longer take it (its caller has just gone), so the slot goes to the next in line.
GrantCallback = Callable[[Lease], bool]


class Waiter:
    """A queued request. Identity is the key in the queue."""

    __slots__ = ("_on_grant", "lease")

    def __init__(self, on_grant: GrantCallback) -> None:
        self._on_grant = on_grant
        self.lease: Lease | None = None


class Scheduler:
    """The bounded queue and the slots of every replica.

    ``max_queue`` bounds the waiters (0: no waiting, a request that finds no free slot is
    refused at once). ``clock`` is injectable so ``Retry-After`` is testable without sleeping.
    """

    def __init__(
        self,
        replicas: Sequence[Replica],
        max_queue: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not replicas:
            raise ValueError("at least one replica is required")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.replicas: tuple[Replica, ...] = tuple(replicas)
        for i, replica in enumerate(self.replicas):
            replica.index = i
        self.max_queue = max_queue
        self._clock = clock
        # An OrderedDict, not a deque: a cancelled waiter must leave in O(1) from anywhere,
        # and a retried request must re-enter at the head.
        self._waiters: OrderedDict[Waiter, None] = OrderedDict()
        self._next = 0  # round-robin start for tie-breaking
        self._completions: deque[float] = deque()

    # -- observation ---------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    def any_healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    def idle(self) -> bool:
        """No waiter and no slot held: what every test checks at its end."""
        return not self._waiters and self.in_flight == 0

    def __repr__(self) -> str:
        replicas = ", ".join(
            f"{r.name} {r.in_flight}/{r.max_concurrency}{'' if r.healthy else ' down'}"
            for r in self.replicas
        )
        return f"<Scheduler queued={len(self._waiters)}/{self.max_queue} [{replicas}]>"

    # -- decisions (synchronous) ---------------------------------------------------------

    def submit(self, on_grant: GrantCallback, *, front: bool = False) -> Lease | Waiter:
        """Take a slot now, or join the queue.

        ``front`` puts a request back at the head: it was admitted once already and lost its
        slot through no fault of its own (the replica refused the connection), so it neither
        goes to the back nor counts against the queue's bound.

        Raises :class:`QueueFull`, or :class:`NoHealthyReplica` when waiting is not allowed
        and no replica is healthy.
        """
        if not self._waiters:
            replica = self._pick()
            if replica is not None:
                return self._lease(replica)
        if not front and len(self._waiters) >= self.max_queue:
            if self.max_queue == 0 and not self.any_healthy():
                raise NoHealthyReplica("no healthy replica", retry_after_s=RETRY_AFTER_MIN_S)
            raise QueueFull(
                f"queue is full ({self.max_queue} waiting); retry later",
                retry_after_s=self.retry_after_s(len(self._waiters) + 1),
            )
        waiter = Waiter(on_grant)
        self._waiters[waiter] = None
        if front:
            self._waiters.move_to_end(waiter, last=False)
        return waiter

    def withdraw(self, waiter: Waiter) -> bool:
        """Remove a waiter that is still queued. False if it was not (already granted)."""
        return self._waiters.pop(waiter, False) is None

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        lease.replica.in_flight -= 1
        now = self._clock()
        completions = self._completions
        completions.append(now)
        # Keep only the window Retry-After looks at: bounded memory however long we run.
        while now - completions[0] > DRAIN_WINDOW_S:
            completions.popleft()
        self._dispatch()

    def set_healthy(self, replica: Replica, healthy: bool) -> None:
        if replica.healthy == healthy:
            return
        replica.healthy = healthy
        if healthy:
            self._dispatch()

    def expired_error(self, waiter_position: int) -> ProxyError:
        """What a waiter whose time ran out is told: the likely cause, and when to retry."""
        retry_after = self.retry_after_s(waiter_position)
        if not self.any_healthy():
            return NoHealthyReplica(
                "no healthy replica became available in time",
                retry_after_s=retry_after, waited=True,
            )
        return QueueTimeout(
            "timed out waiting for a free slot", retry_after_s=retry_after, waited=True
        )

    def retry_after_s(self, position: int) -> int:
        """Seconds until a caller at ``position`` in the queue would likely be served.

        Position over the recent drain rate (completions per second over the last minute),
        clamped to 1..60. With no completion seen yet we cannot estimate, so say the most.
        """
        now = self._clock()
        completions = self._completions
        while completions and now - completions[0] > DRAIN_WINDOW_S:
            completions.popleft()
        if not completions:
            return RETRY_AFTER_MAX_S
        span = max(now - completions[0], 1.0)
        rate = len(completions) / span
        estimate = int(-(-position // rate))  # ceil without floats drifting below 1
        return max(RETRY_AFTER_MIN_S, min(RETRY_AFTER_MAX_S, estimate))

    def _lease(self, replica: Replica) -> Lease:
        replica.in_flight += 1
        return Lease(self, replica)

    def _pick(self) -> Replica | None:
        """The healthy replica with a free slot and the lowest load; ties round-robin."""
        replicas = self.replicas
        count = len(replicas)
        best: Replica | None = None
        for offset in range(count):
            replica = replicas[(self._next + offset) % count]
            if not replica.healthy or replica.in_flight >= replica.max_concurrency:
                continue
            if best is None or replica.less_loaded_than(best):
                best = replica
        if best is not None:
            self._next = (best.index + 1) % count
        return best

    def _dispatch(self) -> None:
        """Give free slots to waiters, head first, until one or the other runs out."""
        waiters = self._waiters
        while waiters:
            replica = self._pick()
            if replica is None:
                return
            waiter, _ = waiters.popitem(last=False)
            lease = self._lease(replica)
            if waiter._on_grant(lease):
                waiter.lease = lease
            else:
                # The caller left between queueing and now: undo without counting a
                # completion, and offer the same slot to the next waiter.
                lease.released = True
                replica.in_flight -= 1

    # -- waiting (async) -----------------------------------------------------------------

    async def acquire(self, deadline: float, *, front: bool = False) -> Lease:
        """Wait for a slot until ``deadline`` (on the running loop's clock).

        Cancel-safe: a caller cancelled while queued leaves the queue; one cancelled just as
        its slot was granted gives that slot to the next waiter before the error propagates.
        """
        if not self._waiters:
            # The common case under capacity: a free slot now, no Future or closure needed.
            replica = self._pick()
            if replica is not None:
                return self._lease(replica)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Lease] = loop.create_future()

        def grant(lease: Lease) -> bool:
            if future.done():
                return False
            future.set_result(lease)
            return True

        got = self.submit(grant, front=front)
        if isinstance(got, Lease):
            return got
        waiter = got

        def expire() -> None:
            position = len(self._waiters)
            if self.withdraw(waiter) and not future.done():
                future.set_exception(self.expired_error(position))

        timer = loop.call_at(deadline, expire)
        try:
            return await future
        except asyncio.CancelledError:
            self.withdraw(waiter)
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().release()
            raise
        finally:
            timer.cancel()
