"""A caller that hangs up frees the engine's slot: no engine generates for nobody.

Each generation asked for here would take ~4 s to finish (4000 tokens at the end of a 4096
slot). The proof that the engine *aborted* rather than finished is its own decode counter:
``llamacpp:n_decode_total`` grows by one per decoded batch, and a lone generation decodes
one batch per token, so one that ran to the end adds exactly ``max_tokens``; an aborted one
adds fewer.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI, AsyncStream
from openai.types import Completion

from tests.e2e.harness import (
    CTX_PER_SLOT,
    METRIC_DEFERRED,
    METRIC_PROCESSING,
    REPLICAS,
    SLOTS,
    Scrape,
    Stack,
    engine_metrics,
    scrape,
    wait_for,
)

pytestmark = pytest.mark.e2e

LONG = CTX_PER_SLOT - 96  # leaves room for the prompt: the slot's whole context
DECODES = "llamacpp:n_decode_total"
CANCEL_LOGGED = "cancel task, id_task ="  # llama-server's log line when a client left


async def engines_sum(http: aiohttp.ClientSession, stack: Stack, name: str) -> float:
    scraped = await asyncio.gather(*(engine_metrics(http, e) for e in stack.engines))
    return sum(m[name] for m in scraped)


async def batchgate_metrics(http: aiohttp.ClientSession, stack: Stack) -> Scrape:
    return await scrape(http, stack.batchgate.url)


async def open_stream(sdk: AsyncOpenAI, i: int = 0) -> AsyncStream[Completion]:
    """A long streamed completion, returned once its first token has arrived."""
    stream = await sdk.completions.create(
        model="tiny-llama", prompt=f"hang up {i}", max_tokens=LONG, stream=True
    )
    first = await anext(aiter(stream))
    assert first.choices and first.choices[0].text
    return stream


def disconnects(m: Scrape, stage: str) -> float:
    return m.get("batchgate_client_disconnects_total", stage=stage)


async def test_streaming_caller_hanging_up_frees_the_engine_slot(
    stack: Stack, sdk: AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    decodes = await engines_sum(http, stack, DECODES)
    before = await batchgate_metrics(http, stack)

    stream = await open_stream(sdk)
    assert await engines_sum(http, stack, METRIC_PROCESSING) == 1
    await stream.close()  # the caller hangs up mid-stream

    async def slot_free() -> bool:
        return await engines_sum(http, stack, METRIC_PROCESSING) == 0

    await wait_for(slot_free, "the engine to free the slot of the caller that hung up")
    assert await engines_sum(http, stack, DECODES) - decodes < LONG, "it ran to the end"

    async def counted() -> bool:
        m = await batchgate_metrics(http, stack)
        return disconnects(m, "streaming") == disconnects(before, "streaming") + 1

    await wait_for(counted, "batchgate to count the disconnect (stage streaming)")


def engine_cancels(stack: Stack) -> int:
    """Tasks the engines cancelled because their client left, as their logs tell."""
    return sum(
        e.log_path.read_text(errors="replace").count(CANCEL_LOGGED)
        for e in stack.engines
        if e.log_path is not None
    )


async def test_caller_hanging_up_before_the_answer_frees_the_engine_slot(
    stack: Stack, sdk: AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    """A plain (not streamed) request: batchgate has nothing to write until the very end.

    llama-server notices that a plain request's client left only when its result queue has
    been silent for a whole second (``HTTP_POLLING_SECONDS``): every other result wakes the
    waiting thread and restarts that wait, and a ``/metrics`` scrape is a result too. So
    after the hang-up this test stays away from the engine (it watches batchgate's metrics
    and the engine's log) until the engine has cancelled the task. Under real load, where
    other streams produce results all the time, llama-server finishes such a generation for
    nobody; all a proxy can do is close the connection, which batchgate does.
    """
    decodes = await engines_sum(http, stack, DECODES)
    cancels = engine_cancels(stack)
    before = await batchgate_metrics(http, stack)
    call = asyncio.create_task(
        sdk.completions.create(model="tiny-llama", prompt="hang up", max_tokens=LONG)
    )
    try:
        async def generating() -> bool:
            return await engines_sum(http, stack, METRIC_PROCESSING) == 1

        await wait_for(generating, "the engine to start generating")
    finally:
        call.cancel()  # the caller hangs up while waiting for the first byte
        with contextlib.suppress(asyncio.CancelledError):
            await call

    async def let_go() -> bool:
        m = await batchgate_metrics(http, stack)
        stage = "waiting_first_byte"
        return (
            disconnects(m, stage) == disconnects(before, stage) + 1
            and m.total("batchgate_replica_in_flight") == 0
        )

    await wait_for(let_go, "batchgate to count the disconnect and free its slot")

    async def cancelled() -> bool:
        return engine_cancels(stack) > cancels

    await wait_for(cancelled, f"the engine to log {CANCEL_LOGGED!r} for the request")

    async def slot_free() -> bool:
        return await engines_sum(http, stack, METRIC_PROCESSING) == 0

    await wait_for(slot_free, "the engine to free the slot of the caller that hung up")
    assert await engines_sum(http, stack, DECODES) - decodes < LONG, "it ran to the end"


async def test_queued_callers_hanging_up_never_take_a_slot(
    stack: Stack, sdk: AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    """Fill all 8 slots with streams, queue 2 more, then everyone hangs up."""
    before = await batchgate_metrics(http, stack)
    streams = await asyncio.gather(*(open_stream(sdk, i) for i in range(len(REPLICAS) * SLOTS)))
    queued: list[asyncio.Task[Any]] = []
    try:
        for engine in await asyncio.gather(*(engine_metrics(http, e) for e in stack.engines)):
            assert (engine[METRIC_PROCESSING], engine[METRIC_DEFERRED]) == (SLOTS, 0)
        queued = [
            asyncio.create_task(
                sdk.completions.create(model="tiny-llama", prompt=f"q{i}", max_tokens=8)
            )
            for i in range(2)
        ]

        async def depth(n: int) -> bool:
            return (await batchgate_metrics(http, stack)).total("batchgate_queue_depth") == n

        await wait_for(lambda: depth(2), "two callers queued in batchgate")
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        await wait_for(lambda: depth(0), "the queue to empty as its callers hang up")

        m = await batchgate_metrics(http, stack)
        assert disconnects(m, "queued") == disconnects(before, "queued") + 2
        # Nobody was forwarded in their place: the slots are still the 8 streams'.
        assert m.total("batchgate_replica_in_flight") == len(REPLICAS) * SLOTS
        for engine in await asyncio.gather(*(engine_metrics(http, e) for e in stack.engines)):
            assert (engine[METRIC_PROCESSING], engine[METRIC_DEFERRED]) == (SLOTS, 0)
    finally:
        for task in queued:
            task.cancel()
        await asyncio.gather(*(s.close() for s in streams))

    async def all_free() -> bool:
        return await engines_sum(http, stack, METRIC_PROCESSING) == 0

    await wait_for(all_free, "both engines to free all 8 slots")

    async def counted() -> bool:
        m = await batchgate_metrics(http, stack)
        return disconnects(m, "streaming") == disconnects(before, "streaming") + len(streams)

    await wait_for(counted, "batchgate to count 8 disconnects (stage streaming)")
