"""Draining: which requests are still being served, the drain's phases, and the cut at its end.

A drain starts once, on SIGTERM or ``GET /wait-for-drain`` (whichever comes first; the other
joins it), and is timed from that start. Its phases, in order:

1. ``draining``: readiness fails at once, but new requests are still **served** for
   ``server.drain_quiet_s`` (the quiet period), while endpoints, kube-proxy and ingresses stop
   routing to the pod; every answer whose head goes out from now on says
   ``Connection: close`` and its connection is closed after it, so a keep-alive caller's next
   request opens a connection the Service no longer routes here.
2. ``refusing``: the quiet period is over: new requests get ``503 draining``; what was
   accepted (in flight, queued) is served to the end.
3. ``settled``: nothing is being served (after the quiet period: a request of the quiet period
   is as much work as any other), or ``server.drain_timeout_s`` has passed since the start and
   what remained was cut (``cutting``). ``GET /wait-for-drain`` answers here.
4. ``finished``: the cut handlers had their grace to write their last words; the process may
   stop.

Time is read from an injected clock and slept on an injected sleep (tests drive both by hand).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger("batchgate")

#: After cutting what the drain deadline left, how long handlers get to send their last words.
CUT_GRACE_S = 2.0


async def first_of(*waits: Coroutine[Any, Any, object]) -> None:
    """Wait until the first of ``waits`` is done; the others are cancelled and awaited (also
    when this wait itself is cancelled), so none is left running."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Lifecycle:
    """Tracks the tasks serving proxied requests, and runs the drain over them.

    ``draining``: readiness fails; answers close their connections. ``refusing``: new
    requests get 503. ``cutting``: the drain deadline passed; handlers being cancelled should
    tell their caller (an SSE error event, or a 503 if nothing was sent yet) rather than
    vanish. Each flag only ever goes from False to True.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        describe: Callable[[], str] = lambda: "",
    ) -> None:
        self.draining = False
        self.refusing = False
        self.cutting = False
        #: Requests cut at the deadline (0: the drain ended with nothing left to serve).
        self.cut_count = 0
        self.settled = asyncio.Event()
        self.finished = asyncio.Event()
        self._clock = clock
        self._sleep = sleep
        self._describe = describe  # what is queued and in flight, for the log
        self._active: set[asyncio.Task[object]] = set()
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def active(self) -> int:
        return len(self._active)

    def enter(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task[object]:
        """Start tracking the current task of ``loop`` (the running one); pair with
        :meth:`leave` in a ``finally``.

        Not a context manager: this sits on every request, and a generator-based one costs
        a few microseconds per use. The loop is the caller's: without it, current_task()
        looks up the running loop, a getpid(2) system call on Python 3.11.
        """
        task = asyncio.current_task(loop)
        assert task is not None
        self._active.add(task)
        return task

    def leave(self, task: asyncio.Task[object]) -> None:
        self._active.discard(task)
        if not self._active and self._idle is not None:
            self._idle.set()

    def start_drain(self, quiet_s: float, timeout_s: float, trigger: str) -> bool:
        """Begin the drain (see the module docstring); False if it had begun already, in
        which case nothing changes: its deadline stays counted from the first start.

        ``quiet_s`` is bounded by ``timeout_s``: at the deadline, whatever remains is cut.
        """
        if self._task is not None:
            return False
        quiet_s = min(quiet_s, timeout_s)
        # 0. Readiness fails, and answers close their connections, from now.
        self.draining = True
        if quiet_s <= 0:
            self.refusing = True  # at once, before any request can slip in
        log.info(
            "draining (%s): %s; quiet period %gs, deadline %gs",
            trigger, self._describe() or "nothing being served", quiet_s, timeout_s,
        )
        started = self._clock()
        self._task = asyncio.get_running_loop().create_task(
            self._drain(started + quiet_s, started + timeout_s)
        )
        return True

    async def _drain(self, quiet_until: float, deadline: float) -> None:
        """The drain's checklist, in order; every step runs even if the caller is gone."""
        try:
            # 1. The quiet period: keep serving while the pod is taken out of rotation.
            await self._sleep_until(quiet_until)
            # 2. Refuse new work (503 + Retry-After); serve what was accepted, streams to
            #    their end, until the deadline counted from the drain's start.
            self.refusing = True
            if self._active:
                log.info("quiet period over: refusing new requests; %s",
                         self._describe() or "serving what was accepted")
            if await self._idle_until(deadline):
                log.info("drained")
                self.settled.set()
                return
            # 3. The deadline passed: cut what is left. Queued requests get 503; streams get
            #    a final SSE error event; each handler's finally releases its slot and closes
            #    its upstream connection.
            self.cut_count = self.cut()
            log.warning("drain deadline passed: cutting %d requests", self.cut_count)
            self.settled.set()
            # 4. Give the cut handlers a moment to write their last words.
            await self._idle_until(self._clock() + CUT_GRACE_S)
        finally:
            # Also when cancelled (the app stops first): nobody waits for a drain forever.
            self.refusing = True
            self.settled.set()
            self.finished.set()

    async def _sleep_until(self, when: float) -> None:
        delay = when - self._clock()
        if delay > 0:
            await self._sleep(delay)

    async def _idle_until(self, when: float) -> bool:
        """Wait until no request is being served; False if the clock reached ``when`` first.

        A loop, not one wait: a request refused with 503 enters and leaves the set too, and
        may do so between the idle event and this task's turn.
        """
        while self._active:
            if when - self._clock() <= 0:
                return False
            await first_of(self._idle_event().wait(), self._sleep_until(when))
        return True

    def _idle_event(self) -> asyncio.Event:
        # Shared by every waiter; a set one is stale (it woke its waiters already).
        if self._idle is None or self._idle.is_set():
            self._idle = asyncio.Event()
        return self._idle

    async def wait_idle(self, within_s: float) -> bool:
        """Wait (real time) until no request is being served; False if ``within_s`` passed."""
        if not self._active:
            return True
        try:
            await asyncio.wait_for(self._idle_event().wait(), within_s)
        except TimeoutError:
            return False
        return True

    def cut(self) -> int:
        """Cancel every request still being served; returns how many."""
        self.cutting = True
        tasks = list(self._active)
        for task in tasks:
            task.cancel()
        return len(tasks)

    async def close(self) -> None:
        """Stop a drain still running (the app is going away); its waiters get their answer."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
