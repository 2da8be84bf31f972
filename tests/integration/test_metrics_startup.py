"""Counters exist from the start: every known label set is exported at 0 by a fresh proxy.

Without this, the first event of a kind creates its series, `increase()` over a window that
starts with it reads 0, and an alert misses the first crash.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.core import errors
from proxy.observe.metrics import (
    DISCONNECT_STAGES,
    REJECTION_REASONS,
    UPSTREAM_ERROR_KINDS,
)
from tests.integration.conftest import FakeReplica, Proxy, make_config

Factory = Callable[..., Any]


def _named_reasons() -> set[str]:
    found: set[str] = set()
    todo = [errors.ProxyError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.reason is not None:
            found.add(cls.reason)
    return found


def test_every_named_rejection_is_a_known_reason() -> None:
    """A new ProxyError with a reason must be added to REJECTION_REASONS (and so exported)."""
    assert _named_reasons() <= set(REJECTION_REASONS)
    assert {"queue_full", "queue_timeout", "no_healthy_replica", "draining", "overloaded",
            "body_too_large", "bad_request"} <= set(REJECTION_REASONS)


async def test_fresh_proxy_exports_every_known_counter_at_zero(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    p: Proxy = await proxy(make_config(("a", a.url, 1), ("b", b.url, 2)))
    async with client.get(p.url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    expected = (
        [("batchgate_rejected_requests_total", {"reason": r}) for r in REJECTION_REASONS]
        + [("batchgate_client_disconnects_total", {"stage": s}) for s in DISCONNECT_STAGES]
        + [
            ("batchgate_upstream_errors_total", {"replica": replica, "kind": kind})
            for replica in ("a", "b")
            for kind in UPSTREAM_ERROR_KINDS
        ]
        + [("batchgate_upstream_retries_total", {"replica": r}) for r in ("a", "b")]
    )
    missing = [(name, labels) for name, labels in expected if value(name, **labels) != 0.0]
    assert missing == []
    assert {"connect", "timeout", "reset", "status_5xx"} <= set(UPSTREAM_ERROR_KINDS)
    assert set(DISCONNECT_STAGES) == {"queued", "waiting_first_byte", "streaming"}
