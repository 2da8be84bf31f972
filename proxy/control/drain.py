"""Draining: which requests are still being served, and cutting them off at the deadline."""

from __future__ import annotations

import asyncio


class Lifecycle:
    """Tracks the tasks serving proxied requests, so shutdown can wait for them, then cut.

    ``draining``: no new work is taken (readiness fails, new requests get 503).
    ``cutting``: the drain deadline passed; handlers being cancelled should tell their caller
    (an SSE error event, or a 503 if nothing was sent yet) rather than vanish.
    """

    def __init__(self) -> None:
        self.draining = False
        self.cutting = False
        self._active: set[asyncio.Task[object]] = set()
        self._idle: asyncio.Event | None = None

    @property
    def active(self) -> int:
        return len(self._active)

    def enter(self) -> asyncio.Task[object]:
        """Start tracking the current task; pair with :meth:`leave` in a ``finally``.

        Not a context manager: this sits on every request, and a generator-based one costs
        a few microseconds per use.
        """
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        return task

    def leave(self, task: asyncio.Task[object]) -> None:
        self._active.discard(task)
        if not self._active and self._idle is not None:
            self._idle.set()

    def begin_drain(self) -> None:
        self.draining = True

    async def wait_idle(self, within_s: float) -> bool:
        """Wait until no request is being served; False if ``within_s`` passed first."""
        if not self._active:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), within_s)
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
