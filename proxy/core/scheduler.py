"""Admission control: one bounded wait queue in front of per-replica concurrency slots.

This is the heart of batchgate and does no I/O (it must not import aiohttp; a test checks).
Decisions are synchronous and returned to the caller: :meth:`Scheduler.submit` (a lease now, or
a place in the queue), :meth:`Scheduler.release` and :meth:`Scheduler.withdraw` (the grants they
caused), :meth:`Scheduler.expire` (the waiters whose deadline passed), and the replica changes
(:meth:`add_replica`, :meth:`remove_replica`, :meth:`set_limit`, :meth:`set_healthy`,
:meth:`set_ejected`, :meth:`set_models`, :meth:`set_token_limit`). Capacity can only appear at
those moments (or when a waiter a replica was kept for leaves), and waiters are served right
then: there is no polling loop and no gap between one request finishing and the next starting.
:meth:`Scheduler.acquire` is a thin async wrapper that waits for the decision.

Who owns what: :class:`~proxy.core.replicas.ReplicaSet` the replicas, their slots and tokens;
:class:`~proxy.core.queue.WaitQueue` the order of the waiters (:mod:`proxy.core.policy`:
classes, then deficit round-robin among tenants); :mod:`proxy.core.placement` which replica
may take which request (models, token budgets); :mod:`proxy.core.admission` the bounds of the
queue and eviction; this module the deadlines, the estimate behind ``Retry-After``, and the
order of decisions for a request: its model (404 if nobody serves it), its cost (400 if no
replica serving it could ever hold it), a free slot now, the queue's bounds.

Guarantees:

* a replica is never granted a lease while it holds ``max_concurrency`` of them, nor one of
  cost ``c`` while ``tokens_in_flight + c > max_tokens``;
* work conservation: while anyone waits, every usable replica with a free slot is kept for
  the best waiter it serves, which does not fit its free tokens yet (with no token budget:
  every usable replica serving a waiter has all of its slots leased); a waiter for one model
  never holds back a replica of another;
* waiters are served in the policy's order: resends first, then a higher class before any
  lower one the same replica could serve, tenants in deficit round-robin within a class,
  arrival order within a tenant (FIFO, exactly, with one class and one tenant);
* a waiter ends exactly once: granted, expired, evicted by a higher class, refused (its
  model or its size is no longer served), or withdrawn. A waiter that is cancelled leaves the
  queue at once; a slot granted to a waiter that is cancelled in the same instant passes to
  the next waiter, never lost;
* each :class:`Lease` gives its slot and its tokens back exactly once, however often
  ``release`` is called;
* a removed replica gets no new work and leaves once the work it holds is done.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from proxy.core import admission, placement
from proxy.core.deadlines import Deadlines
from proxy.core.errors import (
    DeadlineUnreachable,
    NoHealthyReplica,
    ProxyError,
    QueueFull,
    QueueTimeout,
)
from proxy.core.estimate import ServiceTimes, retry_after_s, start_in_s
from proxy.core.lease import NO_GRANTS, Grant, Lease
from proxy.core.load import LoadBoard, Reading
from proxy.core.policy import NO_TENANTS, PolicyQueue, TenantPolicy
from proxy.core.queue import Competes, Notify, Waiter, WaitQueue
from proxy.core.replicas import Replica, ReplicaSet
from proxy.core.tally import Tally

__all__ = ["Grant", "Lease", "Replica", "Scheduler", "TenantPolicy", "Waiter"]


class Scheduler:
    """The bounded queue and the slots of every replica.

    ``max_queue`` bounds the waiters (0: no waiting, a request that finds no free slot is
    refused at once), ``max_bytes`` the sum of their bodies (a request that gets a slot at
    once is never queued, so never counted). ``clock`` decides deadlines and the service-time
    window behind ``Retry-After``, ``rng`` its randomised rounding (both injectable, so they
    are tested without sleeping or luck); ``queue`` is the waiting policy (FIFO by default).
    ``on_retired`` hears of a removed replica once its last lease has come back. ``load``:
    the replicas' own load readings, which the pick follows when there are any (a gateway in
    front of batchgate sidecars; :mod:`proxy.core.load`). No replica at all is allowed (a
    gateway waiting for its engines to scale up from zero): requests wait until their
    deadline. ``classes``: how many priority classes (0 the highest); ``tenants``: the fair
    share among tenants within a class.
    """

    def __init__(
        self,
        replicas: Iterable[Replica],
        max_queue: int,
        *,
        max_bytes: float = math.inf,
        queue: WaitQueue | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        on_retired: Callable[[Replica], None] | None = None,
        load: LoadBoard | None = None,
        classes: int = 1,
        tenants: TenantPolicy | None = None,
    ) -> None:
        # May start empty: replicas found by discovery (proxy.control.discovery) come later.
        self._set = ReplicaSet(replicas, load=load, rng=rng)
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_queue = max_queue
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        if classes < 1:
            raise ValueError(f"classes must be >= 1, got {classes}")
        self.classes = classes
        self.tenants = tenants if tenants is not None else NO_TENANTS
        self._queue: WaitQueue = (
            queue if queue is not None else PolicyQueue(classes, self.tenants.weights)
        )
        self._clock = clock
        self._rng = rng
        self._on_retired = on_retired
        self._pick = self._set.pick  # bound once: the hot path calls it per request
        self._service = ServiceTimes()
        self._tally = Tally()
        self._deadlines = Deadlines()
        # One loop timer for every queued deadline (armed by acquire(), at the earliest).
        self._alarm: asyncio.TimerHandle | None = None
        # When it fires, on the loop's clock: the scheduler's clock may be another (a test's,
        # which jumps), and a deadline's wake-up is worked out when it is armed.
        self._alarm_due = math.inf
        self._alarm_loop: asyncio.AbstractEventLoop | None = None

    # -- observation ---------------------------------------------------------------------

    @property
    def replicas(self) -> tuple[Replica, ...]:
        return self._set.all

    def replica(self, name: str) -> Replica | None:
        return self._set.get(name)

    @property
    def load(self) -> LoadBoard:
        """The replicas' load readings (fed by the edge; empty unless they are batchgates)."""
        return self._set.load

    def reading(self) -> Reading:
        """This batchgate's own load, as ``server.load_headers`` and ``GET /load`` tell it."""
        return Reading(self._set.in_flight, self._set.usable_slots(), len(self._queue))

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return self._set.in_flight

    def now(self) -> float:
        """The scheduler's clock: deadlines passed to :meth:`acquire` are on it."""
        return self._clock()

    def any_healthy(self) -> bool:
        return self._set.any_healthy()

    def position(self, waiter: Waiter) -> int | None:
        """Its estimated place in line among the waiters that want the same replicas (with
        model routing, a waiter of a model served elsewhere is not ahead of it)."""
        return self._queue.position(waiter, self._rivals(waiter.model)[0])

    @property
    def queued_bytes(self) -> int:
        """The bodies of the waiters, in bytes (bounded by ``max_bytes``)."""
        return self._tally.bytes

    def depths(self) -> Mapping[tuple[int, str | None], int]:
        """Waiters by (class, model), only those with any (the queue-depth gauge)."""
        return dict(self._tally.depths)

    def serves(self, model: str | None) -> bool:
        """Whether :meth:`submit` accepts ``model`` rather than refusing it as not found
        (see :func:`proxy.core.placement.serves`)."""
        return model is None or self._set.plain or placement.serves(self._set, model)

    def models(self) -> list[str]:
        """Every model some active replica names, sorted (model-blind replicas name none)."""
        return placement.models(self._set)

    def idle(self) -> bool:
        """No waiter and no slot held: what every test checks at its end."""
        return not len(self._queue) and self._set.in_flight == 0

    def __repr__(self) -> str:
        size = ""
        if self.max_bytes < math.inf:
            size = f" {self.queued_bytes}/{self.max_bytes} bytes"
        return f"<Scheduler queued={len(self._queue)}/{self.max_queue}{size} {self._set!r}>"

    # -- policy (a reload) ---------------------------------------------------------------

    def set_tenant_policy(self, policy: TenantPolicy) -> None:
        """New weights and bounds; waiters keep their places (a bound lowered below a
        tenant's waiters refuses its next ones, it evicts none)."""
        self.tenants = policy
        self._queue.set_weights(policy.weights)

    def set_classes(self, count: int) -> None:
        """How many priority classes. Raises ValueError while a waiter is of a class that
        would no longer exist."""
        if count < 1:
            raise ValueError(f"classes must be >= 1, got {count}")
        if any(klass >= count for klass, _ in self._tally.depths):
            raise ValueError(f"cannot lower classes to {count}: requests of a higher one wait")
        self._queue.set_classes(count)
        self.classes = count

    # -- decisions (synchronous) ---------------------------------------------------------

    def submit(
        self,
        notify: Notify,
        *,
        deadline: float = math.inf,
        size: int = 0,
        front: bool = False,
        avoid: Replica | None = None,
        model: str | None = None,
        klass: int = 0,
        tenant: str = "",
        cost: int = 0,
    ) -> Lease | Waiter:
        """Take a slot now, or join the queue until ``deadline`` (on :meth:`now`'s clock).

        ``size`` is the request's body, counted against ``max_bytes`` while it waits.
        ``front`` puts a request back at the head: it was admitted once already and lost its
        slot through no fault of its own (the replica refused the connection), so it neither
        goes to the back nor is refused by the queue's bounds (its bytes still count).
        ``avoid``: the replica that just rejected it; a free slot elsewhere is preferred (if
        it has to wait, the first slot to free serves it, whichever replica it is on).
        ``model``, ``klass``, ``tenant``, ``cost``: see :class:`Waiter`.

        The order of decisions: the model (:class:`ModelNotFound` if nobody serves it), the
        cost (:class:`RequestTooLarge` if no replica serving the model could ever hold it),
        a free slot now (taken even with the queue full, unless a waiter that replica could
        serve comes first), then the queue's bounds.

        Raises :class:`QueueFull`, :class:`DeadlineUnreachable` when the ones ahead of it
        would take past ``deadline`` at the measured rate (never with no history, never for
        the head or a ``front`` resend), or :class:`NoHealthyReplica` when waiting is not
        allowed and no replica is healthy.
        """
        if self._set.plain:
            if not self._tally.waiting:
                replica = self._pick(avoid, cost)
                if replica is not None:
                    return Lease(self, replica, self._clock(), cost)
        else:
            lease = self._routed_now(model, cost, klass, front, avoid)
            if lease is not None:
                return lease
        if not 0 <= klass < self.classes:
            raise ValueError(f"class {klass} is not one of the {self.classes} classes")
        waiter = Waiter(notify, deadline, size, model=model, klass=klass, tenant=tenant,
                        cost=cost)
        if front:
            self._enqueue(waiter, front)
            return waiter
        victims = self._admit(waiter)
        for victim in victims:
            self._evict(victim)
        self._enqueue(waiter, front)
        if victims and not self._set.plain:
            self._dispatch()  # a replica kept for a victim (a token budget) serves the next
        return waiter

    def withdraw(self, waiter: Waiter) -> Sequence[Grant]:
        """The waiter gives up. Queued: it leaves. Granted but its caller left before using
        the slot: the slot passes on (not counted as a completion). Returns the grants."""
        if waiter.queued:
            self._unqueue(waiter)
            # A replica may have been kept for it (a token budget): no longer.
            return NO_GRANTS if self._set.plain else self._dispatch()
        lease = waiter.lease
        if lease is None or lease.released:
            return NO_GRANTS
        waiter.lease = None
        lease.released = True
        self._give_back(lease.replica, lease.cost)
        return self._dispatch()

    def release(self, lease: Lease) -> Sequence[Grant]:
        """The work is done: the slot goes to the next waiter, if any (idempotent)."""
        if lease.released:
            return NO_GRANTS
        lease.released = True
        now = self._clock()
        self._service.record(now, now - lease.started)
        replica = lease.replica
        if self._set.give_back(replica, lease.cost) and self._on_retired is not None:
            self._on_retired(replica)  # _give_back, inline: a call fewer per request
        if not self._tally.waiting:  # the queue's len() is a Python call
            return NO_GRANTS
        return self._dispatch()

    def expire(self, now: float | None = None) -> list[Waiter]:
        """Tell every waiter whose deadline has passed (default: :meth:`now`) that it expired,
        earliest deadline first (a waiter with no deadline never expires)."""
        now = self._clock() if now is None else now
        expired: list[Waiter] = []
        # One at a time: if telling one raises, the others are still due and still timed.
        while (waiter := self._deadlines.pop_due(now)) is not None:
            self._expire(waiter)
            expired.append(waiter)
        return expired

    def add_replica(
        self, name: str, url: str, max_concurrency: int, *, healthy: bool = True,
        models: frozenset[str] | None = None, models_pending: bool = False,
        max_tokens: int | None = None,
    ) -> Sequence[Grant]:
        """A new replica: its slots go to waiters at once (``healthy=False``: once its first
        probe passes). ``models``, ``models_pending``, ``max_tokens``: see :class:`Replica`."""
        # Waiters for a model it does not serve keep waiting: they were admitted, and the
        # replica that serves them may be the next one discovery adds.
        self._set.add(name, url, max_concurrency, healthy=healthy, models=models,
                      models_pending=models_pending, max_tokens=max_tokens)
        return self._dispatch()

    def remove_replica(self, replica: Replica) -> bool:
        """No new work for it from now; it leaves once its work is done. True: gone now.

        Its waiters keep waiting, even for a model it alone served (a replacement may be on
        its way, as discovery replaces endpoints); their deadline ends the wait."""
        gone = self._set.remove(replica)
        if gone and self._on_retired is not None:
            self._on_retired(replica)
        return gone

    def set_limit(self, replica: Replica, max_concurrency: int) -> Sequence[Grant]:
        """Change a replica's slots live; work in flight above a lowered limit finishes."""
        if self._set.set_limit(replica, max_concurrency):
            return self._dispatch()
        return NO_GRANTS

    def set_models(self, replica: Replica, models: frozenset[str] | None) -> Sequence[Grant]:
        """The models a replica serves, as read from it (None: model-blind); it is pending no
        more. Waiters whose model nobody serves now are told :class:`ModelNotFound`."""
        self._set.set_models(replica, models)
        self._refuse_unservable()
        return self._dispatch()

    def set_token_limit(self, replica: Replica, max_tokens: int | None) -> Sequence[Grant]:
        """Change a replica's token budget live (None: none); work in flight finishes.
        Waiters no replica could hold any more are told :class:`RequestTooLarge`."""
        self._set.set_token_limit(replica, max_tokens)
        self._refuse_unservable()
        return self._dispatch()

    def set_healthy(self, replica: Replica, healthy: bool) -> Sequence[Grant]:
        if self._set.set_healthy(replica, healthy):
            return self._dispatch()
        return NO_GRANTS

    def set_ejected(self, replica: Replica, until: float | None) -> Sequence[Grant]:
        """Eject a replica until ``until`` (wall clock; no new work), or lift it (None)."""
        if self._set.set_ejected(replica, until):
            return self._dispatch()
        return NO_GRANTS

    def expired_error(self, waiter_position: int, slots: int | None = None) -> ProxyError:
        """What a waiter whose time ran out is told: the likely cause, and when to retry
        (``slots``: those that could serve it, default every usable one)."""
        retry_after = self.retry_after_s(waiter_position, slots)
        if not self.any_healthy():
            return NoHealthyReplica(
                "no healthy replica became available in time",
                retry_after_s=retry_after, waited=True,
            )
        return QueueTimeout(
            "timed out waiting for a free slot", retry_after_s=retry_after, waited=True
        )

    def retry_after_s(self, position: int, slots: int | None = None) -> int:
        """Seconds until a caller at ``position`` in the queue would likely be served.

        The usable slots (or ``slots``: those of the replicas serving its model) over the
        mean service time measured in the last minute give the rate the line moves at (see
        :mod:`proxy.core.estimate`); 1 s with no history. With no replica usable, the slots
        they will have when back.
        """
        if not slots:
            slots = self._set.usable_slots() or sum(r.max_concurrency for r in self._set.all)
        mean = self._service.mean(self._clock())
        return retry_after_s(position, slots, mean, self._rng)

    # -- internals -----------------------------------------------------------------------

    def _refuse_unservable(self) -> None:
        # What a replica serves, or holds, shrank or became known: waiters that can never be
        # served are told now, not at their deadline.
        if self._set.plain or not len(self._queue):
            return
        for waiter in list(self._queue):
            refusal = placement.refusal(self._set, waiter.model, waiter.cost)
            if refusal is not None:
                refusal.waited = True
                self._unqueue(waiter)
                waiter.notify(refusal)

    def _routed_now(
        self, model: str | None, cost: int, klass: int, front: bool, avoid: Replica | None
    ) -> Lease | None:
        """With models or budgets, before any wait: raise if the request can never be served
        (:class:`ModelNotFound`, :class:`RequestTooLarge`), else a lease if one is free now."""
        refusal = placement.refusal(self._set, model, cost)
        if refusal is not None:
            raise refusal
        return self._lease_now(model, cost, klass, front, avoid)

    def _lease_now(
        self, model: str | None, cost: int, klass: int, front: bool, avoid: Replica | None
    ) -> Lease | None:
        """A lease at once, if a replica that serves ``model`` has a free slot and tokens for
        ``cost``, and no waiter it could serve comes before this request."""
        candidates = self._set.candidates(model, cost)
        if not candidates:
            return None
        queue = self._queue
        if len(queue) and not front:
            # Free replicas are kept for waiters that do not fit them yet; one of those of
            # this class or higher comes first, a lower one does not.
            candidates = [r for r in candidates if not placement.claimed(queue, r, klass)]
        replica = self._set.choose(candidates, avoid)
        if replica is None:
            return None
        self._set.take(replica, cost)
        return Lease(self, replica, self._clock(), cost)

    def _admit(self, waiter: Waiter) -> list[Waiter]:
        """The queue's bounds, for a request about to join it (not a resend): raises, or
        returns the waiters of lower classes it evicts to take their place."""
        victims = admission.victims(
            self._queue, waiter, max_queue=self.max_queue, max_bytes=self.max_bytes,
            queued_bytes=self.queued_bytes, tenants=self.tenants, per_tenant=self._tally.per_tenant,
            retry_after=self.retry_after_s, any_healthy=self.any_healthy,
        )
        if waiter.deadline < math.inf:
            self._refuse_if_unreachable(waiter)
        return victims

    def _evict(self, victim: Waiter) -> None:
        """A waiter of a lower class gives its place to a newcomer of a higher one."""
        error = QueueFull(
            "queue is full, and a request of a higher class took this one's place; "
            "retry later",
            retry_after_s=self.retry_after_s(self.position(victim) or len(self._queue),
                                             self._rivals(victim.model)[1]),
            waited=True,
        )
        self._unqueue(victim)
        victim.notify(error)

    def _refuse_if_unreachable(self, waiter: Waiter) -> None:
        # Only on the way into the queue (the fast path never gets here): a caller told now
        # can go elsewhere, one told at its deadline has lost all that time for nothing.
        # "Ahead" and the rate are its model's: the waiters that want the same replicas, and
        # the slots of the replicas that serve it.
        competes, slots = self._rivals(waiter.model)
        position = self._queue.would_be(waiter, competes=competes)
        deadline = waiter.deadline
        now = self._clock()
        start = start_in_s(position, slots, self._service.mean(now))
        if start is not None and now + start > deadline:
            raise DeadlineUnreachable(
                f"cannot start before its deadline: {position - 1} requests ahead, about "
                f"{start:.1f} s at the measured rate, deadline in {deadline - now:.1f} s",
                retry_after_s=self.retry_after_s(position, slots),
            )

    def _rivals(self, model: str | None) -> tuple[Competes | None, int]:
        """Who stands in line with a request for ``model``, and the usable slots that serve
        it. Model-blind (no replica names its models), or no model named: every waiter and
        every slot. Routed: the waiters of models that some replica serving ``model`` also
        serves (a waiter of a model served elsewhere is dispatched beside it, not before
        it), and the slots of the replicas serving ``model``."""
        replicas = self._set.all
        if model is None or all(r.models is None for r in replicas):
            return None, self._set.usable_slots()
        route = self._set.route
        mine = set(route(model).replicas)
        seen: dict[str | None, bool] = {model: True}

        def competes(other: str | None) -> bool:
            known = seen.get(other)
            if known is None:
                known = seen[other] = not mine.isdisjoint(route(other).replicas)
            return known

        return competes, sum(r.max_concurrency for r in mine if r.takes_work)

    def _enqueue(self, waiter: Waiter, front: bool) -> None:
        self._tally.joined(waiter, front)
        self._queue.push(waiter, front=front)
        waiter.queued = True
        if waiter.deadline < math.inf:
            self._deadlines.add(waiter, self._tally.waiting)

    def _unqueue(self, waiter: Waiter) -> None:
        self._queue.remove(waiter)
        self._left(waiter)

    def _left(self, waiter: Waiter) -> None:
        """A waiter is out of the queue (removed, or popped to be served)."""
        waiter.queued = False
        self._tally.left(waiter)
        if self._deadlines.prune() and self._alarm is not None:
            self._silence()  # nothing timed waits: no wake-up left pending on the loop

    def _expire(self, waiter: Waiter) -> None:
        # Its own place in line (ask the policy), not the queue's length: the head of a long
        # queue is told one service time, not the whole queue's.
        error = self.expired_error(self.position(waiter) or 1, self._rivals(waiter.model)[1])
        self._unqueue(waiter)
        waiter.notify(error)
        if not self._set.plain:
            self._dispatch()  # a replica kept for it (a token budget) serves the next

    def _give_back(self, replica: Replica, cost: int) -> None:
        if self._set.give_back(replica, cost) and self._on_retired is not None:
            self._on_retired(replica)

    def _dispatch(self) -> Sequence[Grant]:
        """Give free slots to waiters in the policy's order, until one or the other runs out."""
        if not self._set.plain:
            return self._dispatch_placed()
        queue = self._queue
        grants: list[Grant] = []
        now = self._clock()
        while len(queue):
            replica = self._pick()
            if replica is None:
                break
            waiter = queue.pop()
            assert waiter is not None
            self._left(waiter)
            replica.tokens_in_flight += waiter.cost
            self._grant(waiter, replica, now, grants)
        return grants if grants else NO_GRANTS

    def _dispatch_placed(self) -> Sequence[Grant]:
        """:meth:`_dispatch` when replicas differ in what they serve or hold.

        Each free replica takes the best waiter (the policy's order) it serves, if that one
        fits its free tokens; if it does not, the replica is kept for it (takes nobody else)
        until it does, so a large request is not starved by a stream of small ones. A waiter
        too large for a replica even when empty does not count as one it serves.
        """
        queue = self._queue
        grants: list[Grant] = []
        if not len(queue):
            return NO_GRANTS
        now = self._clock()
        placer = placement.Placer(self._set)
        while len(queue):
            if not placer.reset():
                break
            waiter = queue.pop_first(placer.accept, placer.model_ok)
            if waiter is None:
                break
            replica = placer.chosen
            assert replica is not None
            self._left(waiter)
            self._set.take(replica, waiter.cost)
            self._grant(waiter, replica, now, grants)
        return grants if grants else NO_GRANTS

    def _grant(self, waiter: Waiter, replica: Replica, now: float, grants: list[Grant]) -> None:
        lease = Lease(self, replica, now, waiter.cost)
        if waiter.notify(lease):
            waiter.lease = lease
            grants.append(Grant(waiter, lease))
        else:
            # The caller left between queueing and now: undo without counting a
            # completion, and offer the same slot to the next waiter.
            lease.released = True
            self._give_back(replica, waiter.cost)

    # -- waiting (async) -----------------------------------------------------------------

    async def acquire(
        self, deadline: float, *, size: int = 0, front: bool = False,
        avoid: Replica | None = None, model: str | None = None, klass: int = 0,
        tenant: str = "", cost: int = 0, on_queued: Callable[[Waiter], None] | None = None,
    ) -> Lease:
        """Wait for a slot until ``deadline`` (on :meth:`now`'s clock); the other arguments
        as in :meth:`submit`. ``on_queued`` is called once, synchronously, when the request
        joins the queue (never when it gets a slot at once).

        Cancel-safe: a caller cancelled while queued leaves the queue; one cancelled just as
        its slot was granted gives that slot to the next waiter before the error propagates.
        """
        if self._set.plain:
            if not self._tally.waiting:  # the queue's len() is a Python call
                # The common case under capacity: a free slot now, no Future or closure.
                replica = self._pick(avoid, cost)
                if replica is not None:
                    return Lease(self, replica, self._clock(), cost)
        else:
            # The same with models or budgets: refused, or a slot now, without a Future.
            lease = self._routed_now(model, cost, klass, front, avoid)
            if lease is not None:
                return lease
        return await self._wait(deadline, size, front, avoid, model, klass, tenant, cost,
                                on_queued)

    async def _wait(
        self, deadline: float, size: int, front: bool, avoid: Replica | None,
        model: str | None, klass: int, tenant: str, cost: int,
        on_queued: Callable[[Waiter], None] | None,
    ) -> Lease:
        # Apart from acquire(), so that its fast path creates no cell for the closure.
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Lease] = loop.create_future()

        def notify(result: Lease | ProxyError) -> bool:
            if future.done():
                return False
            if isinstance(result, Lease):
                future.set_result(result)
            else:
                future.set_exception(result)
            return True

        got = self.submit(notify, deadline=deadline, size=size, front=front, avoid=avoid,
                          model=model, klass=klass, tenant=tenant, cost=cost)
        if isinstance(got, Lease):
            return got
        waiter = got
        if deadline < math.inf:
            due = loop.time() + max(0.0, deadline - self._clock())
            if due < self._alarm_due or self._alarm_loop is not loop:
                self._arm(loop, due)
        try:
            if on_queued is not None:
                on_queued(waiter)
            return await future
        except BaseException:
            # Cancelled (queued: it leaves; granted this instant: the slot passes on), or
            # on_queued failed; told an error, it is out already and this does nothing.
            self.withdraw(waiter)
            raise

    def _arm(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        """The wake-up at ``due`` on the loop's clock."""
        if self._alarm is not None:
            self._alarm.cancel()
        self._alarm_due = due
        self._alarm_loop = loop
        self._alarm = loop.call_at(due, self._ring)

    def _silence(self) -> None:
        if self._alarm is not None:
            self._alarm.cancel()
        self._alarm = None
        self._alarm_due = math.inf

    def _ring(self) -> None:
        # The loop's timer is only a wake-up; the scheduler's clock decides who is due.
        self._alarm = None
        self._alarm_due = math.inf
        loop = self._alarm_loop
        try:
            self.expire()
        finally:  # whatever telling a waiter raised, the others stay timed
            when = self._deadlines.earliest()
            if when is not None and loop is not None and not loop.is_closed():
                self._arm(loop, loop.time() + max(0.0, when - self._clock()))
