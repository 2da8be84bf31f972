"""The benchmark's pure core: options, per-request metering, arrivals, percentiles, summaries.

No I/O and no aiohttp here (a test asserts it); :mod:`proxy.bench.client` does the HTTP and
feeds what it reads to a :class:`ResponseMeter`, one line at a time, with the clock injected.

What is measured, per request (times from ``time.perf_counter()``, in seconds):

* **e2e**: from just before the request is sent to the end of the response body;
* **TTFT**: to the first SSE event that carries generated text (``choices[0].text``, or
  ``delta.content`` / ``delta.reasoning_content`` in chat); a non-streamed request has
  TTFT = e2e. An event with empty text (vLLM's first chat chunk, the usage chunk) is not a
  token;
* **ITL**: the gaps between successive content events (one per event, so an engine that puts
  several tokens in one event shows fewer, longer gaps);
* **tokens**: ``usage.completion_tokens`` when the server reports it (in the body, or in the
  final chunk of a stream asked for ``include_usage``), else the number of content events.
  A non-streamed response without ``usage`` counts 0 tokens and is flagged as ``no_usage``.

A request is *ok* when the status is 200 and the body carries no error. Failures are keyed by
status code (``"429"``), ``"body_error"`` (an ``error`` object or undecodable event in a
200 response), ``"timeout"`` and ``"conn_error"`` (any other transport failure).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PROMPT = "Write a long story about a robot learning to paint."
PERCENTILES = (50, 95, 99)

BODY_ERROR = "body_error"
TIMEOUT = "timeout"
CONN_ERROR = "conn_error"


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What every request of a level sends, and when a level stops.

    ``model=None`` leaves ``model`` out of the body (llama.cpp accepts that; vLLM does not, so
    the CLI asks ``/v1/models`` first). ``duration_s`` stops a level from starting requests
    after that many seconds, whichever of it and the request count comes first. ``seed`` drives
    the open-loop arrival times, so two runs with the same seed send at the same offsets.
    """

    max_tokens: int = 100
    stream: bool = False
    chat: bool = False
    model: str | None = None
    prompt: str = DEFAULT_PROMPT
    ignore_eos: bool = True
    duration_s: float | None = None
    seed: int | None = 0
    timeout_s: float | None = 600.0
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1. Got {self.max_tokens!r}.")
        for name in ("duration_s", "timeout_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"{name} must be a number > 0 or None. Got {value!r}.")

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    def body(self) -> dict[str, Any]:
        """The JSON request body, the same for every request of a run."""
        body: dict[str, Any] = {}
        if self.model is not None:
            body["model"] = self.model
        if self.chat:
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        body["max_tokens"] = self.max_tokens
        body["stream"] = self.stream
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            body["ignore_eos"] = True  # vLLM, llama.cpp: generate exactly max_tokens
        return body


def endpoint_url(base: str, options: BenchOptions) -> str:
    """``base`` plus the completion path; a base that already ends in ``/v1`` (as OpenAI SDK
    base URLs do) does not get a second one."""
    base = base.rstrip("/")
    path = options.path
    if base.endswith("/v1"):
        path = path[len("/v1") :]
    return base + path


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(slots=True)
class RequestResult:
    """One request's measurements; times are ``perf_counter()`` seconds."""

    start: float
    end: float
    status: int | None  # None: no response (transport failure or timeout before headers)
    error: str | None  # None when the request succeeded; else its key in LevelResult.errors
    ttft: float | None = None  # seconds after start; None if no content arrived
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    usage: bool = False  # tokens came from the server's usage figures

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e(self) -> float:
        return self.end - self.start


def failed(start: float, end: float, status: int | None, error: str) -> RequestResult:
    return RequestResult(start, end, status, error)


class ResponseMeter:
    """Turns one 200 response, fed line by line or as a whole body, into a RequestResult.

    SSE as the standard has it: ``data:`` lines (one optional space after the colon) are
    joined with newlines and dispatched by a blank line; comments and other fields are
    ignored; an event left pending at end of stream is dispatched by :meth:`close`. The clock
    is read once per content event, when it is dispatched.
    """

    __slots__ = (
        "_clock",
        "_data",
        "_error",
        "_events",
        "_itl",
        "_last",
        "_start",
        "_ttft",
        "_usage",
        "done",
    )

    def __init__(self, start: float, clock: Callable[[], float]) -> None:
        self._start = start
        self._clock = clock
        self._data: list[bytes] = []
        self._events = 0
        self._ttft: float | None = None
        self._last = 0.0
        self._itl: list[float] = []
        self._usage: int | None = None
        self._error = False
        self.done = False  # saw ``data: [DONE]``

    def feed(self, line: bytes) -> None:
        """One line of an event stream, with or without its line ending."""
        if line.startswith(b"data:"):
            data = line[5:].rstrip(b"\r\n")
            self._data.append(data[1:] if data.startswith(b" ") else data)
        elif (not line or line[0] in b"\r\n") and self._data:
            data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
            self._data.clear()
            self._dispatch(data)

    def close(self) -> None:
        """End of stream: dispatch an event the server did not terminate with a blank line."""
        self.feed(b"")

    def body(self, raw: bytes) -> None:
        """A whole non-streamed response body."""
        obj = self._decode(raw)
        if obj is not None:
            self._inspect(obj)

    def _dispatch(self, data: bytes) -> None:
        if data == b"[DONE]":
            self.done = True
            return
        obj = self._decode(data)
        if obj is not None and self._inspect(obj):
            now = self._clock()
            if self._ttft is None:
                self._ttft = now - self._start
            else:
                self._itl.append(now - self._last)
            self._last = now

    def _decode(self, data: bytes) -> dict[str, Any] | None:
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or obj.get("error"):
            self._error = True
            return None
        return obj

    def _inspect(self, obj: dict[str, Any]) -> bool:
        """Record usage; True if ``obj`` carries generated text."""
        usage = obj.get("usage")
        if isinstance(usage, dict) and _is_int(usage.get("completion_tokens")):
            self._usage = usage["completion_tokens"]
        choices = obj.get("choices")
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            return False
        choice = choices[0]
        delta = choice.get("delta") or choice.get("message")
        if isinstance(delta, dict):
            text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
        else:
            text = choice.get("text")
        if text and isinstance(text, str):
            self._events += 1
            return True
        return False

    def result(self, status: int, end: float, *, streamed: bool) -> RequestResult:
        error = BODY_ERROR if self._error else None
        if streamed:
            tokens = self._usage if self._usage is not None else self._events
            ttft = self._ttft
        else:
            tokens = self._usage or 0
            ttft = end - self._start
        return RequestResult(
            self._start, end, status, error, ttft, self._itl, tokens, self._usage is not None
        )


def arrival_offsets(rate: float, seed: int | None) -> Iterator[float]:
    """Poisson arrivals at ``rate`` per second: endless, increasing offsets from 0 in seconds.

    Gaps are exponential with mean ``1 / rate``, drawn from ``random.Random(seed)``, so a seed
    fixes the whole schedule. The first request goes at the first gap, not at 0.
    """
    if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number > 0. Got {rate!r}.")
    rng = random.Random(seed)
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


def percentiles(values: Iterable[float]) -> dict[str, float]:
    """``{"p50", "p95", "p99"}`` by linear interpolation between closest ranks (numpy's
    default, ``statistics.quantiles(method="inclusive")``); NaN for no values."""
    data = sorted(values)
    out: dict[str, float] = {}
    for p in PERCENTILES:
        if not data:
            out[f"p{p}"] = math.nan
            continue
        pos = (len(data) - 1) * p / 100
        lo = math.floor(pos)
        hi = min(lo + 1, len(data) - 1)
        out[f"p{p}"] = data[lo] + (data[hi] - data[lo]) * (pos - lo)
    return out


@dataclass(frozen=True, slots=True)
class LevelResult:
    """One level's figures. ``concurrency`` is set in closed loop, ``rate`` in open loop;
    ``max_concurrency`` is the most requests seen in flight at once. Latency percentiles are
    in milliseconds over the ok requests; ITL pools every gap of every ok request.
    ``total_time_s`` runs from the first send to the last completion, ok or not.
    """

    concurrency: int | None
    rate: float | None
    requests: int
    ok: int
    errors: dict[str, int]
    tokens: int
    total_time_s: float
    tokens_per_s: float
    max_concurrency: int
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    itl_count: int
    no_usage: int  # ok requests whose tokens were counted, not reported by the server
    dispatch_lag_ms: float | None  # open loop: latest send behind its scheduled time
    results: tuple[RequestResult, ...] = field(default=(), repr=False, compare=False)


def summarise(
    results: Iterable[RequestResult],
    *,
    concurrency: int | None,
    rate: float | None,
    max_concurrency: int,
    dispatch_lag_s: float | None = None,
) -> LevelResult:
    done = tuple(results)
    ok = [r for r in done if r.ok]
    total = max(r.end for r in done) - min(r.start for r in done) if done else 0.0
    tokens = sum(r.tokens for r in ok)
    itl = [gap * 1000 for r in ok for gap in r.itl]
    return LevelResult(
        concurrency=concurrency,
        rate=rate,
        requests=len(done),
        ok=len(ok),
        errors=dict(sorted(Counter(r.error for r in done if r.error is not None).items())),
        tokens=tokens,
        total_time_s=total,
        tokens_per_s=tokens / total if total > 0 else 0.0,
        max_concurrency=max_concurrency,
        ttft_ms=percentiles(r.ttft * 1000 for r in ok if r.ttft is not None),
        itl_ms=percentiles(itl),
        e2e_ms=percentiles(r.e2e * 1000 for r in ok),
        itl_count=len(itl),
        no_usage=sum(1 for r in ok if not r.usage),
        dispatch_lag_ms=None if dispatch_lag_s is None else dispatch_lag_s * 1000,
        results=done,
    )
