"""A simulated LLM engine that batches like vLLM: the timing model behind ``batchgate sim``.

No I/O and no aiohttp here; :mod:`proxy.sim.server` puts the OpenAI-compatible HTTP surface on top.

The model: one batching loop runs *steps*. In each step every running request gets exactly one
token, and the step lasts ``step_ms(n_running) * time_scale`` milliseconds, where ``step_ms``
interpolates the measured per-token times of a real engine (the ``seed`` profile: the
DataCrunch batching table, total time / 100 tokens). At most ``max_batch`` requests run; the
rest wait in a FIFO queue and join at the next step boundary after a slot frees up (continuous
batching, not static batches). A request's prompt costs ``prompt_ms_per_token`` per token,
added to the first step it runs in, for the whole batch, as a prefill scheduled alongside
decoding would; its first token comes at the end of that step.

Guarantees:

* never more than ``max_batch`` requests run; waiters join in arrival order;
* with a KV-cache budget (``kv_tokens`` > 0), the running requests never hold more than it:
  each holds its prompt plus the tokens generated so far; a waiter is admitted only when its
  prompt (and first token) fits beside the batch's next step; a step that would go past the
  budget first preempts the most recently admitted request (as vLLM does, by recompute: it goes
  back to the head of the queue and prefills its prompt and its tokens so far again when it is
  readmitted), counted in ``preemptions``;
* steps are timed against absolute deadlines, so timer overshoot does not add up over a
  generation; after a stall longer than a step the schedule restarts from now instead of
  bursting to catch up;
* a consumer that leaves (``aclose``, cancellation, an exception in its ``async for`` body
  under ``contextlib.aclosing``) frees its slot at once: the next step runs without it;
* ``total_started == total_finished + total_aborted + running + waiting`` at all times;
* one loop task for the whole engine; a step costs O(running), never O(waiting).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from itertools import pairwise
from typing import Protocol

from proxy.config import SimulatedConfig

logger = logging.getLogger(__name__)


#: (batch size, ms per decode step). The seed table's total time for 100 tokens / 100.
SEED_STEP_MS: tuple[tuple[int, float], ...] = (
    (1, 17.76),
    (2, 19.81),
    (4, 20.67),
    (8, 37.67),
    (16, 44.31),
    (32, 49.42),
)
PROFILES: dict[str, tuple[tuple[int, float], ...]] = {"seed": SEED_STEP_MS}


def step_ms(n_running: int, points: Sequence[tuple[int, float]] = SEED_STEP_MS) -> float:
    """Duration of one decode step with ``n_running`` requests in the batch, in ms.

    Linear between the profile's points, flat below the first, and extrapolated past the last
    along the line through the last two (a real engine keeps slowing as the batch grows).
    """
    if n_running < 1:
        raise ValueError(f"n_running must be at least 1. Got {n_running}.")
    first_n, first_ms = points[0]
    if n_running <= first_n:
        return first_ms
    for (n0, ms0), (n1, ms1) in pairwise(points):
        if n_running <= n1:
            return ms0 + (ms1 - ms0) * (n_running - n0) / (n1 - n0)
    (n0, ms0), (n1, ms1) = points[-2], points[-1]
    return ms1 + (ms1 - ms0) * (n_running - n1) / (n1 - n0)


def next_deadline(previous: float | None, now: float, duration: float) -> float:
    """When the step that starts now should end.

    Steps chain on the previous deadline, not on ``now``, so a timer that fires late shortens
    the next step instead of delaying every later one. ``previous`` is None after idling; a
    loop more than a whole step late restarts from ``now`` rather than running short steps
    back to back (a real GPU does not speed up after a hiccup).
    """
    if previous is None or now - previous > duration:
        return now + duration
    return previous + duration


class Clock(Protocol):
    """The engine's time source; tests inject one they advance by hand."""

    def time(self) -> float: ...

    async def sleep_until(self, deadline: float) -> None: ...


