"""The load generator's raw-socket probes, for what wrk and :mod:`proxy.bench.client` cannot
measure cheaply enough. ``make bench`` (bench/phases.py) runs them against its own upstream
(bench/upstream.py), whose answers they parse by hand; they are not a general HTTP client
(``batchgate bench`` against an arbitrary endpoint goes through :mod:`proxy.bench.client`).

They stay cheap per event so that the generator is never what limits P1 or P3: plain
``asyncio.Protocol`` objects on one prepared request, no per-request objects beyond a future,
``bytes.find`` over whole reads, and no JSON decoding (the ``"t"`` stamp is cut out by hand).
At 2,000 streams of 20 events/s it used about 0.3 of its core (``client_cpu`` in
bench/results/); a step whose client passes 0.9 cores is flagged ``generator_limited``.

* :func:`latency_c1`: one connection, one request at a time, each request timed on its own.
  (wrk's percentiles are corrected for coordinated omission: at concurrency 1 a single 4 ms
  scheduler hiccup becomes ~60 synthetic samples, so its p99 measures the machine's noise.)
* :func:`sse_streams`: N concurrent SSE streams from the bench upstream's ``/sse`` route,
  started evenly over a ramp. The upstream stamps each event with ``time.monotonic()`` (one
  clock for every process on Linux), so for each event the client records its gap since the
  stream's previous event, the *added* gap (that gap less the gap between the upstream's two
  writes: what the path in between added, the upstream's own lateness cancelled out) and its
  delivery delay.
* :func:`hold`: N connections, each with one request that will not be answered for now.

All are bounded in count and time and close every connection they opened. No aiohttp here.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast


def http_request(method: str, path: str, body: bytes = b"", *, close: bool = False) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


def _response_complete(buf: bytearray) -> bool:
    """A whole response is in: its Content-Length is met, or its chunked body has ended."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = bytes(buf[:end]).lower()
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop >= 0 else len(head)])
        return len(buf) >= end + 4 + length
    return buf.endswith(b"0\r\n\r\n")


