"""The load generator: sends a level's requests over one aiohttp session and meters them.

Built not to be the bottleneck: the request body is encoded once per level, the connector has
no connection limit (so a level of N callers holds N connections), SSE is read a line at a time
from aiohttp's buffered reader (``bytes.find``, no Python loop per byte), the clock is read
once per content event, and open-loop requests are spawned as their send time comes, not all
at once. One process sustains over a thousand concurrent streams.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from proxy.bench.core import (
    CONN_ERROR,
    TIMEOUT,
    BenchOptions,
    LevelResult,
    RequestResult,
    ResponseMeter,
    arrival_offsets,
    endpoint_url,
    failed,
    summarise,
)

# aiohttp refuses lines longer than twice the read buffer; 1 MiB leaves room for logprobs.
READ_BUFSIZE = 1 << 20


class ModelNotFound(Exception):
    """No model name could be had from ``/v1/models``; ``str(err)`` says why, in one line."""


def new_session() -> aiohttp.ClientSession:
    """A session fit for any level: no connection cap, no session-wide timeout."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None),
        read_bufsize=READ_BUFSIZE,
    )


def headers(options: BenchOptions) -> dict[str, str]:
    out = {"Content-Type": "application/json"}
    if options.stream:
        # Some gateways (DataCrunch's among them) only stream when asked for SSE explicitly.
        out["Accept"] = "text/event-stream"
        out["Cache-Control"] = "no-cache"
    if options.api_key:
        out["Authorization"] = f"Bearer {options.api_key}"
    return out


class _Sender:
    """Sends one prepared request and meters it; counts requests in flight."""

    def __init__(self, session: aiohttp.ClientSession, url: str, options: BenchOptions) -> None:
        self.session = session
        self.url = endpoint_url(url, options)
        self.body = json.dumps(options.body()).encode()
        self.headers = headers(options)
        self.timeout = aiohttp.ClientTimeout(total=options.timeout_s)
        self.in_flight = 0
        self.max_in_flight = 0

    async def send(self) -> RequestResult:
        clock = time.perf_counter
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        status: int | None = None
        start = clock()
        try:
            async with self.session.post(
                self.url, data=self.body, headers=self.headers, timeout=self.timeout
            ) as resp:
                status = resp.status
                if status != 200:
                    await resp.read()  # so the connection can be reused
                    return failed(start, clock(), status, str(status))
                meter = ResponseMeter(start, clock)
                # A server may ignore "stream": judge by what it sent, not by what we asked.
                streamed = resp.content_type == "text/event-stream"
                if streamed:
                    async for line in resp.content:
                        meter.feed(line)
                    meter.close()
                else:
                    meter.body(await resp.read())
                return meter.result(status, clock(), streamed=streamed)
        except TimeoutError:
            return failed(start, clock(), status, TIMEOUT)
        except (aiohttp.ClientError, HttpProcessingError, OSError):
            return failed(start, clock(), status, CONN_ERROR)
        finally:
            self.in_flight -= 1


async def run_level(
    url: str,
    *,
    concurrency: int | None,
    rate: float | None,
    requests: int | None,
    options: BenchOptions,
    session: aiohttp.ClientSession | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
) -> LevelResult:
    """Run one level against the OpenAI-compatible server at base ``url``; never raises for
    HTTP or transport failures (they are counted in ``errors``).

    Closed loop (``concurrency``): that many callers send back to back until ``requests`` in
    all have been sent. Open loop (``rate``): Poisson arrivals at ``rate`` per second, no
    concurrency bound, ``requests`` in all. Either way ``options.duration_s`` stops new sends
    after that long; ``requests=None`` means no count limit (``duration_s`` is then required).
    ``session`` is reused if given (connections stay warm across levels), else one is made
    and closed. ``on_result`` is called as each request completes (a progress bar).
    """
    if (concurrency is None) == (rate is None):
        raise ValueError(f"set exactly one of concurrency and rate. Got {concurrency=}, {rate=}.")
    if concurrency is not None and (isinstance(concurrency, bool) or concurrency < 1):
        raise ValueError(f"concurrency must be an integer >= 1. Got {concurrency!r}.")
    if requests is not None and (isinstance(requests, bool) or requests < 1):
        raise ValueError(f"requests must be an integer >= 1 or None. Got {requests!r}.")
    if requests is None and options.duration_s is None:
        raise ValueError("requests=None needs options.duration_s to end the level.")
    if session is None:
        async with new_session() as own:
            return await run_level(
                url,
                concurrency=concurrency,
                rate=rate,
                requests=requests,
                options=options,
                session=own,
                on_result=on_result,
            )
    sender = _Sender(session, url, options)
    results: list[RequestResult] = []

    async def send() -> None:
        result = await sender.send()
        results.append(result)
        if on_result is not None:
            on_result(result)

    lag: float | None = None
    if concurrency is not None:
        await _closed_loop(send, concurrency, requests, options.duration_s)
    else:
        assert rate is not None
        lag = await _open_loop(send, rate, requests, options.duration_s, options.seed)
    return summarise(
        results,
        concurrency=concurrency,
        rate=rate,
        max_concurrency=sender.max_in_flight,
        dispatch_lag_s=lag,
    )


async def _closed_loop(
    send: Callable[[], Coroutine[Any, Any, None]],
    concurrency: int,
    requests: int | None,
    duration_s: float | None,
) -> None:
    remaining = requests
    deadline = None if duration_s is None else time.perf_counter() + duration_s

    async def caller() -> None:
        nonlocal remaining
        while remaining is None or remaining > 0:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            if remaining is not None:
                remaining -= 1
            await send()

    callers = concurrency if requests is None else min(concurrency, requests)
    async with asyncio.TaskGroup() as group:
        for _ in range(callers):
            group.create_task(caller())


async def _open_loop(
    send: Callable[[], Coroutine[Any, Any, None]],
    rate: float,
    requests: int | None,
    duration_s: float | None,
    seed: int | None,
) -> float:
    """Send on the seeded Poisson schedule; return the latest a send went out after its time.

    Send times are absolute offsets from the start, so a late wake-up delays one send and
    does not shift the rest.
    """
    lag = 0.0
    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for sent, offset in enumerate(arrival_offsets(rate, seed)):
            if requests is not None and sent >= requests:
                break
            if duration_s is not None and offset >= duration_s:
                break
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = max(lag, time.perf_counter() - start - offset)
            group.create_task(send())
    return lag


async def discover_model(session: aiohttp.ClientSession, url: str, options: BenchOptions) -> str:
    """The first model ``GET /v1/models`` lists: what vLLM insists the body names."""
    base = url.rstrip("/")
    models_url = base + ("/models" if base.endswith("/v1") else "/v1/models")
    auth = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    try:
        async with session.get(
            models_url, headers=auth, timeout=aiohttp.ClientTimeout(total=30)
        ) as resp:
            if resp.status != 200:
                raise ModelNotFound(f"GET {models_url} answered {resp.status}")
            listing = await resp.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        raise ModelNotFound(f"GET {models_url} failed: {exc!r}") from None
    try:
        model = listing["data"][0]["id"]
    except (KeyError, IndexError, TypeError):
        model = None
    if not isinstance(model, str):
        raise ModelNotFound(f"GET {models_url} lists no model")
    return model
