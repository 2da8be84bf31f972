"""A slot held on a replica (:class:`Lease`), and a decision that gave one (:class:`Grant`).

A lease holds one of its replica's ``max_concurrency`` slots and ``cost`` of its
``tokens_in_flight``, both given back exactly once by :meth:`Lease.release` (idempotent, safe
in any ``finally``). The scheduler creates them; nothing else changes a replica's counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from proxy.core.queue import Waiter
from proxy.core.replicas import Replica

if TYPE_CHECKING:
    from proxy.core.scheduler import Scheduler


class Lease:
    """One slot on one replica, held for exactly as long as the request uses it."""

    __slots__ = ("_scheduler", "cost", "released", "replica", "started")

    def __init__(
        self, scheduler: Scheduler, replica: Replica, started: float, cost: int = 0
    ) -> None:
        self._scheduler = scheduler
        self.replica = replica
        self.released = False
        self.started = started  # on the scheduler's clock: service time for Retry-After
        self.cost = cost  # tokens held on replica.tokens_in_flight, given back with the slot

    def release(self) -> Sequence[Grant]:
        """Give the slot back (idempotent). Safe to call from ``finally`` on any path."""
        return self._scheduler.release(self)

    def __repr__(self) -> str:
        return f"<Lease {self.replica.name}{' released' if self.released else ''}>"


class Grant(NamedTuple):
    """A decision: this waiter got this slot (it has been told)."""

    waiter: Waiter
    lease: Lease


NO_GRANTS: tuple[Grant, ...] = ()
