"""The adaptive cap's rule (proxy.core.adaptive): each branch, bounds, convergence."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.control.adaptive import SAMPLES
from proxy.core.adaptive import (
    FIRST_HOLD,
    KV_HIGH,
    CapState,
    EngineReading,
    merge,
    next_cap,
)


def step(state: CapState, engine: EngineReading, *, waiters: int = 10, in_flight: int | None
         = None, low: int = 1, high: int = 128) -> CapState:
    return next_cap(state, low=low, high=high, waiters=waiters,
                    in_flight=state.cap if in_flight is None else in_flight, engine=engine)


IDLE_ENGINE = EngineReading(waiting=0, running=3, kv_usage=0.2)


def test_increases_by_a_quarter_until_the_engine_first_queues_then_by_one() -> None:
    state = step(CapState(16), IDLE_ENGINE)
    assert (state.cap, state.why) == (20, "increase")
    assert step(CapState(2), IDLE_ENGINE).cap == 3  # at least 1
    assert step(CapState(16), IDLE_ENGINE, waiters=2).cap == 18  # no more than the waiters
    assert step(CapState(16, learned=True), IDLE_ENGINE).cap == 17


def test_holds_without_waiters_with_a_kv_cache_at_the_line_or_no_queue_series() -> None:
    assert step(CapState(16), IDLE_ENGINE, waiters=0).why == "hold"
    assert step(CapState(16), EngineReading(waiting=0, kv_usage=KV_HIGH)).cap == 16
    assert step(CapState(16), EngineReading(running=8, kv_usage=0.1)).why == "hold"
    # KV not exported (TGI, llama.cpp): room is assumed.
    assert step(CapState(16), EngineReading(waiting=0)).cap == 20


def test_one_reading_with_a_queue_is_no_queue_two_are() -> None:
    queued = EngineReading(waiting=4, running=16)
    first = step(CapState(20), queued)
    assert (first.cap, first.why) == (20, "hold")
    second = step(first, queued)
    # Batchgate's share of the engine's batch: 20 * 16 / (16 + 4).
    assert (second.cap, second.why) == (16, "decrease: engine queue")
    assert (second.ceiling, second.hold, second.learned) == (20, FIRST_HOLD, True)
    # A queue that went away in between is not one.
    between = step(first, IDLE_ENGINE)
    assert step(between, queued).why == "hold"
    assert step(between, queued).cap == between.cap


def test_decrease_is_at_most_a_quarter_and_at_least_one() -> None:
    deep = CapState(128, waiting=112)
    assert step(deep, EngineReading(waiting=112, running=16)).cap == 96
    shallow = CapState(17, waiting=1)
    assert step(shallow, EngineReading(waiting=1, running=16)).cap == 16
    # Engine shared with others: still at least one down.
    assert step(CapState(8, waiting=1), EngineReading(waiting=1, running=100)).cap == 7


def test_decrease_uses_in_flight_not_a_cap_not_yet_drained() -> None:
    # The cap was just cut to 96 but 128 are still out: the share is of the 128.
    state = CapState(96, waiting=112)
    assert step(state, EngineReading(waiting=112, running=16), in_flight=128).cap == 72
    state = CapState(22, waiting=40)
    assert step(state, EngineReading(waiting=40, running=16), in_flight=56).cap == 16


def test_without_running_the_share_comes_from_in_flight() -> None:
    state = CapState(20, waiting=4)
    assert step(state, EngineReading(waiting=4), in_flight=20).cap == 16


def test_full_kv_cache_decreases_at_once_by_a_quarter() -> None:
    state = step(CapState(40), EngineReading(waiting=0, running=40, kv_usage=0.95))
    assert (state.cap, state.why) == (30, "decrease: kv cache full")
    assert step(CapState(2), EngineReading(kv_usage=1.0)).cap == 1
    assert step(CapState(1), EngineReading(kv_usage=1.0)).why == "hold: at min"


def test_the_cap_that_made_the_engine_queue_waits_before_it_is_tried_again() -> None:
    state = CapState(16, ceiling=17, hold=2, backoff=8, learned=True)
    state = step(state, IDLE_ENGINE)
    assert (state.cap, state.hold) == (16, 1)
    state = step(state, IDLE_ENGINE)
    assert (state.cap, state.hold) == (16, 0)
    state = step(state, IDLE_ENGINE)
    assert state.cap == 17  # tried once more
    # It queues again there: twice as long before the next try.
    queued = EngineReading(waiting=1, running=16)
    state = step(step(state, queued), queued)
    assert (state.cap, state.ceiling, state.hold, state.backoff) == (16, 17, 8, 16)
    # Tried and found room: forgotten, the cap goes on up.
    state = CapState(17, ceiling=17, learned=True)
    state = step(state, IDLE_ENGINE)
    assert (state.cap, state.ceiling) == (18, None)


def test_a_state_from_another_range_is_brought_into_it() -> None:
    assert step(CapState(200), IDLE_ENGINE, waiters=0).cap == 128
    assert step(CapState(1), IDLE_ENGINE, waiters=0, low=4).cap == 4
    assert step(CapState(128), IDLE_ENGINE).why == "hold: at max"


readings = st.builds(
    EngineReading,
    waiting=st.none() | st.floats(0, 1e4, allow_nan=False),
    running=st.none() | st.floats(0, 1e4, allow_nan=False),
    kv_usage=st.none() | st.floats(0, 1, allow_nan=False),
)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 64), st.integers(0, 200), st.integers(1, 400),
       st.lists(st.tuples(readings, st.integers(0, 1000), st.integers(0, 500)), max_size=60))
def test_the_cap_never_leaves_its_range(low: int, extra: int, start: int,
                                        steps: list[tuple[EngineReading, int, int]]) -> None:
    high = low + extra
    state = CapState(start)
    for engine, waiters, in_flight in steps:
        state = next_cap(state, low=low, high=high, waiters=waiters, in_flight=in_flight,
                         engine=engine)
        assert low <= state.cap <= high


def model_engine(batch: int, cap: int, blip: bool) -> EngineReading:
    """A continuously batching engine fed ``cap`` requests: it runs ``batch`` of them; a
    ``blip`` is a request that arrived between two steps (one waiting for the next)."""
    running, waiting = min(cap, batch), max(0, cap - batch)
    if blip and running:
        running, waiting = running - 1, waiting + 1
    return EngineReading(waiting=waiting, running=running, kv_usage=0.8 * running / batch)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 100), st.integers(1, 128), st.integers(0, 2**32))
def test_converges_to_the_engines_batch_limit(batch: int, start: int, seed: int) -> None:
    """Callers always waiting: after a while the cap is the engine's batch (or one above, a
    try), never below it. With blips (a request that arrived between two engine steps, seen
    by 30 % of single scrapes), readings are the merge of four samples, as the loop's
    (proxy.control.adaptive.SAMPLES): the cap never stands above the batch and the
    engine's batch stays 97 % full."""
    rng = random.Random(seed)
    low, high = 1, 128
    target = min(batch, high)
    state = CapState(start)
    caps = []
    for _ in range(400):
        state = next_cap(state, low=low, high=high, waiters=1000, in_flight=state.cap,
                         engine=model_engine(batch, state.cap, False))
        caps.append(state.cap)
    settled = caps[200:]
    assert set(settled) <= {target, target + 1}
    assert settled.count(target) >= 0.8 * len(settled)
    state = CapState(start)
    caps = []
    for _ in range(1000):
        reading = merge([model_engine(batch, state.cap, rng.random() < 0.3)
                         for _ in range(SAMPLES)])
        state = next_cap(state, low=low, high=high, waiters=1000, in_flight=state.cap,
                         engine=reading)
        caps.append(state.cap)
    settled = caps[300:]
    assert all(cap <= target + 1 for cap in settled)
    assert sum(min(cap, batch) for cap in settled) >= 0.97 * target * len(settled)


