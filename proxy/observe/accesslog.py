"""One structured line per request: what an SRE greps for after an incident.

JSON (one object per line) or text, per ``logging.format``; on when ``logging.level`` is
``debug`` or ``info``. Never the body, never a header: a prompt or an Authorization value must
not end up in a log pipeline.

Cost matters here, at thousands of requests per second: the request path only puts a tuple on
a queue (no LogRecord, no formatting, no syscall); a writer thread formats lines and writes
them in batches.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Sequence
from typing import BinaryIO

from proxy.observe.exchange import Exchange

FIELDS = (
    "time", "request_id", "method", "path", "replica", "status", "outcome",
    "queue_ms", "ttfb_ms", "duration_ms", "prompt_tokens", "completion_tokens",
)
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


def entry(exchange: Exchange) -> tuple[object, ...]:
    """The fields of one line, in :data:`FIELDS` order (cheap: no formatting here)."""
    end = exchange.last_byte_at if exchange.stage == "done" else None
    return (
        time.time(),
        exchange.request_id,
        exchange.method,
        exchange.path,
        exchange.replica,
        exchange.status,
        exchange.outcome,
        _ms(exchange.enqueued_at, exchange.dispatched_at),
        _ms(exchange.dispatched_at, exchange.first_byte_at),
        _ms(exchange.started, end if end is not None else time.monotonic()),
        exchange.prompt_tokens,
        exchange.completion_tokens,
    )


def format_json(values: Sequence[object]) -> str:
    fields = dict(zip(FIELDS, values, strict=True))
    fields["time"] = _timestamp(float(values[0]))  # type: ignore[arg-type]
    return json.dumps(fields, separators=(", ", ": "))


def format_text(values: Sequence[object]) -> str:
    head = (f"{_timestamp(float(values[0]))} {values[2]} {values[3]} {values[5]} "  # type: ignore[arg-type]
            f"{values[6]}")
    rest = " ".join(f"{name}={value}" for name, value in zip(FIELDS[4:], values[4:], strict=False)
                    if name not in ("status", "outcome") and value is not None)
    return f"{head} request_id={values[1]} {rest}"


class AccessLog:
    """Writes access lines from a thread of its own; :meth:`close` flushes and stops it."""

    def __init__(self, stream: BinaryIO, fmt: str = "json") -> None:
        self._stream = stream
        self._format = format_json if fmt == "json" else format_text
        self._queue: queue.SimpleQueue[tuple[object, ...] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="batchgate-access-log",
                                        daemon=True)
        self._thread.start()

    def record(self, exchange: Exchange) -> None:
        self._queue.put(entry(exchange))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        while True:
            item = get()
            # Let a batch gather: waking (and taking the GIL) once per line would cost the
            # event loop more than the formatting does.
            time.sleep(_LINGER_S)
            lines: list[str] = []
            stop = item is None
            while item is not None:
                lines.append(self._format(item))
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
                    self._stream.write(("\n".join(lines) + "\n").encode())
                    self._stream.flush()
                except (OSError, ValueError):
                    pass  # stdout gone: the proxy keeps serving
            if stop:
                return
