"""One structured line per request: what an SRE greps for after an incident.

Written through the ``batchgate.access`` logger at INFO (``logging.level: warning`` turns it
off), as JSON or text per ``logging.format``. Never the body, never a header: a prompt or an
Authorization value must not end up in a log pipeline.
"""

from __future__ import annotations

import logging
import time

from proxy.relay import Exchange

log = logging.getLogger("batchgate.access")


def _ms(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) * 1000.0, 3)


def access_log(exchange: Exchange) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    now = time.monotonic()
    end = exchange.last_byte_at if exchange.stage == "done" else now
    fields = {
        "request_id": exchange.request_id,
        "method": exchange.method,
        "path": exchange.path,
        "replica": exchange.replica,
        "status": exchange.status,
        "outcome": exchange.outcome,
        "queue_ms": _ms(exchange.enqueued_at, exchange.dispatched_at),
        "ttfb_ms": _ms(exchange.dispatched_at, exchange.first_byte_at),
        "duration_ms": _ms(exchange.started, end if end is not None else now),
        "prompt_tokens": exchange.prompt_tokens,
        "completion_tokens": exchange.completion_tokens,
    }
    log.info(
        "%s %s %s %s %s", exchange.method, exchange.path, exchange.status, exchange.outcome,
        exchange.replica, extra={"fields": fields},
    )
