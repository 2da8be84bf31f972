"""The state of one replica as the scheduler sees it: how many slots, how many in use, healthy.

Mutated only by :class:`proxy.core.scheduler.Scheduler`, so that every change of capacity (a slot
freed, a replica back to health) is also the moment waiters are served.
"""

from __future__ import annotations


class Replica:
    """One upstream engine and its slots.

    Invariant (kept by the scheduler): ``0 <= in_flight <= max_concurrency``.
    """

    __slots__ = ("healthy", "in_flight", "index", "max_concurrency", "name", "url")

    def __init__(self, name: str, url: str, max_concurrency: int, index: int = 0) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.name = name
        self.url = url
        self.max_concurrency = max_concurrency
        self.index = index
        self.in_flight = 0
        # Healthy from startup until a probe says otherwise: a proxy that starts before its
        # engine answers should queue, not reject, and the first probe follows at once.
        self.healthy = True

    @property
    def free(self) -> int:
        return self.max_concurrency - self.in_flight

    def less_loaded_than(self, other: Replica) -> bool:
        """``in_flight / max_concurrency`` compared exactly, without floats."""
        return self.in_flight * other.max_concurrency < other.in_flight * self.max_concurrency

    def __repr__(self) -> str:
        state = "up" if self.healthy else "down"
        return f"<Replica {self.name} {self.in_flight}/{self.max_concurrency} {state}>"
