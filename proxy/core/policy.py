"""Priority classes, and fair shares among tenants within a class: the scheduler's default
:class:`~proxy.core.queue.WaitQueue`.

The order of service:

1. resends (``front``): ahead of everyone, the latest first, as :class:`FifoQueue` has them;
2. then class 0 before class 1 before ...: a waiter of a higher class is always served
   before any waiter of a lower one that the same replica could serve;
3. within a class, deficit round-robin among its tenants. The tenants with waiters form a
   ring; at the start of its turn a tenant's deficit grows by its quantum (its weight over the
   smallest weight, so at least 1), each dispatch costs 1, and its turn ends when less than 1
   is left (the rest carries over to its next turn). A tenant whose queue empties leaves the
   ring and its deficit is forgotten; one that has waiters again joins at the end. So two
   backlogged tenants share dispatches in the ratio of their weights whatever their arrival
   rates, and one tenant's burst of 1,000 delays another's single request by at most about
   one quantum of dispatches;
4. within a tenant, arrival order.

The scheduler may ask for the first waiter a set of replicas can serve
(:meth:`PolicyQueue.pop_first`): a tenant none of whose waiters can be placed (its models'
replicas are busy) is skipped without being charged and keeps its place in the ring. Each
tenant keeps one FIFO per model, so finding its first placeable waiter looks at one head per
model (few), not at every waiter of a busy model.

With one class and one tenant (the default), this is first come, first served, exactly.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from proxy.core.queue import Competes, Waiter, WaitQueue

_MISSING: object = object()


@dataclass(frozen=True)
class TenantPolicy:
    """Fair share among the tenants of a class: ``weights`` (tenant -> deficit round-robin
    weight, > 0; 1 for a tenant not named) and bounds on each tenant's waiters
    (``max_queued``, else ``default_max_queued``; 0: no bound but the queue's)."""

    weights: Mapping[str, float] = field(default_factory=dict)
    max_queued: Mapping[str, int] = field(default_factory=dict)
    default_max_queued: int = 0

    def __post_init__(self) -> None:
        for tenant, weight in self.weights.items():
            if not weight > 0:
                raise ValueError(f"weight of tenant {tenant!r} must be > 0, got {weight}")
        for tenant, bound in self.max_queued.items():
            if bound < 0:
                raise ValueError(f"max_queued of tenant {tenant!r} must be >= 0, got {bound}")
        if self.default_max_queued < 0:
            raise ValueError(f"default_max_queued must be >= 0, got {self.default_max_queued}")

    def bound(self, tenant: str) -> int:
        return self.max_queued.get(tenant, self.default_max_queued)


NO_TENANTS = TenantPolicy()


class _Tenant:
    """A tenant's waiters in one class, one FIFO per model, and its round-robin credit."""

    __slots__ = ("count", "deficit", "fifos", "fresh", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.fifos: dict[str | None, OrderedDict[Waiter, None]] = {}
        self.count = 0
        self.deficit = 0.0
        self.fresh = False  # its deficit got this turn's quantum already

    def first(self) -> Waiter:
        """Its earliest waiter, whatever the model."""
        best: Waiter | None = None
        for fifo in self.fifos.values():
            head = next(iter(fifo))
            if best is None or head.seq < best.seq:
                best = head
        assert best is not None
        return best

    def first_placeable(
        self, accept: Callable[[Waiter], bool], model_ok: Callable[[str | None], bool]
    ) -> Waiter | None:
        """Its earliest waiter that ``accept`` takes, asked in arrival order (``accept`` may
        reserve replicas as it goes, so the order matters), models ``model_ok`` refuses
        skipped whole."""
        if len(self.fifos) == 1:
            ((model, fifo),) = self.fifos.items()
            for waiter in fifo:
                if not model_ok(model):
                    return None
                if accept(waiter):
                    return waiter
            return None
        # A merge by arrival of one iterator per model, dropping a model once model_ok
        # refuses it (its replicas were all kept for an earlier waiter).
        heads: list[tuple[Waiter, Iterator[Waiter], str | None]] = []
        for model, fifo in self.fifos.items():
            if model_ok(model):
                it = iter(fifo)
                heads.append((next(it), it, model))
        while heads:
            i = min(range(len(heads)), key=lambda k: heads[k][0].seq)
            waiter, it, model = heads[i]
            if not model_ok(model):
                del heads[i]
                continue
            if accept(waiter):
                return waiter
            following = next(it, None)
            if following is None:
                del heads[i]
            else:
                heads[i] = (following, it, model)
        return None

    def ahead_of(self, waiter: Waiter, competes: Competes | None = None) -> int:
        """How many of its waiters arrived before ``waiter`` (of the models ``competes``
        accepts)."""
        ahead = 0
        for model, fifo in self.fifos.items():
            if competes is not None and not competes(model):
                continue
            for queued in fifo:
                if queued.seq >= waiter.seq:
                    break
                ahead += 1
        return ahead

    def counted(self, competes: Competes | None) -> int:
        """Its waiters of the models ``competes`` accepts (None: all of them)."""
        if competes is None:
            return self.count
        return sum(len(fifo) for model, fifo in self.fifos.items() if competes(model))


class _Class:
    """One priority class: its waiters by arrival (the newest is evicted first) and the
    ring of its tenants that have waiters (the head's turn first)."""

    __slots__ = ("arrivals", "ring", "tenants")

    def __init__(self) -> None:
        self.arrivals: OrderedDict[Waiter, None] = OrderedDict()
        self.ring: deque[_Tenant] = deque()
        self.tenants: dict[str, _Tenant] = {}


class PolicyQueue(WaitQueue):
    """Resends first, then priority classes, deficit round-robin among tenants within each.

    ``classes``: how many (a waiter's ``klass`` indexes them, 0 the highest). ``weights``:
    tenant -> weight (> 0; 1 for a tenant not named).
    """

    __slots__ = ("_classes", "_front", "_len", "_unit", "_weights")

    def __init__(self, classes: int = 1, weights: Mapping[str, float] | None = None) -> None:
        self._front: OrderedDict[Waiter, None] = OrderedDict()
        self._classes = [_Class() for _ in range(max(1, classes))]
        self._len = 0
        self._weights: Mapping[str, float] = {}
        self._unit = 1.0
        self.set_weights(weights or {})

    # -- configuration -------------------------------------------------------------------

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """New weights (a reload): credit already given stays, the next turns use them."""
        self._weights = dict(weights)
        # The smallest weight is one dispatch a turn: every turn dispatches at least one.
        self._unit = min([1.0, *self._weights.values()])

    def set_classes(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"classes must be >= 1, got {count}")
        if any(c.arrivals for c in self._classes[count:]):
            raise ValueError(f"cannot lower classes to {count}: requests of a higher one wait")
        del self._classes[count:]
        while len(self._classes) < count:
            self._classes.append(_Class())

    def quantum(self, tenant: str) -> float:
        return self._weights.get(tenant, 1.0) / self._unit

    # -- the queue -----------------------------------------------------------------------

    def push(self, waiter: Waiter, *, front: bool = False) -> None:
        self._len += 1
        if front:
            self._front[waiter] = None
            self._front.move_to_end(waiter, last=False)
            return
        c = self._classes[waiter.klass]
        c.arrivals[waiter] = None
        tenant = c.tenants.get(waiter.tenant)
        if tenant is None:
            tenant = c.tenants[waiter.tenant] = _Tenant(waiter.tenant)
            c.ring.append(tenant)  # newly backlogged: its turn comes after the others'
        fifo = tenant.fifos.get(waiter.model)
        if fifo is None:
            fifo = tenant.fifos[waiter.model] = OrderedDict()
        fifo[waiter] = None
        tenant.count += 1

    def pop(self) -> Waiter | None:
        if self._front:
            self._len -= 1
            return self._front.popitem(last=False)[0]
        for c in self._classes:
            if c.ring:
                tenant = c.ring[0]
                waiter = tenant.first()
                self._dispatched(c, tenant, waiter)
                return waiter
        return None

    def pop_first(
        self, accept: Callable[[Waiter], bool],
        model_ok: Callable[[str | None], bool] | None = None,
    ) -> Waiter | None:
        ok = model_ok if model_ok is not None else _any_model
        for waiter in self._front:
            if ok(waiter.model) and accept(waiter):
                del self._front[waiter]
                self._len -= 1
                return waiter
        for c in self._classes:
            # A tenant none of whose waiters can be placed is skipped, not charged: it keeps
            # its place and its credit for when its replicas have room.
            for tenant in c.ring:
                placed = tenant.first_placeable(accept, ok)
                if placed is not None:
                    self._dispatched(c, tenant, placed)
                    return placed
        return None

    def remove(self, waiter: Waiter) -> bool:
        if self._front.pop(waiter, _MISSING) is not _MISSING:
            self._len -= 1
            return True
        if waiter.klass >= len(self._classes):
            return False
        c = self._classes[waiter.klass]
        if c.arrivals.pop(waiter, _MISSING) is _MISSING:
            return False
        tenant = c.tenants[waiter.tenant]
        self._take(c, tenant, waiter)
        return True

    def evictable(self, klass: int) -> Waiter | None:
        for c in reversed(self._classes[klass + 1:]):
            if c.arrivals:
                return next(reversed(c.arrivals))
        return None

    def claims(
        self, klass: int, model_ok: Callable[[str | None], bool],
        accept: Callable[[Waiter], bool],
    ) -> bool:
        for waiter in self._front:
            if model_ok(waiter.model) and accept(waiter):
                return True
        for c in self._classes[:klass + 1]:
            for tenant in c.ring:
                for model, fifo in tenant.fifos.items():
                    if model_ok(model) and any(accept(w) for w in fifo):
                        return True
        return False

    # -- where a waiter stands -----------------------------------------------------------

    def position(self, waiter: Waiter, competes: Competes | None = None) -> int | None:
        """An estimate of its place in line: the resends, the waiters of higher classes,
        and in its own class the dispatches the round-robin would make before its own
        (its tenant's earlier waiters, and what the other tenants get meanwhile at their
        weights). Exact with one tenant. With ``competes``, only waiters of the models it
        accepts count (those that want the same replicas; a waiter of a model served
        elsewhere is no one's predecessor)."""
        if waiter in self._front:
            place = 0
            for queued in self._front:
                if queued is waiter:
                    return place + 1
                if competes is None or competes(queued.model):
                    place += 1
        if waiter.klass >= len(self._classes):
            return None
        c = self._classes[waiter.klass]
        if waiter not in c.arrivals:
            return None
        tenant = c.tenants[waiter.tenant]
        return self._place(waiter.klass, tenant, tenant.ahead_of(waiter, competes) + 1,
                           competes)

    def would_be(self, waiter: Waiter, *, front: bool = False,
                 competes: Competes | None = None) -> int:
        if front:
            return 1
        c = self._classes[waiter.klass]
        tenant = c.tenants.get(waiter.tenant)
        mine = tenant.counted(competes) if tenant is not None else 0
        return self._place(waiter.klass, tenant, mine + 1, competes)

    def _place(self, klass: int, tenant: _Tenant | None, nth: int,
               competes: Competes | None = None) -> int:
        """The place of ``tenant``'s ``nth`` waiter in class ``klass`` (None: a tenant not
        in the ring yet, which would join at its end), counting only the waiters of the
        models ``competes`` accepts (None: all)."""
        if competes is None:
            ahead = len(self._front) + sum(len(c.arrivals) for c in self._classes[:klass])
        else:
            ahead = sum(1 for w in self._front if competes(w.model)) + sum(
                t.counted(competes) for c in self._classes[:klass] for t in c.ring)
        c = self._classes[klass]
        ring = c.ring
        name = tenant.name if tenant is not None else ""
        quantum = self.quantum(name) if tenant is not None else 1.0
        credit = _credit(tenant, quantum)
        # The turns ``tenant`` needs to dispatch its nth: this one's credit, then a quantum
        # a turn. The tenants before it in the ring get as many, those after one fewer.
        turns = 1 + max(0, math.ceil((nth - credit) / quantum))
        index = len(ring) if tenant is None else ring.index(tenant)
        others = 0
        for i, other in enumerate(ring):
            if other is tenant:
                continue
            their = turns if i < index else turns - 1
            if their > 0:
                q = self.quantum(other.name)
                others += min(other.counted(competes),
                              math.floor(_credit(other, q) + (their - 1) * q))
        return ahead + others + nth

    # -- bookkeeping ---------------------------------------------------------------------

    def _dispatched(self, c: _Class, tenant: _Tenant, waiter: Waiter) -> None:
        """Charge a dispatch to the tenant's credit (its turn ends below 1), then take the
        waiter out."""
        del c.arrivals[waiter]
        if not tenant.fresh:
            tenant.deficit += self.quantum(tenant.name)
            tenant.fresh = True
        tenant.deficit -= 1.0
        self._take(c, tenant, waiter)
        if tenant.count and tenant.deficit < 1.0:
            c.ring.remove(tenant)
            c.ring.append(tenant)
            tenant.fresh = False

    def _take(self, c: _Class, tenant: _Tenant, waiter: Waiter) -> None:
        self._len -= 1
        fifo = tenant.fifos[waiter.model]
        del fifo[waiter]
        if not fifo:
            del tenant.fifos[waiter.model]
        tenant.count -= 1
        if not tenant.count:
            # Out of the ring, its credit forgotten: idle time earns no burst later.
            c.ring.remove(tenant)
            del c.tenants[tenant.name]

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Waiter]:
        """Resends, then each class in arrival order (the round-robin interleaves tenants:
        :meth:`position` estimates where each stands)."""
        yield from self._front
        for c in self._classes:
            yield from c.arrivals

    def __repr__(self) -> str:
        parts = [f"front {len(self._front)}"] if self._front else []
        for k, c in enumerate(self._classes):
            if c.ring:
                ring = ", ".join(f"{t.name or '-'}:{t.count}" for t in c.ring)
                parts.append(f"class {k} [{ring}]")
        return f"<PolicyQueue {self._len} waiting{': ' if parts else ''}{'; '.join(parts)}>"


def _credit(tenant: _Tenant | None, quantum: float) -> float:
    """What a tenant may dispatch in its current turn (or its next, if not started)."""
    if tenant is None:
        return quantum
    return tenant.deficit if tenant.fresh else tenant.deficit + quantum


def _any_model(model: str | None) -> bool:
    return True
