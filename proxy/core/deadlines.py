"""The queued waiters' deadlines, earliest first: what lets one loop timer serve the queue.

A loop timer per waiter cost a handle, a closure and their cells: 1.3 KiB of every queued
request (tracemalloc, P5's 10,000 queued callers), for alarms that almost never ring. The
scheduler instead keeps the deadlines in a heap and one wake-up at the earliest of them.

Waiters leave the queue in the middle (granted, withdrawn, evicted) and a heap cannot drop an
entry cheaply, so entries of waiters that left are skipped lazily: popped as soon as they reach
the top (with one class and one timeout, the waiter served next is the one with the earliest
deadline, so the heap stays exact), and the heap is rebuilt from the queued ones when the
stale entries outnumber them (amortised O(1) a waiter; a hang-up storm cannot grow it without
bound).
"""

from __future__ import annotations

import heapq

from proxy.core.queue import Waiter

#: Stale entries tolerated beyond the live ones before a rebuild (so a short queue is not
#: rebuilt at every turn).
_SLACK = 64


class Deadlines:
    """The finite deadlines of queued waiters. Mutated only by the scheduler."""

    __slots__ = ("_heap",)

    def __init__(self) -> None:
        # (deadline, seq, waiter): seq is unique per scheduler, so waiters are never compared.
        self._heap: list[tuple[float, int, Waiter]] = []

    def __len__(self) -> int:
        """Entries held, the stale ones included (what bounds this structure's memory)."""
        return len(self._heap)

    def add(self, waiter: Waiter, queued: int) -> None:
        """A waiter with a finite deadline joined; ``queued``: how many wait now."""
        heap = self._heap
        if len(heap) > 2 * queued + _SLACK:
            heap[:] = [entry for entry in heap if entry[2].queued]
            heapq.heapify(heap)
        heapq.heappush(heap, (waiter.deadline, waiter.seq, waiter))

    def prune(self) -> bool:
        """Drop the waiters that left from the top; True when no deadline is left at all."""
        heap = self._heap
        while heap and not heap[0][2].queued:
            heapq.heappop(heap)
        return not heap

    def earliest(self) -> float | None:
        """The earliest deadline of a queued waiter (None: none is timed)."""
        return None if self.prune() else self._heap[0][0]

    def pop_due(self, now: float) -> Waiter | None:
        """Remove and return the queued waiter with the earliest deadline if that is ``now``
        or earlier (None: none is due)."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            waiter = heapq.heappop(heap)[2]
            if waiter.queued:
                return waiter
        return None