def test_merge_keeps_the_smallest_queue_the_largest_batch_and_the_fullest_cache() -> None:
    samples = [EngineReading(waiting=2, running=15, kv_usage=0.5),
               EngineReading(waiting=0, running=16, kv_usage=0.7),  # the arrival got in
               EngineReading(waiting=1, running=None, kv_usage=None)]
    assert merge(samples) == EngineReading(waiting=0, running=16, kv_usage=0.7)
    assert merge([EngineReading(kv_usage=0.2)]) == EngineReading(kv_usage=0.2)


def test_only_the_waiters_a_replica_could_take_count() -> None:
    from proxy.control.adaptive import waiters_for
    from proxy.core.replicas import Replica
    from proxy.core.scheduler import Lease, Scheduler

    chat, embed = frozenset({"chat"}), frozenset({"embed"})
    a, b = Replica("a", "http://a", 1, models=chat), Replica("b", "http://b", 1, models=embed)
    s = Scheduler([a, b], 10)
    held = [s.submit(lambda _: True, model="chat"), s.submit(lambda _: True, model="embed")]
    assert all(isinstance(h, Lease) for h in held)  # each replica's one slot is taken
    for _ in range(3):
        s.submit(lambda _: True, model="chat")
    s.submit(lambda _: True, model="embed")
    assert (waiters_for(s, a), waiters_for(s, b)) == (3, 1)
