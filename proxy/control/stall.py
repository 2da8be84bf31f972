"""Wedged engines: a replica whose event streams have all gone silent for ``health.stall_s``.

vLLM's ``/health`` can stay 200 while its engine hangs; its streams then produce nothing and
hold their slots until ``upstream.read_timeout_s`` (10 minutes). The relay registers each event
stream it relays (:meth:`StallWatch.enter`/:meth:`StallWatch.leave`, nothing per chunk) and the
health checker asks :meth:`StallWatch.stalled` from time to time.

Progress is judged by whether a stream's ``last_byte_at`` *changed* since the previous look,
timed on the watch's own (injected) clock: the relay's timestamps are never compared with that
clock, so a test can drive it, and a stream is never judged stalled before it has been silent
for ``stall_s`` (at most one look late).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy.core.replicas import Replica
from proxy.observe.exchange import Exchange


class Stream:
    """One event stream being relayed, and the task that relays it (cancelled to cut it)."""

    __slots__ = ("exchange", "progress_at", "replica", "seen", "task")

    def __init__(self, replica: Replica, exchange: Exchange, task: asyncio.Task[object],
                 now: float) -> None:
        self.replica = replica
        self.exchange = exchange
        self.task = task
        self.seen = exchange.last_byte_at
        self.progress_at = now

    def __repr__(self) -> str:
        return f"<Stream {self.exchange.request_id} on {self.replica.name}>"


class StallWatch:
    """The event streams in flight, per replica."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._streams: dict[Replica, dict[Stream, None]] = {}

    def enter(self, replica: Replica, exchange: Exchange) -> Stream:
        """Start watching the current task's stream; pair with :meth:`leave` in a ``finally``."""
        task = asyncio.current_task()
        assert task is not None
        stream = Stream(replica, exchange, task, self._clock())
        self._streams.setdefault(replica, {})[stream] = None
        return stream

    def leave(self, stream: Stream) -> None:
        streams = self._streams.get(stream.replica)
        if streams is not None:
            streams.pop(stream, None)
            if not streams:
                del self._streams[stream.replica]

    def count(self, replica: Replica) -> int:
        return len(self._streams.get(replica, ()))

    def stalled(self, stall_s: float) -> list[tuple[Replica, list[Stream]]]:
        """Replicas holding streams none of which produced a byte for ``stall_s``, with those
        streams. Every stream's progress is noted, whatever the verdict."""
        now = self._clock()
        found = []
        for replica, streams in self._streams.items():
            quiet = True
            for stream in streams:
                mark = stream.exchange.last_byte_at
                if mark != stream.seen:
                    stream.seen = mark
                    stream.progress_at = now
                if now - stream.progress_at < stall_s:
                    quiet = False
            if quiet and streams:
                found.append((replica, list(streams)))
        return found
