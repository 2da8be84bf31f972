"""The simulated engine's batching model, driven step by step by a hand-advanced clock.

Only ``test_seed_table_in_real_time`` runs on the real clock (about 9 s in all): timing is what
the simulator is for, so it checks the model against the loop's own clock.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import pytest

from proxy.config import SimulatedConfig
from proxy.sim.engine import (
    SEED_STEP_MS,
    Clock,
    EngineClosed,
    SimEngine,
    TooLarge,
    next_deadline,
    step_ms,
)

SEED_TOTAL_MS = {1: 1776, 2: 1981, 4: 2067, 8: 3767, 16: 4431, 32: 4942}


class ManualClock:
    """Time stands still while the engine sleeps, until the test fires the pending step."""

    def __init__(self) -> None:
        self.now = 0.0
        self.deadlines: list[float] = []
        self._wake: asyncio.Future[None] | None = None

    def time(self) -> float:
        return self.now

    async def sleep_until(self, deadline: float) -> None:
        self.deadlines.append(deadline)
        self._wake = asyncio.get_running_loop().create_future()
        try:
            await self._wake
        finally:
            self._wake = None

    @property
    def asleep(self) -> bool:
        return self._wake is not None and not self._wake.done()

    def fire(self, late_by: float = 0.0) -> None:
        assert self._wake is not None, "the engine is not in a step"
        self.now = self.deadlines[-1] + late_by
        self._wake.set_result(None)

    def step_lengths(self) -> list[float]:
        return [b - a for a, b in zip([0.0, *self.deadlines], self.deadlines, strict=False)]


async def wait_until(condition: Callable[[], bool], what: str = "condition") -> None:
    """Yield to the loop until ``condition`` holds; bounded, since nothing here sleeps."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never reached: {what}")


async def step(engine: SimEngine, clock: ManualClock, *, late_by: float = 0.0) -> None:
    """Let the engine finish the step it is sleeping in, and wait until it has."""
    await wait_until(lambda: clock.asleep, "engine in a step")
    done = engine.total_steps
    clock.fire(late_by)
    await wait_until(lambda: engine.total_steps > done, "step produced")


async def consume(
    engine: SimEngine, max_tokens: int, prompt_tokens: int = 0, into: list[int] | None = None
) -> list[int]:
    got = [] if into is None else into
    async with aclosing(engine.generate(prompt_tokens, max_tokens)) as tokens:
        async for index in tokens:
            got.append(index)
    return got


MakeEngine = Callable[..., SimEngine]


@pytest.fixture
async def make_engine() -> AsyncIterator[MakeEngine]:
    """Engines that must end every test balanced: no request or task left behind."""
    engines: list[SimEngine] = []

    def make(clock: Clock | None = None, **config: Any) -> SimEngine:
        engine = SimEngine(SimulatedConfig(**config), clock=clock)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert (engine.running, engine.waiting) == (0, 0), engine
        assert engine.total_started == engine.total_finished + engine.total_aborted, engine
        await engine.aclose()
    assert asyncio.all_tasks() == {asyncio.current_task()}


# --- the timing model, pure -------------------------------------------------------------------


def test_step_ms_hits_every_seed_point() -> None:
    for n, total_ms in SEED_TOTAL_MS.items():
        assert step_ms(n) == pytest.approx(total_ms / 100)
    assert [n for n, _ in SEED_STEP_MS] == list(SEED_TOTAL_MS)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (3, (19.81 + 20.67) / 2),
        (6, (20.67 + 37.67) / 2),
        (12, (37.67 + 44.31) / 2),
        (24, (44.31 + 49.42) / 2),
        (20, 44.31 + (49.42 - 44.31) / 4),
    ],
)
def test_step_ms_interpolates_linearly(n: int, expected: float) -> None:
    assert step_ms(n) == pytest.approx(expected)


@pytest.mark.parametrize(("n", "expected"), [(48, 54.53), (64, 59.64), (1000, 358.575)])
def test_step_ms_extrapolates_past_32_along_the_last_segment(n: int, expected: float) -> None:
    assert step_ms(n) == pytest.approx(expected)


def test_step_ms_needs_a_batch() -> None:
    with pytest.raises(ValueError, match=re.escape("n_running must be at least 1. Got 0.")):
        step_ms(0)


