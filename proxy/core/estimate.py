"""How long until a waiter would be served: the estimate behind ``Retry-After``.

The `openai` SDK and LiteLLM obey ``Retry-After`` exactly, so the value shapes the load that
comes back. Two rules follow. It must come from the capacity (a cold proxy that says 60 s
stalls every caller for a minute), and callers told at the same moment must not all come back
at the same second: the estimate is rounded up or down at random, in proportion to its
fraction, so the mean stays the estimate and the retries spread over two seconds instead of
arriving as one wave.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

#: How far back service times count.
WINDOW_S = 60.0
#: The window in buckets: O(1) per completion and bounded memory however busy the proxy is.
BUCKETS = 12
RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 60


class ServiceTimes:
    """Mean time a slot is held, over the last :data:`WINDOW_S` (bucketed, clock given)."""

    __slots__ = ("_count", "_old", "_slot", "_sum", "_width")

    def __init__(self, window_s: float = WINDOW_S, buckets: int = BUCKETS) -> None:
        self._width = window_s / buckets
        self._old: deque[tuple[int, float, int]] = deque(maxlen=buckets)
        self._slot = -1
        self._sum = 0.0
        self._count = 0

    def record(self, now: float, duration: float) -> None:
        slot = int(now // self._width)
        if slot != self._slot:
            if self._count:
                self._old.append((self._slot, self._sum, self._count))
            self._slot = slot
            self._sum = 0.0
            self._count = 0
        self._sum += duration
        self._count += 1

    def mean(self, now: float) -> float | None:
        """The mean over the window ending at ``now``; None with no measurement in it."""
        oldest = int(now // self._width) - self._old.maxlen  # type: ignore[operator]
        total, count = 0.0, 0
        for slot, bucket_sum, bucket_count in self._old:
            if slot > oldest:
                total += bucket_sum
                count += bucket_count
        if self._slot > oldest:
            total += self._sum
            count += self._count
        return total / count if count else None

    def __len__(self) -> int:
        """Buckets held (bounded by the window)."""
        return len(self._old) + 1


def retry_after_s(
    position: int, slots: int, mean_service_s: float | None, rng: Callable[[], float]
) -> int:
    """Seconds until the caller at ``position`` would be served, as an integer for the header.

    ``slots`` serve one request each per ``mean_service_s``, so the line moves at
    ``slots / mean_service_s`` per second. No history: 1 s (we cannot know; a short wait costs
    a caller one more try, a long one stalls it). Rounded at random, clamped to 1..60.
    """
    if mean_service_s is None:
        return RETRY_AFTER_MIN_S
    estimate = position * mean_service_s / max(slots, 1)
    if estimate >= RETRY_AFTER_MAX_S:
        return RETRY_AFTER_MAX_S
    whole = math.floor(estimate)
    seconds = whole + (1 if rng() < estimate - whole else 0)
    return max(RETRY_AFTER_MIN_S, min(RETRY_AFTER_MAX_S, seconds))


def start_in_s(position: int, slots: int, mean_service_s: float | None) -> float | None:
    """Seconds until the waiter at ``position`` can start, at the earliest the measured rate
    allows: the ``position - 1`` ahead of it served by ``slots`` at ``mean_service_s`` each.

    The basis of early refusal, so it errs short: the head (nothing ahead) is 0, whatever the
    requests in flight have left, and it never counts a slot's remaining time. None: no
    history or no usable slot, the rate is unknown, and nobody may be refused on a guess.
    """
    if mean_service_s is None or slots <= 0:
        return None
    return (position - 1) * mean_service_s / slots
