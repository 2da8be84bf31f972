"""The request path's metric updates (proxy.observe.metrics ``_fast_inc``, ``_fast_observe``)
export exactly what prometheus_client's own ``inc`` and ``observe`` would."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from proxy.observe.metrics import (
    DURATION_BUCKETS,
    QUEUE_WAIT_BUCKETS,
    Metrics,
    _Children,
    _fast_inc,
    _fast_observe,
)


def _exposition(registry: CollectorRegistry) -> list[str]:
    # _created is the wall clock at creation: the only line two registries may differ on.
    return [line for line in generate_latest(registry).decode().splitlines()
            if "_created" not in line]


#: Exactly on a bound, between bounds, below the first, above the last, zero, NaN, +inf.
AMOUNTS = [0.0, 0.001, 0.0011, 0.004, 0.01, 0.3, 1.0, 2.5, 7.0, 299.99, 300.0, 301.0, 5000.0,
           math.nan, math.inf, 0.00001]


@pytest.mark.parametrize("buckets", [QUEUE_WAIT_BUCKETS, DURATION_BUCKETS, (1.0,)])
def test_a_fast_observe_exports_what_observe_does(buckets: tuple[float, ...]) -> None:
    slow_registry, fast_registry = CollectorRegistry(), CollectorRegistry()
    slow = Histogram("h", "h", ["route"], buckets=buckets, registry=slow_registry)
    fast = Histogram("h", "h", ["route"], buckets=buckets, registry=fast_registry)
    observe = _fast_observe(fast.labels("a"))
    assert observe != fast.labels("a").observe  # the fast path is taken, not the fallback
    for amount in AMOUNTS:
        slow.labels("a").observe(amount)
        observe(amount)
    assert _exposition(fast_registry) == _exposition(slow_registry)


def test_a_fast_inc_exports_what_inc_does_and_refuses_a_negative_amount() -> None:
    slow_registry, fast_registry = CollectorRegistry(), CollectorRegistry()
    slow = Counter("c", "c", ["replica"], registry=slow_registry)
    fast = Counter("c", "c", ["replica"], registry=fast_registry)
    inc = _fast_inc(fast.labels("r"))
    for amount in (1, 1, 7, 0, 2.5):
        slow.labels("r").inc(amount)
        inc(amount)
    inc()
    slow.labels("r").inc()
    with pytest.raises(ValueError, match="non-negative"):
        inc(-1)
    assert _exposition(fast_registry) == _exposition(slow_registry)


def test_a_value_class_other_than_the_plain_one_falls_back_to_the_public_methods() -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "c", registry=registry)
    histogram = Histogram("h", "h", registry=registry)
    counter._value = object()  # type: ignore[assignment]  # e.g. multiprocess mode's values
    histogram._sum = object()  # type: ignore[assignment]
    assert _fast_inc(counter) == counter.inc
    assert _fast_observe(histogram) == histogram.observe


def test_children_removed_by_replica_lose_their_fast_updates_too() -> None:
    registry = CollectorRegistry()
    children = _Children(Counter("c", "c", ["replica", "kind"], registry=registry))
    children.fast(("r0", 1), "r0", "x")(1)
    children.fast(("r1", 1), "r1", "x")(2)
    children.remove_first("r0")
    assert registry.get_sample_value("c_total", {"replica": "r0", "kind": "x"}) is None
    # A replica of that name added again starts at 0, through a new child.
    children.fast(("r0", 1), "r0", "x")(1)
    assert registry.get_sample_value("c_total", {"replica": "r0", "kind": "x"}) == 1
    assert registry.get_sample_value("c_total", {"replica": "r1", "kind": "x"}) == 2


def test_answered_counts_by_status_and_tenant_through_the_fast_path() -> None:
    metrics = Metrics()
    metrics.add_replica("r")
    for status, tenant in ((200, None), (200, None), (503, "team-a"), (200, "team-a")):
        metrics.answered("r", "/v1/completions", status, tenant)
    value = metrics.registry.get_sample_value
    labels = {"replica": "r", "route": "/v1/completions"}
    assert value("batchgate_requests_total", {**labels, "code": "200", "tenant": "none"}) == 2
    assert value("batchgate_requests_total", {**labels, "code": "503", "tenant": "team-a"}) == 1
    assert value("batchgate_requests_total", {**labels, "code": "200", "tenant": "team-a"}) == 1
    assert value("batchgate_upstream_errors_total", {"replica": "r", "kind": "status_5xx"}) == 1
    metrics.remove_replica("r")
    assert value("batchgate_requests_total", {**labels, "code": "200", "tenant": "none"}) is None