class _Exchange(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[bool] | None = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done() and _response_complete(self.buf):
            self.waiter.set_result(self.buf.startswith(b"HTTP/1.1 200"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(False)


@dataclass
class LatencyResult:
    latencies_s: list[float]
    errors: int


async def latency_c1(
    host: str, port: int, request: bytes, *, count: int, duration_s: float, warmup: int = 200
) -> LatencyResult:
    """Send ``request`` back to back on one keep-alive connection; time each answer."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(_Exchange, host, port)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration_s
    try:
        for i in range(warmup + count):
            if time.perf_counter() > deadline:
                break
            proto.buf.clear()
            proto.waiter = loop.create_future()
            start = time.perf_counter()
            transport.write(request)
            ok = await asyncio.wait_for(proto.waiter, 5.0)
            elapsed = time.perf_counter() - start
            if not ok:
                errors += 1
                if transport.is_closing():
                    break
            elif i >= warmup:
                latencies.append(elapsed)
    finally:
        transport.close()
    return LatencyResult(latencies, errors)


@dataclass
class StreamsResult:
    """What N streams saw inside the window in which all of them were open."""

    streams: int
    completed: int
    errors: int
    events: int
    gaps_s: list[float] = field(repr=False)  # between successive events of a stream
    added_s: list[float] = field(repr=False)  # each gap less the upstream's gap between writes
    delays_s: list[float] = field(repr=False)  # from the upstream's write to arrival
    window_s: float
    client_cpu: float  # the generator's CPU use in the window, in cores
    samples: dict[str, dict[str, float]]  # what ``sample()`` returned at window start / end


class _Recorder:
    def __init__(self, w0: float, w1: float) -> None:
        self.w0 = w0
        self.w1 = w1
        self.gaps: list[float] = []
        self.added: list[float] = []
        self.delays: list[float] = []
        self.events = 0
        self.completed = 0
        self.errors = 0
        self.open: set[asyncio.Transport] = set()
        self.finished: asyncio.Event = asyncio.Event()
        self.expected = 0

    def end(self, ok: bool) -> None:
        if ok:
            self.completed += 1
        else:
            self.errors += 1
        if self.completed + self.errors >= self.expected:
            self.finished.set()


class _Stream(asyncio.Protocol):
    __slots__ = ("checked", "done", "events", "last", "last_sent", "rec", "request", "tail",
                 "transport")

    def __init__(self, rec: _Recorder, request: bytes) -> None:
        self.rec = rec
        self.request = request
        self.tail = b""
        self.last = 0.0  # when the previous event arrived
        self.last_sent = 0.0  # and when the upstream had written it
        self.events = 0
        self.checked = False
        self.done = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.rec.open.add(self.transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.tail + data if self.tail else data
        if not self.checked:
            if len(buf) < 12:
                self.tail = buf
                return
            self.checked = True
            if not buf.startswith(b"HTTP/1.1 200"):
                self._finish(False)
                return
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self.tail = buf
            return
        complete, self.tail = buf[: cut + 2], buf[cut + 2 :]
        rec = self.rec
        inside = rec.w0 <= now <= rec.w1
        at = complete.find(b'"t":')
        while at >= 0:
            stop = complete.find(b"}", at)
            sent = float(complete[at + 4 : stop])
            self.events += 1
            if inside:
                rec.delays.append(now - sent)
                if self.last:
                    gap = now - self.last
                    rec.gaps.append(gap)
                    # What the path added to this gap: the upstream's own lateness cancels.
                    rec.added.append(gap - (sent - self.last_sent))
            self.last, self.last_sent = now, sent
            at = complete.find(b'"t":', stop)
        if b"data: [DONE]" in complete:
            self._finish(True)

    def _finish(self, ok: bool) -> None:
        if self.done:
            return
        self.done = True
        self.rec.events += self.events
        self.rec.end(ok)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.rec.open.discard(self.transport)
        self._finish(False)


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def sse_streams(
    host: str,
    port: int,
    *,
    streams: int,
    interval_s: float,
    ramp_s: float,
    hold_s: float,
    sample: Callable[[], dict[str, float]],
) -> StreamsResult:
    """Open ``streams`` streams evenly over ``ramp_s``; each lasts ramp + hold. The window is
    the time all are open, less a settling margin; ``sample()`` runs at its start and end."""
    loop = asyncio.get_running_loop()
    events = round((ramp_s + hold_s) / interval_s)
    # POST: a stream is work (a GET would take batchgate's slot-free path, bounded at 8).
    request = http_request("POST", f"/sse?events={events}&interval_ms={interval_s * 1000:g}",
                           b"{}")
    start = time.monotonic() + 0.05
    rec = _Recorder(start + ramp_s + 0.25, start + events * interval_s - 0.1)
    rec.expected = streams
    samples: dict[str, dict[str, float]] = {}
    marks: dict[str, float] = {}

    def take(name: str) -> None:
        marks[name] = _cpu_self()
        samples[name] = sample()

    loop.call_at(loop.time() + (rec.w0 - time.monotonic()), take, "start")
    loop.call_at(loop.time() + (rec.w1 - time.monotonic()), take, "end")

    async def connect(delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await loop.create_connection(lambda: _Stream(rec, request), host, port)
        except OSError:
            rec.end(False)

    tasks = [
        asyncio.create_task(connect(start - time.monotonic() + i * ramp_s / streams))
        for i in range(streams)
    ]
    try:
        await asyncio.wait_for(rec.finished.wait(), ramp_s + hold_s + 15.0)
    except TimeoutError:
        pass
    finally:
        for task in tasks:
            task.cancel()
        for transport in list(rec.open):
            transport.close()
        await asyncio.sleep(0.05)
    cpu = (marks.get("end", 0.0) - marks.get("start", 0.0)) / max(rec.w1 - rec.w0, 1e-9)
    return StreamsResult(
        streams=streams,
        completed=rec.completed,
        errors=streams - rec.completed,
        events=rec.events,
        gaps_s=rec.gaps,
        added_s=rec.added,
        delays_s=rec.delays,
        window_s=rec.w1 - rec.w0,
        client_cpu=cpu,
        samples=samples,
    )


class _Held(asyncio.Protocol):
    def __init__(self, request: bytes, bag: set[asyncio.Transport]) -> None:
        self.request = request
        self.bag = bag

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        self.bag.add(t)
        t.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        pass


@contextlib.asynccontextmanager
async def hold(
    host: str, port: int, n: int, request: bytes, *, parallel: int = 100, timeout_s: float = 60.0
) -> AsyncIterator[set[asyncio.Transport]]:
    """Open ``n`` connections (``parallel`` connects at a time) that each send ``request``;
    yield the set of open transports; close them all on exit."""
    loop = asyncio.get_running_loop()
    bag: set[asyncio.Transport] = set()
    gate = asyncio.Semaphore(parallel)
    deadline = time.monotonic() + timeout_s

    async def one() -> None:
        async with gate:
            if time.monotonic() > deadline:
                return
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(
                    loop.create_connection(lambda: _Held(request, bag), host, port), 10.0
                )

    try:
        await asyncio.gather(*(one() for _ in range(n)))
        yield bag
    finally:
        for transport in list(bag):
            transport.close()
        await asyncio.sleep(0.2)
