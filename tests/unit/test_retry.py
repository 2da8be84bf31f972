"""The resend rule of proxy.core.retry, case by case (no I/O), and the one failure taxonomy."""

from __future__ import annotations

import pytest

from proxy.core.errors import ProxyError, UpstreamError, UpstreamTimeout
from proxy.core.retry import Decision, classify, is_idempotent


@pytest.mark.parametrize(
    ("failure", "idempotent", "decision"),
    [
        # Connect failed: nothing reached it, and it is not listening.
        (UpstreamError("refused", kind="connect", unsent=True), False,
         Decision.MARK_DOWN_AND_RESEND),
        # Not one byte written (e.g. the write failed at once): safe for any method.
        (UpstreamError("unsent", kind="reset", unsent=True), False, Decision.RESEND),
        # Bytes written, then the connection died: only an idempotent request goes again.
        (UpstreamError("lost", kind="reset"), False, Decision.FAIL),
        (UpstreamError("lost", kind="reset"), True, Decision.RESEND),
        # The replica may still be working, or answered garbage: never resent.
        (UpstreamTimeout("silent"), True, Decision.FAIL),
        (UpstreamError("bad", kind="malformed"), True, Decision.FAIL),
    ],
)
def test_classify(failure: UpstreamError, idempotent: bool, decision: Decision) -> None:
    assert classify(failure, idempotent=idempotent) is decision


def test_idempotent_requests() -> None:
    for method in ("GET", "HEAD", "OPTIONS"):
        assert is_idempotent(method, {})
    assert not is_idempotent("POST", {})
    assert is_idempotent("POST", {"Idempotency-Key": "k"})


def test_one_taxonomy_with_kind_status_and_code() -> None:
    timeout = UpstreamTimeout("silent", replica="r")
    assert isinstance(timeout, UpstreamError) and isinstance(timeout, ProxyError)
    assert (timeout.status, timeout.kind, timeout.code, timeout.unsent) == (
        504, "timeout", "upstream_timeout", False)
    reset = UpstreamError("lost", kind="reset", replica="r")
    assert (reset.status, reset.code, reset.replica) == (502, "upstream_reset", "r")

