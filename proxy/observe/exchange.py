"""What happened to one request: filled in by the edge as it goes, read by the observers."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.observe.usage import UsageTail


@dataclass(slots=True)
class Exchange:
    """What happened to one request, filled in as it goes: for metrics and the access log.

    Times are ``time.monotonic()`` seconds (uvloop's ``loop.time()`` has 1 ms resolution,
    too coarse for inter-token gaps); ``arrival`` alone is on the loop's clock, for deadlines.
    """

    request_id: str
    method: str
    path: str
    route: str
    arrival: float  # loop clock
    started: float
    stage: str = "queued"  # queued -> waiting_first_byte -> streaming -> done
    outcome: str = "ok"  # ok | rejected:<reason> | client_disconnect | upstream_error:<kind>
    replica: str | None = None
    status: int | None = None
    attempts: int = 0
    enqueued_at: float | None = None
    dispatched_at: float | None = None
    first_byte_at: float | None = None
    last_byte_at: float | None = None
    prepared: bool = False  # response headers sent to the caller
    stream: bool = False  # the replica's answer is an event stream (TTFB is then TTFT)
    client_gone: bool = False
    upstream_error: str | None = None  # kind, when the replica failed mid-body
    usage: UsageTail | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
