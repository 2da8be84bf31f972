"""Observers only read the Exchange; outcomes keep the access-log values README documents."""

from __future__ import annotations

import time
from typing import Any

import pytest

from proxy.observe.accesslog import FIELDS, entry
from proxy.observe.exchange import Exchange, Outcome, outcome_text
from proxy.observe.metrics import Metrics


class ReadOnly:
    """Lets an observer read an exchange and fails the test on any write."""

    def __init__(self, exchange: Exchange) -> None:
        object.__setattr__(self, "_exchange", exchange)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_exchange"), name)

    def __setattr__(self, name: str, value: object) -> None:
        raise AssertionError(f"an observer wrote exchange.{name}")


def finished(outcome: Outcome, detail: str | None = None) -> Exchange:
    now = time.monotonic()
    ex = Exchange(request_id="rid", method="POST", path="/v1/completions",
                  route="/v1/completions", arrival=0.0, started=now - 1, replica="r",
                  status=200, enqueued_at=now - 1, dispatched_at=now - 0.5,
                  first_byte_at=now - 0.4, last_byte_at=now, stage="done",
                  prompt_tokens=3, completion_tokens=5)
    ex.end(outcome, detail)
    return ex


@pytest.mark.parametrize(
    ("outcome", "detail", "text"),
    [
        (Outcome.OK, None, "ok"),
        (Outcome.REJECTED, "queue_full", "rejected:queue_full"),
        (Outcome.CLIENT_DISCONNECT, None, "client_disconnect"),
        (Outcome.UPSTREAM_ERROR, "timeout", "upstream_error:timeout"),
        (Outcome.DRAIN_CUT, None, "drain_cut"),
        (Outcome.INTERNAL_ERROR, None, "error:internal"),
    ],
)
def test_observers_only_read_and_outcomes_keep_their_log_values(
    outcome: Outcome, detail: str | None, text: str
) -> None:
    assert outcome_text(outcome, detail) == text
    ex = finished(outcome, detail)
    metrics = Metrics()
    metrics.record(ReadOnly(ex))  # type: ignore[arg-type]
    line = dict(zip(FIELDS, entry(ReadOnly(ex)), strict=True))  # type: ignore[arg-type]
    assert line["outcome"] == text
    value = metrics.registry.get_sample_value
    if outcome is Outcome.REJECTED:
        assert value("batchgate_rejected_requests_total", {"reason": "queue_full"}) == 1
    assert value("batchgate_tokens_total", {"replica": "r", "kind": "prompt"}) == 3
    completed = value("batchgate_request_duration_seconds_count", {"route": "/v1/completions"}) or 0
    assert completed == (1 if outcome is Outcome.OK else 0)
