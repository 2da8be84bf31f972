"""The replicas and their slots: who exists, who is healthy, how many slots each has in use.

:class:`ReplicaSet` is the one owner of that state. Its mutators return what they decided
(whether capacity may have appeared, whether a replica is gone), and the scheduler, the only
caller, turns appeared capacity into grants for waiters at that very moment. Nothing here does
I/O or knows about the queue.

Life of a replica: ``active`` (takes new work while healthy) -> ``draining`` (removed while it
still held work: no new work, it finishes what it holds) -> ``removed`` (gone from the set, its
last lease returned). Health is separate from that life: an unhealthy active replica keeps its
slots and gets work again the moment it is healthy.

What a replica serves (issue 10): ``models`` (None: model-blind, any model), or a list still
being read (``models_pending``: serves no named model yet); ``max_tokens`` bounds the token
cost of its leases together, besides ``max_concurrency`` bounding their count.

Health (``Replica.health``) is one of ``healthy``, ``unhealthy`` (its probes, a refused
connection or a stall say so) and ``ejected`` (passive outlier ejection: too many real requests
failed; see :mod:`proxy.core.outlier`). Ejection wins over the probes' verdict: an ejected
replica takes no work until the ejection is lifted, then the probes' verdict applies again.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import NamedTuple

from proxy.core.load import LoadBoard

ACTIVE = "active"
DRAINING = "draining"
REMOVED = "removed"

HEALTHY = "healthy"
UNHEALTHY = "unhealthy"
EJECTED = "ejected"
#: Every value of ``Replica.health`` (the ``state`` label of ``batchgate_replica_state``).
HEALTH_STATES = (HEALTHY, UNHEALTHY, EJECTED)


class Replica:
    """One upstream engine and its slots.

    Invariant (kept by :class:`ReplicaSet`): ``0 <= in_flight``, and no lease is granted while
    ``in_flight >= max_concurrency``, nor one of cost ``c`` while ``tokens_in_flight + c >
    max_tokens``. Lowering either limit cuts nothing: the work in flight finishes, and the
    replica gets new work once it is under the new limit.

    ``models``: the model names it serves (None: model-blind, it takes any model).
    ``models_pending``: its list is to be read from the replica (``models: auto``) and was
    not yet: it serves no named model for now (a request for a model nobody else serves waits
    for it rather than 404). A request that names no model goes to any replica.
    """

    __slots__ = ("ejected_until", "health", "healthy", "in_flight", "index", "max_concurrency",
                 "max_tokens", "models", "models_pending", "name", "state", "tokens_in_flight",
                 "up", "url")

    def __init__(
        self, name: str, url: str, max_concurrency: int, index: int = 0, *, healthy: bool = True,
        models: frozenset[str] | None = None, models_pending: bool = False,
        max_tokens: int | None = None,
    ) -> None:
        _check_limit(max_concurrency)
        _check_tokens(max_tokens)
        self.name = name
        self.models = models
        self.models_pending = models_pending
        #: ``replicas[].max_tokens_in_flight`` (None: no token budget).
        self.max_tokens = max_tokens
        #: The sum of the costs of its leases.
        self.tokens_in_flight = 0
        self.url = url
        self.max_concurrency = max_concurrency
        self.index = index
        self.in_flight = 0
        self.state = ACTIVE
        # Healthy from startup until a probe says otherwise (health.assume_healthy_at_start):
        # a proxy that starts before its engine answers should queue, not reject, and the
        # first probe follows at once.
        #: The probes' verdict (also cleared by a refused connection or a stall).
        self.up = healthy
        #: Wall-clock end of a passive ejection (None: not ejected). Past but not None: the
        #: ejection is over and the replica waits for a passing probe.
        self.ejected_until: float | None = None
        #: ``healthy``, ``unhealthy`` or ``ejected``; derived by :class:`ReplicaSet`.
        self.health = HEALTHY if healthy else UNHEALTHY
        #: ``health == "healthy"``, a plain attribute for the hot path (:meth:`ReplicaSet.pick`).
        self.healthy = healthy

    @property
    def free(self) -> int:
        return max(0, self.max_concurrency - self.in_flight)

    @property
    def takes_work(self) -> bool:
        return self.healthy and self.state == ACTIVE

    def serves(self, model: str | None) -> bool:
        """Whether it serves ``model`` now (None, no model named: every replica does)."""
        if model is None:
            return True
        models = self.models
        if models is None:
            return not self.models_pending
        return model in models

    def can_fit(self, cost: int) -> bool:
        """Whether a lease of ``cost`` fits it when it holds nothing (else it never will)."""
        return self.max_tokens is None or cost <= self.max_tokens

    def fits(self, cost: int) -> bool:
        """Whether a lease of ``cost`` fits its free tokens now."""
        return self.max_tokens is None or self.tokens_in_flight + cost <= self.max_tokens

    def less_loaded_than(self, other: Replica) -> bool:
        """``in_flight / max_concurrency`` compared exactly, without floats."""
        return self.in_flight * other.max_concurrency < other.in_flight * self.max_concurrency

    def __repr__(self) -> str:
        health = "ejected" if self.health == EJECTED else "up" if self.healthy else "down"
        state = health if self.state == ACTIVE else self.state
        return f"<Replica {self.name} {self.in_flight}/{self.max_concurrency} {state}>"


class Route(NamedTuple):
    """Who may serve requests for one model (cached until the replicas or their models or
    budgets change): the active replicas serving it, whether it is served at all (or may be:
    a list still being read, or no replica yet), and the largest token budget among those
    that could serve it (None: one has no budget, or none is known yet)."""

    replicas: tuple[Replica, ...]
    known: bool
    largest: int | None


def _check_limit(max_concurrency: int) -> None:
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")


def _check_tokens(max_tokens: int | None) -> None:
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens_in_flight must be >= 1, got {max_tokens}")


class ReplicaSet:
    """Every replica and its slots; the only code that changes ``in_flight`` or health."""

    __slots__ = ("_next", "_replicas", "_rng", "_routes", "load", "plain")

    def __init__(
        self,
        replicas: Iterable[Replica] = (),
        *,
        load: LoadBoard | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._replicas: tuple[Replica, ...] = ()
        #: No replica names its models, waits for them or has a token budget: any replica
        #: takes any request, and the scheduler keeps to its fast paths.
        self.plain = True
        self._routes: dict[str | None, Route] = {}
        self._next = 0  # round-robin start for tie-breaking
        #: The replicas' own load readings (batchgate sidecars); see :mod:`proxy.core.load`.
        self.load = load if load is not None else LoadBoard(max_age_s=0.0)
        self._rng = rng  # [0, 1): power-of-two-choices among replicas with equal room
        for replica in replicas:
            self._insert(replica)

    # -- observation ---------------------------------------------------------------------

    @property
    def all(self) -> tuple[Replica, ...]:
        """Active and draining replicas, in the order they were added."""
        return self._replicas

    def get(self, name: str) -> Replica | None:
        for replica in self._replicas:
            if replica.name == name:
                return replica
        return None

    def any_healthy(self) -> bool:
        return any(r.takes_work for r in self._replicas)

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self._replicas)

    def usable_slots(self) -> int:
        """Slots of the replicas that take work: the capacity ``Retry-After`` divides by."""
        return sum(r.max_concurrency for r in self._replicas if r.takes_work)

    def __len__(self) -> int:
        return len(self._replicas)

    def __repr__(self) -> str:
        return "[" + ", ".join(_brief(r) for r in self._replicas) + "]"

    # -- slots (the hot path) ------------------------------------------------------------

    def pick(self, avoid: Replica | None = None, cost: int = 0) -> Replica | None:
        """The replica that takes work with a free slot and the lowest load; ties round-robin.

        For :attr:`plain` sets only (it checks neither models nor tokens); the lease's
        ``cost`` is counted on the replica picked. Otherwise :meth:`choose` and :meth:`take`.

        With load readings (replicas that are batchgates reporting their load), the one with
        the most room among those with a free local slot (see :meth:`_pick_by_room`).
        ``avoid``: a replica that just rejected this request; another is preferred, and it is
        picked only when no other has a free slot.
        """
        if self.load.readings:
            best = self._pick_by_room(avoid)
        else:
            replicas = self._replicas
            start = self._next
            best = None
            # Round-robin order from the next one's turn, without an index sum and modulo per
            # replica (start is always 0 with one replica).
            for replica in replicas[start:] + replicas[:start] if start else replicas:
                if (
                    not replica.healthy
                    or replica.state != ACTIVE
                    or replica.in_flight >= replica.max_concurrency
                    or replica is avoid
                ):
                    continue
                # best is None, or replica.less_loaded_than(best), without the call
                if best is None or (replica.in_flight * best.max_concurrency
                                    < best.in_flight * replica.max_concurrency):
                    best = replica
            if best is None and avoid is not None and _usable(avoid):
                best = avoid
        if best is not None:
            best.in_flight += 1
            if cost:
                best.tokens_in_flight += cost
            self._next = (best.index + 1) % len(self._replicas)
        return best

    def route(self, model: str | None) -> Route:
        """Who may serve ``model`` (see :class:`Route`)."""
        route = self._routes.get(model)
        if route is None:
            active = [r for r in self._replicas if r.state == ACTIVE]
            serving = tuple(r for r in active if r.serves(model))
            pending = [r for r in active if r.models_pending and r not in serving]
            could = [*serving, *pending]
            largest = None
            if could and all(r.max_tokens is not None for r in could):
                largest = max(r.max_tokens for r in could if r.max_tokens is not None)
            known = model is None or not active or bool(could)
            route = self._routes[model] = Route(serving, known, largest)
        return route

    def candidates(self, model: str | None, cost: int) -> list[Replica]:
        """Replicas that could take a lease for ``model`` of ``cost`` now, in round-robin
        order from the next one's turn."""
        serving = self.route(model).replicas
        start = self._next
        found: list[Replica] = []
        later: list[Replica] = []  # before the next one's turn: after the others
        for r in serving:
            if (r.healthy and r.state == ACTIVE and r.in_flight < r.max_concurrency
                    and (r.max_tokens is None or r.tokens_in_flight + cost <= r.max_tokens)):
                (found if r.index >= start else later).append(r)
        if later:
            found.extend(later)
        return found

    def choose(self, candidates: list[Replica], avoid: Replica | None = None) -> Replica | None:
        """Among ``candidates`` (each able to take the lease now, in round-robin order, as
        :meth:`candidates` gives them), the one :meth:`pick` would take: the most room by
        the load readings if there are any, else the least loaded, the first on a tie."""
        if avoid is not None and len(candidates) > 1 and avoid in candidates:
            candidates = [r for r in candidates if r is not avoid]
        if not candidates:
            return None
        if self.load.readings:
            return self._best_by_room(candidates)
        best = candidates[0]
        for replica in candidates[1:]:
            if replica.less_loaded_than(best):
                best = replica
        return best

    def take(self, replica: Replica, cost: int) -> None:
        """A lease of ``cost`` on ``replica`` (one :meth:`choose` returned)."""
        replica.in_flight += 1
        replica.tokens_in_flight += cost
        self._next = (replica.index + 1) % len(self._replicas)

    def _pick_by_room(self, avoid: Replica | None) -> Replica | None:
        """The most room by the freshest readings; power-of-two-choices among equals.

        Among the replicas tied for the most room, two are sampled at random and the one
        less loaded locally wins (the first sampled on a tie): gateways that see the same
        readings do not all send to the same replica. Any candidate without a fresh
        reading: the local least-loaded pick, round-robin on ties, as without readings.
        """
        count = len(self._replicas)
        start = self._next
        ordered = [self._replicas[(start + i) % count] for i in range(count)]
        candidates = [r for r in ordered if _usable(r) and r is not avoid]
        if not candidates:
            candidates = [avoid] if avoid is not None and _usable(avoid) else []
            if not candidates:
                return None
        return self._best_by_room(candidates)

    def _best_by_room(self, candidates: list[Replica]) -> Replica:
        load = self.load
        rooms = [load.room(r) for r in candidates]
        if None in rooms:
            best = candidates[0]
            for replica in candidates[1:]:
                if replica.less_loaded_than(best):
                    best = replica
            return best
        most = max(room for room in rooms if room is not None)
        tied = [r for r, room in zip(candidates, rooms, strict=True) if room == most]
        if len(tied) == 1:
            return tied[0]
        rng = self._rng
        first = min(int(rng() * len(tied)), len(tied) - 1)
        second = min(int(rng() * (len(tied) - 1)), len(tied) - 2)
        if second >= first:
            second += 1
        a, b = tied[first], tied[second]
        return b if b.less_loaded_than(a) else a

    def give_back(self, replica: Replica, cost: int = 0) -> bool:
        """A slot comes back. True if that was a draining replica's last one (now removed)."""
        replica.in_flight -= 1
        if cost:
            replica.tokens_in_flight -= cost
        if replica.state == DRAINING and replica.in_flight == 0:
            self._drop(replica)
            return True
        return False

    # -- changes (each returns what it decided) ------------------------------------------

    def add(
        self, name: str, url: str, max_concurrency: int, *, healthy: bool = True,
        models: frozenset[str] | None = None, models_pending: bool = False,
        max_tokens: int | None = None,
    ) -> Replica:
        """A new replica, active, and healthy until probed (unless ``healthy`` is False:
        it then waits for its first passing probe): capacity appears."""
        if self.get(name) is not None:
            raise ValueError(f"replica {name!r} already exists")
        replica = Replica(name, url, max_concurrency, healthy=healthy, models=models,
                          models_pending=models_pending, max_tokens=max_tokens)
        self._insert(replica)
        return replica

    def set_models(self, replica: Replica, models: frozenset[str] | None) -> bool:
        """Its list of models, read (pending no more). True if it may serve more now."""
        replica.models = models
        replica.models_pending = False
        self._replan()
        return replica.takes_work

    def set_token_limit(self, replica: Replica, max_tokens: int | None) -> bool:
        """Change a replica's token budget live. True if tokens appeared on a usable one."""
        _check_tokens(max_tokens)
        old = replica.max_tokens
        replica.max_tokens = max_tokens
        self._replan()
        grew = max_tokens is None or (old is not None and max_tokens > old)
        return grew and replica.takes_work

    def remove(self, replica: Replica) -> bool:
        """Drain first: no new work from now. True if gone at once (it held nothing)."""
        if replica.state == REMOVED:
            return True
        if replica.in_flight == 0:
            self._drop(replica)
            return True
        replica.state = DRAINING
        self._replan()
        return False

    def set_limit(self, replica: Replica, max_concurrency: int) -> bool:
        """Change a replica's slots live. True if slots appeared (raised on a usable replica)."""
        _check_limit(max_concurrency)
        grew = max_concurrency > replica.max_concurrency
        replica.max_concurrency = max_concurrency
        return grew and replica.takes_work

    def set_healthy(self, replica: Replica, healthy: bool) -> bool:
        """The probes' verdict. True if the replica's slots just became usable."""
        replica.up = healthy
        return self._settle(replica)

    def set_ejected(self, replica: Replica, until: float | None) -> bool:
        """Eject until ``until`` (wall clock), or lift the ejection (None). True if the
        replica's slots just became usable."""
        replica.ejected_until = until
        return self._settle(replica)

    @staticmethod
    def _settle(replica: Replica) -> bool:
        was = replica.healthy
        if replica.ejected_until is not None:
            replica.health = EJECTED
        else:
            replica.health = HEALTHY if replica.up else UNHEALTHY
        replica.healthy = replica.health == HEALTHY
        return replica.healthy and not was and replica.state == ACTIVE

    def _insert(self, replica: Replica) -> None:
        replica.index = len(self._replicas)
        replica.state = ACTIVE
        self._replicas = (*self._replicas, replica)
        self._replan()

    def _replan(self) -> None:
        self._routes.clear()
        self.plain = all(
            r.models is None and not r.models_pending and r.max_tokens is None
            for r in self._replicas
        )

    def _drop(self, replica: Replica) -> None:
        replica.state = REMOVED
        self.load.forget(replica.name)
        self._replicas = tuple(r for r in self._replicas if r is not replica)
        for i, r in enumerate(self._replicas):
            r.index = i
        self._next = self._next % len(self._replicas) if self._replicas else 0
        self._replan()


def _usable(replica: Replica) -> bool:
    return (replica.healthy and replica.state == ACTIVE
            and replica.in_flight < replica.max_concurrency)


def _brief(r: Replica) -> str:
    state = "" if r.healthy else " ejected" if r.health == EJECTED else " down"
    if r.state != ACTIVE:
        state += f" {r.state}"
    tokens = "" if r.max_tokens is None else f" {r.tokens_in_flight}/{r.max_tokens} tokens"
    return f"{r.name} {r.in_flight}/{r.max_concurrency}{tokens}{state}"
