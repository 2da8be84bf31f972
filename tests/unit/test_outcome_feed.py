"""Which finished requests count for or against their replica in outlier ejection."""

from __future__ import annotations

import pytest

from proxy.control.health import request_failed
from proxy.observe.exchange import Exchange, Outcome


def exchange(outcome: Outcome, detail: str | None, status: int | None) -> Exchange:
    e = Exchange(request_id="r", method="POST", path="/v1/completions", route="/v1/completions",
                 arrival=0.0, started=0.0, replica="a", status=status)
    e.end(outcome, detail)
    return e


@pytest.mark.parametrize(("outcome", "detail", "status", "verdict"), [
    (Outcome.OK, None, 200, False),
    (Outcome.OK, None, 404, False),  # the caller's mistake, not the replica's
    (Outcome.OK, None, 500, True),
    (Outcome.OK, None, 503, True),
    (Outcome.UPSTREAM_ERROR, "connect", 502, True),
    (Outcome.UPSTREAM_ERROR, "timeout", 504, True),
    (Outcome.UPSTREAM_ERROR, "reset", 502, True),
    (Outcome.UPSTREAM_ERROR, "malformed", 502, None),
    (Outcome.CLIENT_DISCONNECT, None, None, None),  # hung up before the replica answered
    (Outcome.CLIENT_DISCONNECT, None, 200, False),
    (Outcome.REJECTED, "queue_timeout", 503, None),  # batchgate's own 503
    (Outcome.DRAIN_CUT, None, 200, None),
])
def test_request_failed(outcome: Outcome, detail: str | None, status: int | None,
                        verdict: bool | None) -> None:
    assert request_failed(exchange(outcome, detail, status)) is verdict
