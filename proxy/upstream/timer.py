"""The read timer of one upstream connection: "504 if the replica went silent".

One owner per connection: :meth:`ReadTimer.start` replaces any handle left from before, so
no orphan can judge a later request by an earlier start time. Activity is recorded by
writing :attr:`ReadTimer.last` (a byte received, the upload taken by the replica, the
reader resuming): no timer call per read. The handle is re-armed only when it fires.

Nor a timer call per request: :meth:`stop` only ends the measuring, and :meth:`start` keeps a
handle still pending from an earlier request when it is due no later than the new request's
deadline (it fires early, finds ``last`` moved past the time it was armed from, and re-arms
itself from ``last``), as the edge's keep-alive timer does. Creating and cancelling a loop
timer was ~1.5 us per request on uvloop; a pending handle of an idle connection just expires.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def _never_silent() -> None:
    return None


def _never_paused() -> bool:
    return False


class ReadTimer:
    """Calls ``on_silent`` once the replica was silent for ``period`` seconds.

    Silence is measured for the current request only (from :meth:`start`); while
    ``is_paused()`` (our reader is not taking the bytes) it is the caller's silence, not the
    replica's, and the timer looks again one period later.
    """

    __slots__ = ("_active", "_armed_from", "_due", "_handle", "_is_paused", "_loop",
                 "_on_silent", "last", "period")

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
        self._due = 0.0  # loop time the handle fires at
        self._active = False  # measuring silence for a request (between start and stop)
        self.last = 0.0  # loop time of the last sign of life of the replica
        self._armed_from = 0.0  # value of ``last`` the handle's due time was counted from

    def __repr__(self) -> str:
        return f"<ReadTimer armed={self.armed} last={self.last:.3f}>"

    @property
    def armed(self) -> bool:
        """Measuring silence for a request (a handle left pending by a stopped one is not)."""
        return self._active

    def start(self) -> None:
        """Begin measuring silence for a new request (the one owner of the connection's handle)."""
        now = self._loop.time()
        self.last = now
        self._active = True
        if self._handle is not None and self._due <= now + self.period:
            # Due no later than this request's deadline: its firing sees ``last`` (now) past
            # ``_armed_from`` and re-arms from ``last``, so silence counts from this start.
            return
        if self._handle is not None:
            self._handle.cancel()  # due too late (a longer period before): never an orphan
        self._armed_from = now
        self._arm(now + self.period)

    def stop(self) -> None:
        """Stop measuring; a pending handle stays, to serve the next start or to expire."""
        self._active = False

    def close(self) -> None:
        """For good (the connection is gone): the handle is cancelled, nothing refers to us."""
        self._active = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        # They are the connection's bound methods: kept, they would keep it in a cycle.
        self._on_silent = _never_silent
        self._is_paused = _never_paused

    def _arm(self, due: float) -> None:
        self._due = due
        self._handle = self._loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if not self._active:
            return  # between requests: the next start arms afresh
        if self._is_paused():
            # Re-armed from now: from the last byte it would fire at once, again and again.
            self._arm(self._loop.time() + self.period)
            return
        if self.last > self._armed_from:
            self._armed_from = self.last
            self._arm(self.last + self.period)
            return
        self._on_silent()