class LoopClock:
    """The running event loop's monotonic clock, sleeping to an absolute ``call_at`` time."""

    def time(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep_until(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        handle = loop.call_at(deadline, _resolve, woken)
        try:
            await woken
        finally:
            handle.cancel()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class EngineClosed(RuntimeError):
    """The engine was closed (or its loop died) before this generation finished."""


class _State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"  # every token produced; the consumer may still be reading them
    ABORTED = "aborted"  # the consumer left early
    FAILED = "failed"  # the engine closed under it


class _Request:
    __slots__ = ("admitted", "max_tokens", "produced", "prompt_tokens", "state", "waiter")

    def __init__(self, prompt_tokens: int, max_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.produced = 0
        self.admitted = False  # once admitted, a readmission (after preemption) recomputes
        self.state = _State.WAITING
        #: Set while the consumer has read every produced token and waits for the next one.
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _validate(config: SimulatedConfig) -> None:
    if config.max_batch < 1:
        raise ValueError(f"sim.max_batch must be at least 1. Got {config.max_batch}.")
    if config.profile not in PROFILES:
        raise ValueError(f"sim.profile must be one of {sorted(PROFILES)}. Got {config.profile!r}.")
    if not config.time_scale >= 0:  # also rejects NaN
        raise ValueError(f"sim.time_scale must be >= 0. Got {config.time_scale}.")
    if not config.prompt_ms_per_token >= 0:
        raise ValueError(f"sim.prompt_ms_per_token must be >= 0. Got {config.prompt_ms_per_token}.")
    if config.default_max_tokens < 1:
        raise ValueError(
            f"sim.default_max_tokens must be at least 1. Got {config.default_max_tokens}."
        )
    if config.kv_tokens < 0:
        raise ValueError(f"sim.kv_tokens must be >= 0. Got {config.kv_tokens}.")


class TooLarge(ValueError):
    """A request that could never fit the KV-cache budget, even alone (vLLM refuses those too:
    a prompt plus ``max_tokens`` past the context the cache can hold)."""


class SimEngine:
    """The simulated engine: a FIFO queue, a batch of at most ``max_batch``, one step loop.

    Use ``async for index in engine.generate(prompt_tokens, max_tokens)``; it yields token
    indices 0..max_tokens-1 as the steps produce them. Generation does not wait for a slow
    consumer (a GPU does not either); produced tokens are counted and handed over when asked.
    Wrap the generator in ``contextlib.aclosing`` (or consume it fully) so leaving the loop
    early releases the slot at once rather than when the generator is garbage collected.

    The loop task starts with :meth:`start` or lazily on the first ``generate``; :meth:`aclose`
    stops it and makes every unfinished generation raise :class:`EngineClosed`.

    Counters (for metrics and tests): ``total_started`` counts requests queued, then each
    ends as ``total_finished`` (all tokens produced) or ``total_aborted`` (its consumer left,
    or the engine closed under it); ``peak_running`` is the largest batch ever run;
    ``preemptions`` counts running requests sent back to the queue for lack of KV room, and
    ``kv_used`` is the tokens the running requests hold now (0 and never checked when
    ``kv_tokens`` is 0: unlimited).
    """

    def __init__(self, config: SimulatedConfig, *, clock: Clock | None = None) -> None:
        _validate(config)
        self.config = config
        self._points = PROFILES[config.profile]
        self._clock: Clock = clock if clock is not None else LoopClock()
        self._running: dict[_Request, None] = {}  # insertion-ordered set, O(1) removal
        # Requests that leave while queued stay in the deque, marked ABORTED, and are skipped
        # on admission: removal from the middle of a deque would be O(waiting).
        self._queue: deque[_Request] = deque()
        self._waiting = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.total_started = 0
        self.total_finished = 0
        self.total_aborted = 0
        self.total_prompt_tokens = 0
        self.total_generated_tokens = 0
        self.total_steps = 0
        self.peak_running = 0
        self.preemptions = 0
        self.kv_used = 0

    @property
    def kv_usage(self) -> float:
        """The fraction of the KV-cache budget in use (0..1); 0 when unlimited."""
        budget = self.config.kv_tokens
        return self.kv_used / budget if budget else 0.0

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether a request could ever run: alone, its prompt and completion fit the budget."""
        budget = self.config.kv_tokens
        return not budget or prompt_tokens + max_tokens <= budget

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return self._waiting

    def __repr__(self) -> str:
        state = "closed" if self._closed else "started" if self._task is not None else "idle"
        return (
            f"<SimEngine {state} running={self.running} waiting={self.waiting}"
            f" max_batch={self.config.max_batch} started={self.total_started}"
            f" finished={self.total_finished} aborted={self.total_aborted}"
            f" tokens={self.total_generated_tokens}>"
        )

    def start(self) -> None:
        """Start the batching loop on the running event loop (idempotent)."""
        if self._closed:
            raise EngineClosed("the sim engine is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")
            self._task.add_done_callback(_log_crash)

    async def aclose(self) -> None:
        """Stop the loop; unfinished generations raise :class:`EngineClosed`. Idempotent."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        # The loop's own finally does this, unless it was cancelled before it first ran.
        self._fail_all()

    async def generate(self, prompt_tokens: int, max_tokens: int) -> AsyncGenerator[int, None]:
        """Queue a request and yield the index of each token as its step completes.

        The request enters the queue on the first ``__anext__``; leaving by any path before
        the last token frees its slot in ``finally``.
        """
        if prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be >= 0. Got {prompt_tokens}.")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1. Got {max_tokens}.")
        if not self.fits(prompt_tokens, max_tokens):
            # Queued, it would wait forever (or be preempted forever): refused, as vLLM does.
            raise TooLarge(
                f"prompt_tokens + max_tokens = {prompt_tokens + max_tokens} exceeds the KV-cache"
                f" budget of {self.config.kv_tokens} tokens"
            )
        self.start()
        request = self._submit(prompt_tokens, max_tokens)
        try:
            sent = 0
            while True:
                while sent < request.produced:
                    yield sent
                    sent += 1
                if sent == max_tokens:
                    return
                if request.state is _State.FAILED:
                    raise EngineClosed("the sim engine closed during generation")
                request.waiter = asyncio.get_running_loop().create_future()
                await request.waiter
        finally:
            self._release(request)

    def _submit(self, prompt_tokens: int, max_tokens: int) -> _Request:
        request = _Request(prompt_tokens, max_tokens)
        # Always through the queue, even when the batch has room: requests join at step
        # boundaries, never halfway through a step.
        self._queue.append(request)
        self._waiting += 1
        self.total_started += 1
        self._wakeup.set()
        return request

    def _release(self, request: _Request) -> None:
        if request.state is _State.RUNNING:
            del self._running[request]
            self.kv_used -= request.prompt_tokens + request.produced
        elif request.state is _State.WAITING:
            self._waiting -= 1
        else:
            return  # finished or failed: already accounted for
        request.state = _State.ABORTED
        self.total_aborted += 1
        request.waiter = None

    def _admit(self) -> int:
        """Move waiters into free batch slots; return the tokens to prefill.

        With a KV budget, the head of the queue joins only if its prompt (and its tokens so far,
        after a preemption) fits beside the batch's next tokens and its own first one; if not,
        nobody behind it jumps ahead (first come, first served, as vLLM's default).
        """
        prefill = 0
        budget = self.config.kv_tokens
        while self._waiting and len(self._running) < self.config.max_batch:
            request = self._queue.popleft()
            if request.state is not _State.WAITING:
                continue  # left while queued
            held = request.prompt_tokens + request.produced
            if budget and self.kv_used + len(self._running) + held + 1 > budget:
                self._queue.appendleft(request)
                break
            self._waiting -= 1
            request.state = _State.RUNNING
            self._running[request] = None
            self.kv_used += held
            prefill += held
            if not request.admitted:
                request.admitted = True
                self.total_prompt_tokens += request.prompt_tokens
        if not self._waiting:
            self._queue.clear()  # only aborted leftovers remain
        self.peak_running = max(self.peak_running, len(self._running))
        return prefill

    def _preempt(self) -> None:
        """Before a step: while its tokens would take the batch past the KV budget, send the
        most recently admitted request back to the head of the queue (a lone request always
        fits: :meth:`fits`)."""
        budget = self.config.kv_tokens
        running = self._running
        while budget and self.kv_used + len(running) > budget and len(running) > 1:
            newest = next(reversed(running))
            del running[newest]
            self.kv_used -= newest.prompt_tokens + newest.produced
            newest.state = _State.WAITING
            self._queue.appendleft(newest)
            self._waiting += 1
            self.preemptions += 1

    def _produce(self) -> None:
        """End of a step: one token for each running request; retire the finished ones."""
        finished: list[_Request] = []
        for request in self._running:
            request.produced += 1
            if request.produced == request.max_tokens:
                finished.append(request)
            request.wake()
        self.total_generated_tokens += len(self._running)
        self.kv_used += len(self._running)
        self.total_steps += 1
        for request in finished:
            del self._running[request]
            self.kv_used -= request.prompt_tokens + request.produced
            request.state = _State.FINISHED
        self.total_finished += len(finished)

    def _fail_all(self) -> None:
        failed = list(self._running)
        failed += (r for r in self._queue if r.state is _State.WAITING)
        self._running.clear()
        self._queue.clear()
        self._waiting = 0
        self.kv_used = 0
        for request in failed:
            request.state = _State.FAILED
            request.wake()
        self.total_aborted += len(failed)

    async def _run(self) -> None:
        scale_s = self.config.time_scale / 1000.0
        prompt_ms = self.config.prompt_ms_per_token
        deadline: float | None = None
        try:
            while True:
                if not self._running and not self._waiting:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    deadline = None  # idle time is not lateness
                prefill_tokens = self._admit()
                if not self._running:
                    continue
                if self.config.kv_tokens:
                    # Never undoes this admission (it left room for the next tokens): only
                    # growth of the batch already running can need it, and then nobody joined.
                    self._preempt()
                duration = step_ms(len(self._running), self._points) + prefill_tokens * prompt_ms
                deadline = next_deadline(deadline, self._clock.time(), duration * scale_s)
                await self._clock.sleep_until(deadline)
                self._produce()
        finally:
            # Closed or crashed: nobody may be left waiting for a token that will never come.
            self._closed = True
            self._fail_all()


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error("sim engine loop crashed", exc_info=exc)
