"""What the queue's bounds and gauges count of the waiters, beside their order.

The :class:`~proxy.core.queue.WaitQueue` keeps the order; :class:`Tally` the sums the
scheduler checks at every admission without walking the queue: the bytes of the bodies
(``queue.max_bytes``), the waiters of each tenant (``max_queued``) and of each (class, model)
(``batchgate_queue_depth``, adaptive caps), and the arrival number each waiter gets.
"""

from __future__ import annotations

from proxy.core.queue import Waiter


class Tally:
    """Counts of the queued waiters, kept by the scheduler as they join and leave."""

    __slots__ = ("bytes", "depths", "per_tenant", "seq", "waiting")

    def __init__(self) -> None:
        #: Waiters in the queue: what the scheduler's fast paths test (the queue's own
        #: ``len()`` is a Python ``__len__`` call).
        self.waiting = 0
        self.bytes = 0
        #: (class, model) -> waiters; only keys with waiters.
        self.depths: dict[tuple[int, str | None], int] = {}
        #: tenant -> waiters (resends included); only tenants with waiters.
        self.per_tenant: dict[str, int] = {}
        self.seq = 0  # arrivals so far: the next waiter's order

    def joined(self, waiter: Waiter, front: bool) -> None:
        self.waiting += 1
        self.seq += 1
        waiter.seq = self.seq
        waiter.front = front
        self.bytes += waiter.size
        key = (waiter.klass, waiter.model)
        self.depths[key] = self.depths.get(key, 0) + 1
        self.per_tenant[waiter.tenant] = self.per_tenant.get(waiter.tenant, 0) + 1

    def left(self, waiter: Waiter) -> None:
        self.waiting -= 1
        self.bytes -= waiter.size
        key = (waiter.klass, waiter.model)
        left = self.depths[key] - 1
        if left:
            self.depths[key] = left
        else:
            del self.depths[key]
        left = self.per_tenant[waiter.tenant] - 1
        if left:
            self.per_tenant[waiter.tenant] = left
        else:
            del self.per_tenant[waiter.tenant]

    def __repr__(self) -> str:
        return f"<Tally {self.waiting} waiting, {self.bytes} bytes>"
