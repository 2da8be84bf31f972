"""One structured line per request: what an SRE greps for after an incident.

JSON (one object per line) or text, per ``logging.format``; on when ``logging.level`` is
``debug`` or ``info``. Never the body (only the ``model`` it names, proxy.observe.model),
never a header: a prompt or an Authorization value must not end up in a log pipeline. The
caller's tenant is the name of its key, never the key.

Cost matters here, at thousands of requests per second: the request path only puts a tuple on
a queue (no LogRecord, no formatting, no syscall); a writer thread formats lines and writes
them in batches.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO

from proxy.observe.exchange import ExchangeView, outcome_text

FIELDS = (
    "time", "request_id", "method", "path", "replica", "status", "outcome",
    "queue_ms", "ttfb_ms", "duration_ms", "prompt_tokens", "completion_tokens",
    "client", "tenant", "model", "stream", "attempts", "bytes_in", "bytes_out",
)
#: The text format's head: `time method path status outcome`, then `request_id=`, then
#: every other field that is set, as `name=value`.
_HEAD = ("method", "path", "status", "outcome")
_TAIL = tuple(i for i, name in enumerate(FIELDS)
              if name not in ("time", "request_id", *_HEAD))
_AT = {name: i for i, name in enumerate(FIELDS)}
_BATCH = 4096  # lines per write at most
_LINGER_S = 0.05


def _ms(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) * 1000.0, 3)


def _timestamp(epoch: float) -> str:
    whole = int(epoch)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + (
        f".{int((epoch - whole) * 1000):03d}Z"
    )


def entry(exchange: ExchangeView) -> tuple[object, ...]:
    """The fields of one line, in :data:`FIELDS` order (cheap: no formatting here)."""
    end = exchange.last_byte_at if exchange.stage == "done" else None
    now = time.monotonic()
    waited = exchange.enqueued_at
    # A request that never got a slot (timed out, cut, or its caller left) waited until now.
    granted = exchange.dispatched_at if exchange.dispatched_at is not None else now
    return (
        time.time(),
        exchange.request_id,
        exchange.method,
        exchange.path,
        exchange.replica,
        exchange.status,
        outcome_text(exchange.outcome, exchange.detail),
        _ms(waited, granted) if waited is not None else None,
        _ms(exchange.dispatched_at, exchange.first_byte_at),
        _ms(exchange.started, end if end is not None else now),
        exchange.prompt_tokens,
        exchange.completion_tokens,
        exchange.client,
        exchange.tenant,
        exchange.model,
        exchange.stream,
        exchange.attempts,
        exchange.bytes_in,
        exchange.bytes_out,
    )


def format_json(values: Sequence[object]) -> str:
    fields = dict(zip(FIELDS, values, strict=True))
    fields["time"] = _timestamp(float(values[0]))  # type: ignore[arg-type]
    return json.dumps(fields, separators=(", ", ": "))


#: Characters a text value may hold unquoted (logfmt): anything else is quoted and escaped.
_PLAIN = re.compile(r"[A-Za-z0-9._:/@%+,\-]+")


def _text(value: object) -> str:
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    # A JSON string: quotes, backslashes, control bytes, non-ASCII and lone surrogates (a
    # non-UTF-8 byte, as aiohttp decodes it) escaped; a value can never forge a field.
    return json.dumps(text)


def format_text(values: Sequence[object]) -> str:
    at = _AT
    head = (f"{_timestamp(float(values[0]))} {_text(values[at['method']])} "  # type: ignore[arg-type]
            f"{_text(values[at['path']])} {values[at['status']]} {_text(values[at['outcome']])}")
    rest = " ".join(f"{FIELDS[i]}={_text(_lower(values[i]))}" for i in _TAIL
                    if values[i] is not None)
    return f"{head} request_id={_text(values[at['request_id']])} {rest}"


def _lower(value: object) -> object:
    # logfmt booleans as JSON has them: stream=true, not stream=True.
    return ("true" if value else "false") if isinstance(value, bool) else value


#: Lines waiting for the writer at most; past that, lines are dropped (and counted) rather
#: than let a stalled stdout grow the proxy's memory without bound.
MAX_PENDING = 65536


class AccessLog:
    """Writes access lines from a thread of its own; :meth:`close` flushes and stops it.

    Guarantees: the request path never blocks on the log (a full queue drops the line and
    counts it, see :meth:`on_drop`); a line that cannot be formatted is dropped alone, never
    the batch it is in; every line reaching the stream is ASCII (values are escaped).
    """

    def __init__(self, stream: BinaryIO, fmt: str = "json", *,
                 max_pending: int = MAX_PENDING) -> None:
        self._stream = stream
        self._format = format_json if fmt == "json" else format_text
        self._queue: queue.SimpleQueue[tuple[object, ...] | None] = queue.SimpleQueue()
        self._max_pending = max_pending
        # Each written by one thread only (no lock, no lost update): queued by the request
        # path, taken by the writer; their difference is what waits.
        self._queued = 0
        self._taken = 0
        self._dropped_full = 0  # request path
        self._dropped_bad = 0  # writer thread
        self._on_drop: Callable[[int], None] | None = None
        #: Off while ``logging.level`` is warning or error; a reload may turn it on again.
        self.enabled = True
        self._thread = threading.Thread(target=self._run, name="batchgate-access-log",
                                        daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        return self._dropped_full + self._dropped_bad

    def on_drop(self, count: Callable[[int], None]) -> None:
        """Call ``count(n)`` when lines are dropped (from either thread: must be thread-safe,
        as a Prometheus counter's ``inc`` is)."""
        self._on_drop = count

    def _drop(self, n: int) -> None:
        if self._on_drop is not None:
            self._on_drop(n)

    def reconfigure(self, fmt: str, *, enabled: bool) -> None:
        """A reload changed ``logging``: lines not yet written use ``fmt`` (the writer thread
        reads the attribute per line, and swapping it is atomic)."""
        self._format = format_json if fmt == "json" else format_text
        self.enabled = enabled

    def record(self, exchange: ExchangeView) -> None:
        if not self.enabled:
            return
        if self._queued - self._taken >= self._max_pending:
            self._dropped_full += 1
            self._drop(1)
            return
        self._queued += 1
        self._queue.put(entry(exchange))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _line(self, item: tuple[object, ...]) -> bytes | None:
        try:
            return self._format(item).encode("ascii", "backslashreplace")
        except Exception:  # one line's bad value costs that line only
            self._dropped_bad += 1
            self._drop(1)
            return None

    def _run(self) -> None:
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        while True:
            item = get()
            # Let a batch gather: waking (and taking the GIL) once per line would cost the
            # event loop more than the formatting does.
            time.sleep(_LINGER_S)
            lines: list[bytes] = []
            stop = item is None
            while item is not None:
                self._taken += 1
                line = self._line(item)
                if line is not None:
                    lines.append(line)
                if len(lines) >= _BATCH:
                    break
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
            if lines:
                try:
                    self._stream.write(b"\n".join(lines) + b"\n")
                    self._stream.flush()
                except (OSError, ValueError):
                    # stdout gone or broken: the proxy keeps serving, and the lines it could
                    # not write are counted like any other dropped line.
                    self._dropped_bad += len(lines)
                    self._drop(len(lines))
            if stop:
                return
