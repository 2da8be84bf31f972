"""Which failed requests may go out again: "a request that may have reached a replica is
never sent twice" (README), decided without I/O.

A request is resent only when it certainly never reached a replica (the connect failed, not
one byte of it was written, or the replica is a batchgate that says it refused it before its
engine saw it: ``REJECTED_KIND``), or when it is idempotent (GET, HEAD, OPTIONS, or it carries
``Idempotency-Key``) and its connection was lost before the response began. A pooled
connection found closed before the write is not a failure at all: the pool opens another.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from proxy.core.errors import UpstreamError

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: The upstream error kind of an answer marked ``X-Batchgate-Rejected`` (a batchgate in front
#: of an engine refused it before the engine saw it: full, timed out, draining, or without a
#: healthy engine). Never delivered, so always resent, to another replica if one has room,
#: within ``upstream.retries``; once those are spent the answer is relayed as is. It never
#: counts against the replica for outlier ejection (proxy.control.health: not a failure kind).
REJECTED_KIND = "rejected"


class Decision(enum.Enum):
    RESEND = "resend"
    MARK_DOWN_AND_RESEND = "mark_down_and_resend"
    FAIL = "fail"


def is_idempotent(method: str, headers: Mapping[str, str]) -> bool:
    return method in IDEMPOTENT_METHODS or "Idempotency-Key" in headers


def classify(failure: UpstreamError, *, idempotent: bool) -> Decision:
    """What the forward loop does with a failure that happened before any response byte."""
    if failure.kind == "connect":
        # Nothing reached it, and it is not listening: the next probe decides when it is back.
        return Decision.MARK_DOWN_AND_RESEND
    if failure.unsent:
        return Decision.RESEND
    if idempotent and failure.kind == "reset":
        # Safe to repeat, and the connection died under it. A timeout is not resent: the
        # replica may still be working, and a second wait would double the caller's.
        return Decision.RESEND
    return Decision.FAIL
