"""The adaptive cap: the next ``max_concurrency`` of a replica from its engine's own reading.

Pure and synchronous (no I/O, no clock): :func:`next_cap` takes the state of one replica's
cap, batchgate's queue, the replica's requests in flight and what its engine's ``/metrics``
said, and returns the next state. :mod:`proxy.control.adaptive` runs it every
``adaptive.interval_s`` and applies the cap through the scheduler.

The goal is that the queue lives in batchgate (ordered, shed, measured) and the engine's batch
stays full: as many requests on the engine as it runs at once, none waiting inside it.

The rule, one reading at a time:

* **Decrease** when the engine queues (``waiting > 0`` in two readings in a row, each the
  smallest of several samples, :func:`merge`: a request that arrives between two of the
  engine's steps waits for the next one, which is no queue)
  or its KV cache is fuller than :data:`KV_HIGH`. A queue brings the cap to batchgate's share
  of what the engine runs, ``in_flight * running / (running + waiting)`` (the engine's batch
  limit when batchgate is its only caller); a full KV cache multiplies it by
  :data:`DECREASE`. Either way by at least 1 and at most a quarter per reading.
* **Increase** while batchgate has waiters (the cap is what holds them back), the engine has
  no queue and its KV cache has room (below ``KV_HIGH``, or not exported): by a quarter
  (at least 1, at most the waiters) until the engine first queues, then by 1 per reading.
  After a decrease, the cap that made the engine queue is not tried again for
  :data:`FIRST_HOLD` readings, doubling each time it queues again there (at most
  :data:`MAX_HOLD`): the cap settles one below it instead of see-sawing across it; a later
  try that finds no queue forgets it (the engine got room: a longer context freed, a bigger
  GPU behind the same name).
* **Hold** otherwise: no waiters (the cap is not what limits), or a reading that cannot
  tell (no queue series, a first reading with a queue).

What always holds: the result is within ``[low, high]`` whatever the inputs (a state from an
older range is brought into it first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

#: KV cache usage (0..1) above which the engine has no room: it would preempt or queue next.
KV_HIGH = 0.9
#: The multiplicative decrease on a full KV cache, and the largest cut of any one reading.
DECREASE = 0.75
#: Readings the cap stays below a cap that made the engine queue before trying it again.
FIRST_HOLD = 4
MAX_HOLD = 32


@dataclass(frozen=True, slots=True)
class EngineReading:
    """What one scrape of the engine's ``/metrics`` said; None: not exported by it."""

    waiting: float | None = None  # requests queued inside the engine
    running: float | None = None  # requests in its batch
    kv_usage: float | None = None  # KV cache usage, 0..1


def merge(samples: Sequence[EngineReading]) -> EngineReading:
    """One reading from several samples of one interval: the smallest queue (a request that
    arrived mid-step and waits for the next step boundary is in some samples, a standing
    queue is in every one), the largest batch and the fullest KV cache."""

    def pick(values: list[float | None], combine: Callable[[list[float]], float]
             ) -> float | None:
        known = [v for v in values if v is not None]
        return combine(known) if known else None

    return EngineReading(
        waiting=pick([s.waiting for s in samples], min),
        running=pick([s.running for s in samples], max),
        kv_usage=pick([s.kv_usage for s in samples], max),
    )


@dataclass(frozen=True, slots=True)
class CapState:
    """One replica's cap and what the rule remembers between readings."""

    cap: int
    #: The engine's queue in the last reading (None: unknown), to confirm a queue.
    waiting: float | None = None
    #: The lowest cap at which the engine queued since it last had room there, if any.
    ceiling: int | None = None
    #: Readings left before the cap may reach ``ceiling`` again.
    hold: int = 0
    #: The next hold's length.
    backoff: int = FIRST_HOLD
    #: The engine has queued at least once: increases are additive from then on.
    learned: bool = False
    #: Why the last reading moved the cap or not ("increase", "decrease", "hold", ...).
    why: str = "start"

    def __repr__(self) -> str:
        ceiling = "" if self.ceiling is None else f" ceiling={self.ceiling} hold={self.hold}"
        return f"<CapState cap={self.cap}{ceiling} {self.why}>"


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def next_cap(
    state: CapState, *, low: int, high: int, waiters: int, in_flight: int,
    engine: EngineReading,
) -> CapState:
    """The state after one reading. ``waiters``: batchgate's queue (requests this replica could
    take if it had slots); ``in_flight``: the replica's requests in flight from batchgate."""
    before = state.waiting
    waiting, kv = engine.waiting, engine.kv_usage
    state = replace(state, cap=_clamp(state.cap, low, high), waiting=waiting)
    if kv is not None and kv > KV_HIGH:
        return _decrease(state, int(state.cap * DECREASE), low, "decrease: kv cache full")
    if waiting is not None and before is not None and waiting > 0 and before > 0:
        queued = min(waiting, before)  # what stayed queued across two readings
        running = engine.running
        served = running if running is not None else max(0.0, in_flight - queued)
        # Batchgate's share of the engine's batch: its batch limit when batchgate is its
        # only caller. Computed from in_flight, not the cap: a cap just lowered has not
        # drained yet, and the engine's queue still counts what the old cap let in.
        share = int(in_flight * served // (served + queued)) if served > 0 else 0
        return _decrease(state, share, low, "decrease: engine queue")
    if waiting is None or waiting > 0 or waiters <= 0 or (kv is not None and kv >= KV_HIGH):
        return replace(state, why="hold")
    return _increase(state, high, waiters)


def _decrease(state: CapState, target: int, low: int, why: str) -> CapState:
    cap = state.cap
    new = max(low, min(cap - 1, max(int(cap * DECREASE), target)))
    if new >= cap:
        return replace(state, why="hold: at min")
    if state.ceiling == cap:
        # The same cap made it queue again: wait twice as long before the next try.
        hold, backoff = state.backoff, min(MAX_HOLD, 2 * state.backoff)
    else:
        hold, backoff = FIRST_HOLD, min(MAX_HOLD, 2 * FIRST_HOLD)
    return replace(state, cap=new, ceiling=cap, hold=hold, backoff=backoff, learned=True,
                   why=why)


def _increase(state: CapState, high: int, waiters: int) -> CapState:
    cap = state.cap
    if cap >= high:
        return replace(state, why="hold: at max")
    if state.ceiling is not None and cap >= state.ceiling:
        # At the cap that once made the engine queue, and it does not now: it has room.
        state = replace(state, ceiling=None, hold=0, backoff=FIRST_HOLD)
    step = 1 if state.learned else max(1, cap // 4)
    new = min(high, cap + min(step, waiters))
    ceiling = state.ceiling
    if ceiling is not None and new >= ceiling:
        if state.hold > 0:
            state = replace(state, hold=state.hold - 1)
            new = ceiling - 1
            if new <= cap:
                return replace(state, why="hold: below the cap that queued")
        else:
            new = ceiling  # try it once more
    return replace(state, cap=new, why="increase")
