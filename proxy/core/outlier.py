"""Passive outlier ejection: when real requests say a replica is broken, take it out for a while.

Envoy's outlier detection and HAProxy's ``observe layer7`` in one small policy, decided without
I/O on an injected clock (the caller passes ``now``, monotonic seconds):

* ``eject_after`` consecutive failures of real requests (the caller decides what a failure is:
  a connect error, a timeout, a reset or a 5xx answer) eject the replica;
* the first ejection lasts ``eject_s``, each repeat twice the one before, never more than
  :data:`MAX_EJECT_S` (or ``eject_s`` if that is longer); a replica that has gone
  :data:`CLEAN_S` without a failure since it came back starts again at ``eject_s``;
* never more than ``max_ejected_percent`` of the replicas are ejected at once: with two
  replicas and the default 50 %, one; with one replica, none (ejecting the only replica
  turns its errors into ``no_healthy_replica``, which helps nobody). 0 turns ejection off.

An ejection ends only when the caller lifts it (:meth:`OutlierDetector.lift`): the health
checker does so once the time is up *and* a probe passes.
"""

from __future__ import annotations

import math

#: Longest ejection, however often a replica is ejected again.
MAX_EJECT_S = 300.0
#: A replica this long without a failure since it came back is forgiven its past ejections.
CLEAN_S = 60.0


class _Record:
    __slots__ = ("ejected_until", "ejections", "failures", "quiet_since")

    def __init__(self) -> None:
        self.failures = 0  # consecutive, since the last success or ejection
        self.ejections = 0  # the doubling exponent for the next ejection
        self.quiet_since = -math.inf  # last failure, or when it came back
        self.ejected_until: float | None = None  # monotonic

    def __repr__(self) -> str:
        out = f" out until {self.ejected_until:g}" if self.ejected_until is not None else ""
        return f"<{self.failures} failures, {self.ejections} ejections{out}>"


class OutlierDetector:
    """Consecutive failures per replica (by name) and the ejections they decide.

    Guarantees: a replica is ejected only after ``eject_after`` failures in a row with no
    success between them; the share of replicas ejected at once never exceeds
    ``max_ejected_percent`` of the ``replicas`` count given with each failure; failures seen
    while a replica is ejected (its last requests still in flight) decide nothing.
    """

    def __init__(self, eject_after: int, eject_s: float, max_ejected_percent: int) -> None:
        self._records: dict[str, _Record] = {}
        self.configure(eject_after, eject_s, max_ejected_percent)

    def configure(self, eject_after: int, eject_s: float, max_ejected_percent: int) -> None:
        """New limits (a reload); ejections under way keep their end."""
        if eject_after < 1 or eject_s <= 0 or not 0 <= max_ejected_percent <= 100:
            raise ValueError(
                f"bad outlier limits: eject_after={eject_after}, eject_s={eject_s}, "
                f"max_ejected_percent={max_ejected_percent}"
            )
        self.eject_after = eject_after
        self.eject_s = eject_s
        self.max_ejected_percent = max_ejected_percent
        self._longest = max(MAX_EJECT_S, eject_s)

    @property
    def ejected(self) -> int:
        return sum(r.ejected_until is not None for r in self._records.values())

    def success(self, name: str) -> None:
        record = self._records.get(name)
        if record is not None:
            record.failures = 0

    def failure(self, name: str, now: float, replicas: int) -> float | None:
        """A real request to ``name`` failed. Returns the seconds of ejection decided, or None."""
        record = self._records.get(name)
        if record is None:
            record = self._records[name] = _Record()
        if record.ejected_until is not None:
            return None
        if now - record.quiet_since >= CLEAN_S:
            record.ejections = 0
        record.quiet_since = now
        record.failures += 1
        if record.failures < self.eject_after:
            return None
        if (self.ejected + 1) * 100 > self.max_ejected_percent * replicas:
            # Capped: the failures stay counted, so the next one tries again once another
            # replica is back.
            return None
        duration = min(self.eject_s * 2.0 ** record.ejections, self._longest)
        if duration < self._longest:
            record.ejections += 1
        record.failures = 0
        record.ejected_until = now + duration
        return duration

    def is_over(self, name: str, now: float) -> bool:
        """True if ``name`` is ejected and its time is up (it may come back)."""
        record = self._records.get(name)
        return (record is not None and record.ejected_until is not None
                and now >= record.ejected_until)

    def lift(self, name: str, now: float) -> None:
        """The replica is back: its clean minute starts now."""
        record = self._records.get(name)
        if record is not None:
            record.ejected_until = None
            record.failures = 0
            record.quiet_since = now

    def forget(self, name: str) -> None:
        """The replica is gone (a reload removed it)."""
        self._records.pop(name, None)

    def __repr__(self) -> str:
        return f"<OutlierDetector {self._records!r}>"
