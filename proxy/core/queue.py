"""Who waits, and in which order: the waiting policy behind one interface.

The scheduler decides *when* a slot is free; a :class:`WaitQueue` decides *who* gets it.
:class:`FifoQueue` is first come, first served; :class:`~proxy.core.policy.PolicyQueue` (the
default) adds priority classes and deficit round-robin among tenants, and is FIFO with one
class and one tenant. The scheduler, its bounds and its guarantees do not change with them.

A policy must:

* give every queued waiter a position (1: served next), which ``Retry-After`` uses;
* remove any waiter in O(1) or close (a cancelled caller leaves at once, from anywhere);
* honour ``front`` (a request that lost its slot through no fault of its own, e.g. a refused
  connection, goes back ahead of everyone who arrived after it);
* find the first waiter, in its order, that the free replicas can serve
  (:meth:`WaitQueue.pop_first`): the scheduler asks it when replicas differ in the models they
  serve or the tokens they hold, and a waiter none can place must not hold back the others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.core.errors import ProxyError
    from proxy.core.scheduler import Lease

#: How a waiter is told its fate: a :class:`Lease` (granted) or a ``ProxyError`` (expired).
#: Returns False when the waiter can no longer take a lease (its caller has just gone), so the
#: slot goes to the next in line within the same decision, never held by nobody.
Notify = Callable[["Lease | ProxyError"], bool]


#: Whether waiters of a model compete with a given request for the same replicas (some
#: replica serves both): only those stand ahead of it in line. None: all do (model-blind).
Competes = Callable[[str | None], bool]


class Waiter:
    """A queued request: its deadline (on the scheduler's clock), its body size, how to wake it.

    ``model``: the model it names (None: none, any replica may serve it); ``klass``: its
    priority class (0 the highest); ``tenant``: whose it is (fair share within a class);
    ``cost``: the tokens its lease will hold on a replica with a token budget. ``seq`` orders
    waiters by arrival, ``front`` marks a resend (served ahead of every class).

    ``lease`` is set when the waiter is granted a slot; ``queued`` is True while it waits.
    """

    __slots__ = ("cost", "deadline", "front", "klass", "lease", "model", "notify", "queued",
                 "seq", "size", "tenant")

    def __init__(
        self, notify: Notify, deadline: float, size: int = 0, *, model: str | None = None,
        klass: int = 0, tenant: str = "", cost: int = 0,
    ) -> None:
        self.notify = notify
        self.deadline = deadline
        self.size = size
        self.model = model
        self.klass = klass
        self.tenant = tenant
        self.cost = cost
        self.seq = 0
        self.front = False
        self.lease: Lease | None = None
        self.queued = False

    def __repr__(self) -> str:
        state = "queued" if self.queued else ("granted" if self.lease is not None else "out")
        return f"<Waiter {state} deadline={self.deadline:g} size={self.size}>"


class WaitQueue(ABC):
    """The order in which waiters are served. Mutated only by the scheduler."""

    @abstractmethod
    def push(self, waiter: Waiter, *, front: bool = False) -> None:
        """Add a waiter: at its place by policy, or ahead of the others with ``front``."""

    @abstractmethod
    def pop(self) -> Waiter | None:
        """Remove and return the waiter to serve next (None: nobody waits)."""

    def pop_first(
        self, accept: Callable[[Waiter], bool],
        model_ok: Callable[[str | None], bool] | None = None,
    ) -> Waiter | None:
        """Remove and return the first waiter in serving order that ``accept`` takes (None:
        it takes none). ``accept`` may change its mind about later waiters as it goes (the
        scheduler reserves a replica for a waiter that does not fit it yet); ``model_ok``,
        if given, is a cheaper test a waiter's model must pass before ``accept`` is asked.
        """
        for waiter in self:
            if (model_ok is None or model_ok(waiter.model)) and accept(waiter):
                self.remove(waiter)
                return waiter
        return None

    def evictable(self, klass: int) -> Waiter | None:
        """The waiter to evict for a newcomer of class ``klass`` when the queue is full: the
        newest waiter of the lowest class below ``klass`` (None: nobody, or no classes)."""
        return None

    def claims(
        self, klass: int, model_ok: Callable[[str | None], bool],
        accept: Callable[[Waiter], bool],
    ) -> bool:
        """Whether a resend, or a waiter of class ``klass`` or higher, waits that passes
        ``model_ok`` and ``accept``: it comes before a newcomer of class ``klass``."""
        return any((w.front or w.klass <= klass) and model_ok(w.model) and accept(w)
                   for w in self)

    def would_be(self, waiter: Waiter, *, front: bool = False,
                 competes: Competes | None = None) -> int:
        """The position ``waiter`` would have if pushed now (for early refusal). With
        ``competes``, only the waiters whose model it accepts count (see :data:`Competes`)."""
        if front:
            return 1
        if competes is None:
            return len(self) + 1
        return sum(1 for w in self if competes(w.model)) + 1

    def set_classes(self, count: int) -> None:
        """How many priority classes (a reload); a policy blind to classes ignores it."""
        return None

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Tenant weights (a reload); a policy blind to tenants ignores them."""
        return None

    @abstractmethod
    def remove(self, waiter: Waiter) -> bool:
        """Take a waiter out from wherever it is. False if it was not queued."""

    @abstractmethod
    def position(self, waiter: Waiter, competes: Competes | None = None) -> int | None:
        """1-based place in line (1: served next); None if not queued. With ``competes``,
        only the waiters ahead whose model it accepts count."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Waiter]:
        """Waiters in serving order."""


class FifoQueue(WaitQueue):
    """First come, first served, blind to classes and tenants; ``front`` re-enters at the
    head.

    An ``OrderedDict`` rather than a deque: a cancelled waiter leaves in O(1) from anywhere,
    and the head is as cheap to reach as the tail.
    """

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: OrderedDict[Waiter, None] = OrderedDict()

    def push(self, waiter: Waiter, *, front: bool = False) -> None:
        self._waiters[waiter] = None
        if front:
            self._waiters.move_to_end(waiter, last=False)

    def pop(self) -> Waiter | None:
        if not self._waiters:
            return None
        return self._waiters.popitem(last=False)[0]

    def remove(self, waiter: Waiter) -> bool:
        return self._waiters.pop(waiter, False) is None

    def position(self, waiter: Waiter, competes: Competes | None = None) -> int | None:
        # O(n), asked only when a caller is told to come back (bounded by queue.max_size).
        place = 0
        for queued in self._waiters:
            if queued is waiter:
                return place + 1
            if competes is None or competes(queued.model):
                place += 1
        return None

    def __len__(self) -> int:
        return len(self._waiters)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(self._waiters)

    def __repr__(self) -> str:
        return f"<FifoQueue {len(self._waiters)} waiting>"
