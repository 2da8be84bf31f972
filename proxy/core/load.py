"""What a batchgate replica says of its own load, and the freshest reading of each replica.

A sidecar (a batchgate next to one engine) with ``server.load_headers: true`` puts its load
on every answer (``X-Batchgate-In-Flight``, ``X-Batchgate-Max-Concurrency``,
``X-Batchgate-Queue-Depth``) and always answers ``GET /load`` with the same as JSON. A gateway
(a batchgate in front of sidecars) records each reading it gets (:class:`LoadBoard`, fed by
the edge from answers and by :mod:`proxy.control.loadpoll`), and its pick
(:meth:`proxy.core.replicas.ReplicaSet.pick`) prefers the replica with the most room.

No I/O here (the core imports no aiohttp): readings arrive parsed, time is injected.

What always holds: a reading never lets a gateway exceed its own ``max_concurrency`` for a
replica (the pick considers only replicas with a free local slot); a reading older than
``max_age_s`` (``2 x health.interval_s``) is unknown, and with any candidate unknown the pick
is the local least-loaded one, as without readings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from proxy.core.replicas import Replica

IN_FLIGHT_HEADER = "X-Batchgate-In-Flight"
MAX_CONCURRENCY_HEADER = "X-Batchgate-Max-Concurrency"
QUEUE_DEPTH_HEADER = "X-Batchgate-Queue-Depth"


class Reading(NamedTuple):
    """A batchgate's own load: requests in flight on its replicas, the slots of those that
    take work, and the requests waiting in its queue."""

    in_flight: int
    max_concurrency: int
    queue_depth: int

    @property
    def room(self) -> int:
        """Free slots, less what already waits for them (negative: a backlog)."""
        return self.max_concurrency - self.in_flight - self.queue_depth

    def headers(self) -> dict[str, str]:
        return {IN_FLIGHT_HEADER: str(self.in_flight),
                MAX_CONCURRENCY_HEADER: str(self.max_concurrency),
                QUEUE_DEPTH_HEADER: str(self.queue_depth)}

    def json(self) -> dict[str, int]:
        return self._asdict()


def _count(value: object) -> int | None:
    if isinstance(value, str):
        return int(value) if value.isdigit() and len(value) <= 12 else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _reading(in_flight: object, max_concurrency: object, queue_depth: object) -> Reading | None:
    values = (_count(in_flight), _count(max_concurrency), _count(queue_depth))
    if values[0] is None or values[1] is None or values[2] is None:
        return None  # one bad field makes the reading unknown, never half believed
    return Reading(values[0], values[1], values[2])


def parse_headers(headers: Mapping[str, str]) -> Reading | None:
    """The reading on an answer, or None (not a batchgate, load headers off, or malformed)."""
    in_flight = headers.get(IN_FLIGHT_HEADER)
    if in_flight is None:
        return None
    return _reading(in_flight, headers.get(MAX_CONCURRENCY_HEADER),
                    headers.get(QUEUE_DEPTH_HEADER))


def parse_json(data: object) -> Reading | None:
    """The reading in a ``GET /load`` answer, or None."""
    if not isinstance(data, dict):
        return None
    return _reading(data.get("in_flight"), data.get("max_concurrency"), data.get("queue_depth"))


class LoadBoard:
    """The freshest reading of each replica, and the room it leaves.

    A reading is kept with the number of requests this batchgate had in flight on the replica
    when it arrived, so the room is corrected by what was sent (or finished) since: between
    two readings a gateway does not pile every request onto the one that looked emptiest.
    """

    __slots__ = ("_clock", "batchgates", "max_age_s", "on_batchgate", "readings")

    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        #: name -> (room at the reading, our in-flight then, when). Empty: no replica is a
        #: batchgate that reports its load, and the pick is exactly the local one.
        self.readings: dict[str, tuple[int, int, float]] = {}
        #: Replicas known to be batchgates (a reading or a rejection came from them): the
        #: ones whose ``GET /load`` is polled when their answers go quiet. Plain engines are
        #: never asked.
        self.batchgates: set[str] = set()
        #: Called when a replica is first known to be a batchgate (the poller starts then).
        self.on_batchgate: Callable[[], None] | None = None

    def record(self, replica: Replica, reading: Reading) -> None:
        self.readings[replica.name] = (reading.room, replica.in_flight, self._clock())
        if replica.name not in self.batchgates:
            self.seen(replica.name)

    def seen(self, name: str) -> None:
        """The replica is a batchgate (a reading, or an answer marked as its rejection)."""
        if name not in self.batchgates:
            self.batchgates.add(name)
            if self.on_batchgate is not None:
                self.on_batchgate()

    def room(self, replica: Replica) -> int | None:
        """The replica's room now, or None if its reading is missing or too old."""
        entry = self.readings.get(replica.name)
        if entry is None:
            return None
        room, in_flight_then, at = entry
        if self._clock() - at > self.max_age_s:
            return None
        return room - (replica.in_flight - in_flight_then)

    def age(self, name: str) -> float | None:
        """Seconds since the replica's last reading (None: never had one)."""
        entry = self.readings.get(name)
        return None if entry is None else self._clock() - entry[2]

    def forget(self, name: str) -> None:
        self.readings.pop(name, None)
        self.batchgates.discard(name)

    def __repr__(self) -> str:
        now = self._clock()
        parts = [f"{name} room={room}{' stale' if now - at > self.max_age_s else ''}"
                 for name, (room, _, at) in self.readings.items()]
        return f"<LoadBoard {', '.join(parts) or 'empty'}>"
