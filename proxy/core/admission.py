"""The queue's bounds for a request about to join it, and whom it evicts to get in.

Checked in this order: the count (``queue.max_size``), the bytes of the bodies
(``queue.max_bytes``), the request's tenant (``max_queued``). A full queue makes room for a
request of a higher class than the lowest class that has waiters: the newest waiter of that
lowest class is evicted (it is told ``queue_full``, as one refused at the door but after
waiting). For the bytes, the newest of the lowest classes go first, and only if evicting every
waiter of a lower class would make room (else nobody is evicted and the request is refused).
Resends are never evicted. Early refusal (the deadline) is the scheduler's, after these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from proxy.core.errors import NoHealthyReplica, QueueFull
from proxy.core.estimate import RETRY_AFTER_MIN_S
from proxy.core.policy import TenantPolicy
from proxy.core.queue import Waiter, WaitQueue


def victims(
    queue: WaitQueue, waiter: Waiter, *, max_queue: int, max_bytes: float,
    queued_bytes: int, tenants: TenantPolicy, per_tenant: Mapping[str, int],
    retry_after: Callable[[int], int], any_healthy: Callable[[], bool],
) -> list[Waiter]:
    """The waiters ``waiter`` evicts to join the queue (usually none), or raises
    :class:`QueueFull` (:class:`NoHealthyReplica` when no waiting is allowed and no replica
    is healthy)."""
    found: list[Waiter] = []
    if len(queue) >= max_queue:
        victim = queue.evictable(waiter.klass) if max_queue else None
        if victim is None:
            if max_queue == 0 and not any_healthy():
                raise NoHealthyReplica("no healthy replica", retry_after_s=RETRY_AFTER_MIN_S)
            raise QueueFull(
                f"queue is full ({max_queue} waiting); retry later",
                retry_after_s=retry_after(len(queue) + 1),
            )
        found.append(victim)
    excess = queued_bytes + waiter.size - max_bytes
    if excess > 0:
        excess -= sum(v.size for v in found)
        if excess > 0 and queue.evictable(waiter.klass) is not None:
            # The newest of the lowest classes first, only if that makes room.
            lower = sorted(
                (w for w in queue if not w.front and w.klass > waiter.klass and w not in found),
                key=lambda w: (-w.klass, -w.seq),
            )
            for w in lower:
                if excess <= 0:
                    break
                found.append(w)
                excess -= w.size
        if excess > 0:
            raise QueueFull(
                f"queue is full: this request's {waiter.size} bytes would take the queued "
                f"request bodies past queue.max_bytes ({max_bytes} bytes); retry later",
                retry_after_s=retry_after(len(queue) + 1),
            )
    bound = tenants.bound(waiter.tenant)
    if bound and per_tenant.get(waiter.tenant, 0) >= bound:
        raise QueueFull(
            f"queue is full for tenant {waiter.tenant!r}: {bound} of its requests wait "
            "already (its max_queued); retry later",
            retry_after_s=retry_after(queue.would_be(waiter)),
        )
    return found
