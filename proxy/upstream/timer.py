"""The read timer of one upstream connection: "504 if the replica went silent".

One owner per connection: :meth:`ReadTimer.start` replaces any handle left from before, so
no orphan can judge a later request by an earlier start time. Activity is recorded by
writing :attr:`ReadTimer.last` (a byte received, the upload taken by the replica, the
reader resuming): no timer call per read. The handle is re-armed only when it fires.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class ReadTimer:
    """Calls ``on_silent`` once the replica was silent for ``period`` seconds.

    Silence is measured for the current request only (from :meth:`start`); while
    ``is_paused()`` (our reader is not taking the bytes) it is the caller's silence, not the
    replica's, and the timer looks again one period later.
    """

    __slots__ = ("_armed_from", "_handle", "_is_paused", "_loop", "_on_silent", "last", "period")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        period: float,
        on_silent: Callable[[], None],
        is_paused: Callable[[], bool],
    ) -> None:
        self._loop = loop
        self.period = period
        self._on_silent = on_silent
        self._is_paused = is_paused
        self._handle: asyncio.TimerHandle | None = None
        self.last = 0.0  # loop time of the last sign of life of the replica
        self._armed_from = 0.0  # value of ``last`` when the handle was armed

    def __repr__(self) -> str:
        return f"<ReadTimer armed={self.armed} last={self.last:.3f}>"

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        """Begin measuring silence for a new request (replaces any earlier handle)."""
        if self._handle is not None:
            self._handle.cancel()
        now = self._loop.time()
        self.last = self._armed_from = now
        self._handle = self._loop.call_at(now + self.period, self._fire)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        if self._is_paused():
            # Re-armed from now: from the last byte it would fire at once, again and again.
            self._handle = self._loop.call_at(self._loop.time() + self.period, self._fire)
            return
        if self.last > self._armed_from:
            self._armed_from = self.last
            self._handle = self._loop.call_at(self.last + self.period, self._fire)
            return
        self._on_silent()