def test_next_deadline_chains_absolute_deadlines() -> None:
    assert next_deadline(None, now=5.0, duration=0.02) == pytest.approx(5.02)  # after idling
    # Woken 5 ms late: the next step is 5 ms shorter, so lateness does not accumulate.
    assert next_deadline(5.02, now=5.025, duration=0.02) == pytest.approx(5.04)
    # More than a whole step late: restart from now, no burst of catch-up steps.
    assert next_deadline(5.02, now=5.05, duration=0.02) == pytest.approx(5.07)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_batch", 0, "sim.max_batch must be at least 1. Got 0."),
        ("profile", "gpt", "sim.profile must be one of ['seed']. Got 'gpt'."),
        ("time_scale", -1.0, "sim.time_scale must be >= 0. Got -1.0."),
        ("prompt_ms_per_token", float("nan"), "sim.prompt_ms_per_token must be >= 0. Got nan."),
        ("default_max_tokens", 0, "sim.default_max_tokens must be at least 1. Got 0."),
        ("kv_tokens", -1, "sim.kv_tokens must be >= 0. Got -1."),
    ],
)
def test_bad_config_names_field_and_value(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SimEngine(SimulatedConfig(**{field: value}))  # type: ignore[arg-type]


def test_engine_core_does_not_import_aiohttp() -> None:
    code = "import sys, proxy.sim.engine; assert 'aiohttp' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- batching, on the manual clock ------------------------------------------------------------


async def test_max_batch_bounds_the_batch_and_the_rest_wait_in_order(
    make_engine: MakeEngine,
) -> None:
    clock = ManualClock()
    engine = make_engine(clock, max_batch=2)
    tasks = [asyncio.create_task(consume(engine, 3)) for _ in range(5)]
    await wait_until(lambda: clock.asleep)
    assert (engine.running, engine.waiting) == (2, 3)
    assert repr(engine) == (
        "<SimEngine started running=2 waiting=3 max_batch=2 started=5 finished=0 aborted=0"
        " tokens=0>"
    )
    for _ in range(3):
        await step(engine, clock)
    await wait_until(lambda: clock.asleep)
    # The first two finished at the end of step 3; the next two joined at that boundary.
    assert (engine.running, engine.waiting, engine.total_finished) == (2, 1, 2)
    await wait_until(lambda: tasks[0].done() and tasks[1].done(), "first two delivered")
    assert not tasks[2].done()
    for _ in range(6):
        await step(engine, clock)
    assert await asyncio.gather(*tasks) == [[0, 1, 2]] * 5
    assert engine.peak_running == 2
    assert engine.total_steps == 9
    assert engine.total_generated_tokens == 15
    # Six steps at batch 2, then three with the last request alone.
    assert clock.step_lengths() == pytest.approx([0.01981] * 6 + [0.01776] * 3)
    await wait_until(lambda: not clock.asleep and engine.running == 0)
    assert (engine.total_started, engine.total_finished, engine.total_aborted) == (5, 5, 0)


async def test_a_waiter_joins_as_soon_as_one_request_finishes(make_engine: MakeEngine) -> None:
    """Continuous batching: a freed slot is refilled at the next step, not after the batch."""
    clock = ManualClock()
    engine = make_engine(clock, max_batch=2)
    short = asyncio.create_task(consume(engine, 1))
    long_received: list[int] = []
    long = asyncio.create_task(consume(engine, 3, into=long_received))
    late = asyncio.create_task(consume(engine, 2))
    await step(engine, clock)
    await wait_until(lambda: clock.asleep)
    assert (engine.running, engine.waiting, engine.total_finished) == (2, 0, 1)
    assert await short == [0]
    await step(engine, clock)
    await step(engine, clock)
    assert await long == [0, 1, 2]
    assert await late == [0, 1]
    assert engine.total_steps == 3


async def test_prompt_cost_lengthens_the_first_step(make_engine: MakeEngine) -> None:
    clock = ManualClock()
    engine = make_engine(clock, prompt_ms_per_token=2.0, time_scale=0.5)
    task = asyncio.create_task(consume(engine, 2, prompt_tokens=10))
    await step(engine, clock)
    await step(engine, clock)
    assert await task == [0, 1]
    assert clock.step_lengths() == pytest.approx([(17.76 + 20.0) * 0.5e-3, 17.76 * 0.5e-3])
    assert engine.total_prompt_tokens == 10


async def test_a_stalled_loop_restarts_its_schedule_instead_of_bursting(
    make_engine: MakeEngine,
) -> None:
    clock = ManualClock()
    engine = make_engine(clock)
    task = asyncio.create_task(consume(engine, 3))
    await step(engine, clock, late_by=0.005)  # a little late: absorbed by the next step
    await step(engine, clock, late_by=1.0)  # a stall: the next step is a full one from now
    await step(engine, clock)
    assert await task == [0, 1, 2]
    assert clock.deadlines == pytest.approx([0.01776, 0.03552, 1.03552 + 0.01776])


# --- leaving early ----------------------------------------------------------------------------


async def test_aclose_frees_the_slot_at_once_for_the_next_waiter(make_engine: MakeEngine) -> None:
    clock = ManualClock()
    engine = make_engine(clock, max_batch=1)
    tokens = engine.generate(0, 100)
    first = asyncio.create_task(anext(tokens))
    await step(engine, clock)
    assert await first == 0
    waiter = asyncio.create_task(consume(engine, 2))
    await wait_until(lambda: engine.waiting == 1)

    await tokens.aclose()
    assert (engine.running, engine.waiting, engine.total_aborted) == (0, 1, 1)
    await step(engine, clock)  # the step in flight ends; the waiter joins at its boundary
    await step(engine, clock)
    await step(engine, clock)
    assert await waiter == [0, 1]
    assert engine.total_generated_tokens == 1 + 2
    assert engine.peak_running == 1


async def test_cancelled_consumer_leaves_the_batch(make_engine: MakeEngine) -> None:
    clock = ManualClock()
    engine = make_engine(clock)
    received: list[int] = []
    task = asyncio.create_task(consume(engine, 100, into=received))
    await step(engine, clock)
    await wait_until(lambda: received == [0])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (engine.running, engine.total_aborted) == (0, 1)
    await step(engine, clock)  # the step already under way produces for nobody
    assert engine.total_generated_tokens == 1
    await wait_until(lambda: not clock.asleep)  # and the loop goes idle


async def test_cancelled_waiter_is_never_admitted(make_engine: MakeEngine) -> None:
    clock = ManualClock()
    engine = make_engine(clock, max_batch=1)
    running = asyncio.create_task(consume(engine, 2))
    queued = asyncio.create_task(consume(engine, 5))
    await wait_until(lambda: engine.waiting == 1)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert (engine.running, engine.waiting, engine.total_aborted) == (1, 0, 1)
    await step(engine, clock)
    await step(engine, clock)
    assert await running == [0, 1]
    await wait_until(lambda: not clock.asleep)
    assert engine.total_steps == 2


async def test_break_under_aclosing_releases_before_the_next_statement(
    make_engine: MakeEngine,
) -> None:
    clock = ManualClock()
    engine = make_engine(clock)

    async def take_two() -> None:
        async with aclosing(engine.generate(0, 100)) as tokens:
            async for index in tokens:
                if index == 1:
                    break
        assert engine.running == 0

    task = asyncio.create_task(take_two())
    await step(engine, clock)
    await step(engine, clock)
    await task
    assert (engine.total_aborted, engine.total_finished) == (1, 0)


async def test_close_fails_unfinished_generations(make_engine: MakeEngine) -> None:
    clock = ManualClock()
    engine = make_engine(clock, max_batch=1)
    running = asyncio.create_task(consume(engine, 10))
    queued = asyncio.create_task(consume(engine, 10))
    await step(engine, clock)
    await engine.aclose()
    for task in (running, queued):
        with pytest.raises(EngineClosed):
            await task
    assert (engine.running, engine.waiting, engine.total_aborted) == (0, 0, 2)
    with pytest.raises(EngineClosed):
        await consume(engine, 1)
    assert repr(engine).startswith("<SimEngine closed running=0 waiting=0")


async def test_close_before_the_loop_first_runs_still_fails_waiters(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(ManualClock())
    task = asyncio.create_task(consume(engine, 5))
    await wait_until(lambda: engine.waiting == 1)
    await engine.aclose()
    with pytest.raises(EngineClosed):
        await task
    assert (engine.waiting, engine.total_aborted) == (0, 1)


# --- the KV-cache budget (kv_tokens) ------------------------------------------------------------


async def test_a_step_past_the_kv_budget_preempts_the_newest_which_recomputes_later(
    make_engine: MakeEngine,
) -> None:
    clock = ManualClock()
    engine = make_engine(clock, max_batch=4, kv_tokens=10, prompt_ms_per_token=1.0)
    first_got: list[int] = []
    first = asyncio.create_task(consume(engine, 5, prompt_tokens=3, into=first_got))
    second_got: list[int] = []
    second = asyncio.create_task(consume(engine, 5, prompt_tokens=3, into=second_got))
    await wait_until(lambda: clock.asleep)
    assert (engine.running, engine.kv_used) == (2, 6)  # both prompts fit beside their tokens
    await step(engine, clock)
    assert (engine.kv_used, engine.kv_usage) == (8, 0.8)  # 3 + 1 each
    await step(engine, clock)  # 10: full
    await wait_until(lambda: clock.asleep)
    # Step 3 would need 12: the newest goes back to the head of the queue, with its 2 tokens.
    assert (engine.running, engine.waiting, engine.preemptions, engine.kv_used) == (1, 1, 1, 5)
    await wait_until(lambda: second_got == [0, 1])
    for _ in range(3):
        await step(engine, clock)
    assert await first == [0, 1, 2, 3, 4]
    # Readmitted once the first left: prefills its prompt and its two tokens again (5 ms).
    await wait_until(lambda: clock.asleep)
    assert (engine.running, engine.kv_used) == (1, 5)
    for _ in range(3):
        await step(engine, clock)
    assert await second == [0, 1, 2, 3, 4]
    assert clock.step_lengths() == pytest.approx(
        [0.01981 + 0.006] + [0.01981] + [0.01776] * 3 + [0.01776 + 0.005] + [0.01776] * 2
    )
    assert engine.total_prompt_tokens == 6  # recomputation is not new prompt
    assert (engine.preemptions, engine.total_finished, engine.kv_used) == (1, 2, 0)


async def test_a_waiter_is_admitted_only_when_its_prompt_fits(make_engine: MakeEngine) -> None:
    clock = ManualClock()
    engine = make_engine(clock, max_batch=4, kv_tokens=10)
    big = asyncio.create_task(consume(engine, 2, prompt_tokens=6))
    await wait_until(lambda: engine.waiting == 1)
    behind = asyncio.create_task(consume(engine, 2, prompt_tokens=4))
    small = asyncio.create_task(consume(engine, 1, prompt_tokens=0))
    await wait_until(lambda: clock.asleep)
    # 6 + 1 held by the first; 4 + 1 more would be 12: the batch has room, the cache has not,
    # and the small one behind does not jump the line.
    assert (engine.running, engine.waiting, engine.kv_used) == (1, 2, 6)
    await step(engine, clock)
    await step(engine, clock)
    assert await big == [0, 1]
    await wait_until(lambda: clock.asleep)
    assert (engine.running, engine.waiting, engine.kv_used) == (2, 0, 4)
    await step(engine, clock)
    await step(engine, clock)
    assert await behind == [0, 1]
    assert await small == [0]
    assert engine.preemptions == 0


async def test_a_request_that_could_never_fit_is_refused(make_engine: MakeEngine) -> None:
    engine = make_engine(ManualClock(), kv_tokens=10)
    assert engine.fits(6, 4) and not engine.fits(6, 5)
    with pytest.raises(TooLarge, match="prompt_tokens \\+ max_tokens = 11 exceeds the KV-cache"):
        await consume(engine, 5, prompt_tokens=6)
    assert engine.total_started == 0


async def test_unlimited_kv_never_preempts_and_reports_zero_usage(
    make_engine: MakeEngine,
) -> None:
    clock = ManualClock()
    engine = make_engine(clock, max_batch=4)
    tasks = [asyncio.create_task(consume(engine, 3, prompt_tokens=10_000)) for _ in range(4)]
    for _ in range(3):
        await step(engine, clock)
    assert [len(t) for t in await asyncio.gather(*tasks)] == [3] * 4
    assert (engine.preemptions, engine.kv_usage, engine.peak_running) == (0, 0.0, 4)


# --- the real clock -----------------------------------------------------------------------------


async def test_thousands_of_concurrent_requests(make_engine: MakeEngine) -> None:
    engine = make_engine(max_batch=256, time_scale=0.001)
    results = await asyncio.gather(*(consume(engine, 4) for _ in range(3000)))
    assert all(r == [0, 1, 2, 3] for r in results)
    assert engine.peak_running == 256
    assert engine.total_steps == 12 * 4  # ceil(3000 / 256) rounds of 4 steps
    assert engine.total_finished == 3000


@pytest.mark.parametrize("batch", [1, 4, 32])
async def test_seed_table_in_engine_time(make_engine: MakeEngine, batch: int) -> None:
    """``batch`` requests of 100 tokens take the seed table's time (1.8 to 4.9 s each), on the
    engine's clock: driven step by step, no real time (make bench measures the real one)."""
    clock = ManualClock()
    engine = make_engine(clock, time_scale=1.0)
    tasks = [asyncio.create_task(consume(engine, 100)) for _ in range(batch)]
    for _ in range(100):
        await step(engine, clock)
    results = await asyncio.gather(*tasks)
    assert all(len(r) == 100 for r in results)
    assert engine.peak_running == batch
    assert clock.deadlines[-1] * 1000 == pytest.approx(SEED_TOTAL_MS[batch], rel=0.005)
