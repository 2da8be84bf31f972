"""Which replicas can take which request: model routing and token budgets, without I/O.

A replica serves a model if it is model-blind (no ``models``), or its list names it; a request
that names no model goes to any replica; a replica whose list is being read
(``models_pending``) serves no named model yet, but keeps a request for a model nobody else
serves waiting instead of refused. A request of token ``cost`` fits a replica with a budget
when ``tokens_in_flight + cost <= max_tokens``; one over the budget of every replica that
could serve its model (with none unbudgeted) could never be served, and is refused.

:class:`Placer` is one dispatch round's view of the free replicas: each takes the best waiter
(the policy's order) it serves if that one fits its free tokens, and is kept for it otherwise
(so a large request is not starved by a stream of small ones: it always fits once enough
work has finished, because one too large for the empty replica was refused or is not counted
as served by it).
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.core.errors import ModelNotFound, ProxyError, RequestTooLarge
from proxy.core.queue import Waiter, WaitQueue
from proxy.core.replicas import ACTIVE, Replica, ReplicaSet


def serves(replicas: ReplicaSet, model: str) -> bool:
    """Whether a request for ``model`` is accepted (not 404): some active replica is
    model-blind, names it, or has a list still being read; or there is no active replica
    yet (scaling up from zero: it waits). Unhealthy replicas count (their waiters wait); a
    draining one does not."""
    return replicas.route(model).known


def models(replicas: ReplicaSet) -> list[str]:
    """Every model some active replica names, sorted (model-blind replicas name none)."""
    names: set[str] = set()
    for r in replicas.all:
        if r.state == ACTIVE and r.models is not None:
            names |= r.models
    return sorted(names)


def refusal(replicas: ReplicaSet, model: str | None, cost: int) -> ProxyError | None:
    """Why a request can never be served (None: it can): its model, or its cost."""
    route = replicas.route(model)
    if not route.known:
        return ModelNotFound(model or "")
    largest = route.largest
    if largest is not None and cost > largest:
        return RequestTooLarge(cost, largest, model)
    return None


def claimed(queue: WaitQueue, replica: Replica, klass: int) -> bool:
    """Whether a resend, or a waiter of class ``klass`` or higher, waits that ``replica``
    could serve: it comes before a newcomer of class ``klass`` (a free replica with such a
    waiter is kept for it, as it does not fit yet)."""
    fits = _always if replica.max_tokens is None else _fits_empty(replica)
    return queue.claims(klass, replica.serves, fits)


class Placer:
    """One dispatch round's view of the free replicas, for :meth:`WaitQueue.pop_first`:
    which waiter a free replica takes, and which replicas are kept for a waiter that does
    not fit them yet."""

    __slots__ = ("_set", "chosen", "kept", "live")

    def __init__(self, replicas: ReplicaSet) -> None:
        self._set = replicas
        self.kept: set[Replica] = set()
        self.live: list[Replica] = []
        self.chosen: Replica | None = None

    def reset(self) -> bool:
        """The replicas with a free slot that are not kept; False if there is none."""
        self.live = [r for r in self._set.candidates(None, 0) if r not in self.kept]
        self.chosen = None
        return bool(self.live)

    def model_ok(self, model: str | None) -> bool:
        kept = self.kept
        return any(r.serves(model) for r in self.live if r not in kept)

    def accept(self, waiter: Waiter) -> bool:
        kept = self.kept
        cost = waiter.cost
        serving = [r for r in self.live
                   if r not in kept and r.serves(waiter.model) and r.can_fit(cost)]
        if not serving:
            return False
        fitting = [r for r in serving if r.fits(cost)]
        if not fitting:
            kept.update(serving)  # its best waiter does not fit yet: it waits for it
            return False
        self.chosen = self._set.choose(fitting)
        return True


def _always(waiter: Waiter) -> bool:
    return True


def _fits_empty(replica: Replica) -> Callable[[Waiter], bool]:
    return lambda waiter: replica.can_fit(waiter.cost)
