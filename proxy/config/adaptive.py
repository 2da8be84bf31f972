"""``replicas[].adaptive`` (and ``discovery[].adaptive``): the cap moves with the engine's load.

Off unless the key holds a mapping: ``adaptive: {}`` is on with the defaults below (the
issue's example); ``adaptive: null``, as ``check-config`` prints an unset one, is off. The
replica's ``max_concurrency`` is then the starting cap and must lie within ``[min, max]``: a
start outside the range is refused rather than clamped, so the number an operator wrote is
never quietly changed. The loop that moves the cap is :mod:`proxy.control.adaptive`; the rule
is :mod:`proxy.core.adaptive`.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config.rules import _POSITIVE, _bad, _field, _integer, _section


@dataclass(frozen=True, slots=True)
class AdaptiveConfig:
    """The range the cap moves in, and how often the engine's ``/metrics`` is read."""

    min: int = _field(4, _integer(1))
    max: int = _field(128, _integer(1))
    interval_s: float = _field(1.0, _POSITIVE)


_ADAPTIVE_SECTION = _section(AdaptiveConfig)


def _adaptive(value: object, path: str) -> AdaptiveConfig | None:
    if value is None:
        return None
    config = _ADAPTIVE_SECTION(value, path)
    if config.max < config.min:
        raise _bad(f"{path}.max", f"must be >= adaptive.min ({config.min})", config.max)
    return config


def check_start(max_concurrency: int, adaptive: AdaptiveConfig | None, path: str) -> None:
    """``max_concurrency`` is the starting cap of an adaptive replica: within its range.

    ``path``: the entry's (``replicas[0]``), for the message.
    """
    if adaptive is not None and not adaptive.min <= max_concurrency <= adaptive.max:
        raise _bad(f"{path}.max_concurrency",
                   f"must be between adaptive.min and adaptive.max ({adaptive.min} to "
                   f"{adaptive.max}): it is the starting cap", max_concurrency)
