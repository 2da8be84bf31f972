"""What happened to one request: filled in by the edge as it goes, read by the observers.

The edge (``proxy.edge``) is the only writer. Observers (metrics, the access log) are given an
:class:`ExchangeView`, the read-only face of the same object: mypy refuses a write through
it, so an observer can never change what the next observer sees.
"""

from __future__ import annotations

import enum
from dataclasses import MISSING, dataclass, fields
from typing import Any, Protocol

from proxy.observe.usage import UsageTail


class Outcome(enum.Enum):
    """How a request ended. ``detail`` on the exchange says more for two of them."""

    OK = "ok"
    REJECTED = "rejected"  # answered by batchgate itself; detail: the reason
    CLIENT_DISCONNECT = "client_disconnect"
    UPSTREAM_ERROR = "upstream_error"  # detail: the kind (connect, timeout, reset, ...)
    DRAIN_CUT = "drain_cut"  # a stream cut at the drain deadline
    INTERNAL_ERROR = "error"  # a bug of ours, answered 500


def outcome_text(outcome: Outcome, detail: str | None) -> str:
    """The access log's ``outcome`` field, as README documents it (``rejected:queue_full``)."""
    if outcome is Outcome.REJECTED or outcome is Outcome.UPSTREAM_ERROR:
        return f"{outcome.value}:{detail}"
    if outcome is Outcome.INTERNAL_ERROR:
        return "error:internal"
    return str(outcome.value)


class ExchangeView(Protocol):
    """The read-only face of an :class:`Exchange`, the one observers get."""

    @property
    def request_id(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def route(self) -> str: ...
    @property
    def started(self) -> float: ...
    @property
    def stage(self) -> str: ...
    @property
    def outcome(self) -> Outcome: ...
    @property
    def detail(self) -> str | None: ...
    @property
    def replica(self) -> str | None: ...
    @property
    def status(self) -> int | None: ...
    @property
    def enqueued_at(self) -> float | None: ...
    @property
    def dispatched_at(self) -> float | None: ...
    @property
    def first_byte_at(self) -> float | None: ...
    @property
    def last_byte_at(self) -> float | None: ...
    @property
    def stream(self) -> bool: ...
    @property
    def attempts(self) -> int: ...
    @property
    def client(self) -> str | None: ...
    @property
    def tenant(self) -> str | None: ...
    @property
    def model(self) -> str | None: ...
    @property
    def klass(self) -> str: ...
    @property
    def bytes_in(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...
    @property
    def prompt_tokens(self) -> int | None: ...
    @property
    def completion_tokens(self) -> int | None: ...


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
    outcome: Outcome = Outcome.OK
    detail: str | None = None  # the rejection reason or upstream error kind of ``outcome``
    replica: str | None = None
    status: int | None = None
    attempts: int = 0
    enqueued_at: float | None = None
    dispatched_at: float | None = None
    #: Whole milliseconds spent waiting for a slot, on the scheduler's clock (resends add
    #: up); None: the request never reached the queue (slot-free, or refused before it).
    queue_ms: int | None = None
    first_byte_at: float | None = None
    last_byte_at: float | None = None
    prepared: bool = False  # response headers sent to the caller
    stream: bool = False  # the replica's answer is an event stream (TTFB is then TTFT)
    client_gone: bool = False
    upstream_error: str | None = None  # kind, when the replica failed mid-body
    #: Why batchgate cut this stream while its replica still held it (a wedged engine,
    #: proxy.control.stall): the relay says it in a last SSE error event.
    cut_reason: str | None = None
    usage: UsageTail | None = None  # fed by the relay; read by the frame, not by observers
    client: str | None = None  # the peer address (not X-Forwarded-For: a caller can forge it)
    tenant: str | None = None  # the name of the caller's API key; None: auth off, or no key
    model: str | None = None  # the body's "model" (parsed when routing is on, else scanned)
    key_class: str | None = None  # the `class` of the caller's API key (None: none, or no key)
    klass: str = ""  # the request's scheduling class, by name ("" until decided)
    prompt_chars: int | None = None  # characters of a text prompt (token costs are on)
    bytes_in: int = 0  # request body bytes read from the caller
    bytes_out: int = 0  # response body bytes handed to the caller's connection
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @classmethod
    def begin(
        cls, request_id: str, method: str, path: str, route: str, arrival: float,
        started: float, client: str | None,
    ) -> Exchange:
        """``Exchange(...)`` with these fields, the rest at their defaults: the edge's
        constructor, once per request. A third cheaper than the dataclass's (no keyword
        matching, the defaults in one unpack); tests/unit/test_exchange_begin.py holds the two
        equal, so a new field cannot be missed here."""
        self = object.__new__(cls)
        self.request_id, self.method, self.path, self.route = request_id, method, path, route
        self.arrival, self.started, self.client = arrival, started, client
        (
            self.stage, self.outcome, self.detail, self.replica, self.status, self.attempts,
            self.enqueued_at, self.dispatched_at, self.queue_ms, self.first_byte_at,
            self.last_byte_at, self.prepared, self.stream, self.client_gone,
            self.upstream_error, self.cut_reason, self.usage, self.tenant, self.model,
            self.key_class, self.klass, self.prompt_chars, self.bytes_in, self.bytes_out,
            self.prompt_tokens, self.completion_tokens
        ) = _DEFAULTS
        return self

    def end(self, outcome: Outcome, detail: str | None = None) -> None:
        self.outcome = outcome
        self.detail = detail


#: The defaults of :meth:`Exchange.begin`, in the fields' order (client aside): taken from the
#: dataclass, so a new field makes the unpack there fail loudly rather than go unset.
_DEFAULTS: tuple[Any, ...] = tuple(
    f.default for f in fields(Exchange) if f.default is not MISSING and f.name != "client")
