"""Callers beyond capacity wait in batchgate, never in the engine.

24 long generations go to two engines with 4 slots each. While they run, a sampler scrapes
both engines' ``/metrics`` and batchgate's, back to back. The engine's own gauges are the
ground truth: ``llamacpp:requests_processing`` (busy slots) must never pass 4 and
``llamacpp:requests_deferred`` (requests the engine had to park for want of a slot) must
stay 0, while batchgate's queue holds the rest and both engines are seen saturated.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from openai import AsyncOpenAI

from tests.e2e.harness import (
    BOUND_S,
    METRIC_DEFERRED,
    METRIC_PROCESSING,
    REPLICAS,
    SLOTS,
    Observation,
    Stack,
    observe,
    scrape,
)

pytestmark = pytest.mark.e2e

CALLERS = 24  # three times the 8 slots: two thirds of the callers must queue
# One generation of 1000 tokens takes ~0.3 s alone; the three waves of 8 take ~5 s in all on
# 2 cores, long enough for about a hundred samples.
MAX_TOKENS = 1000


async def sample_until_cancelled(
    http: aiohttp.ClientSession, stack: Stack, samples: list[Observation]
) -> None:
    while True:
        samples.append(await observe(http, stack))
        await asyncio.sleep(0.01)


async def generate(sdk: AsyncOpenAI, i: int) -> int:
    """One in four is a streamed chat, the others plain completions; returns the tokens the
    caller got. Streams are kept few because the SDK parses every chunk in this process,
    which shares 2 cores with the engines and the sampler."""
    if i % 4:
        completion = await sdk.completions.create(
            model="tiny-llama", prompt=f"caller {i}", max_tokens=MAX_TOKENS
        )
        assert completion.usage is not None
        return completion.usage.completion_tokens
    stream = await sdk.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": f"caller {i}"}],
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    deltas = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            deltas += 1
    return deltas


async def test_callers_beyond_capacity_wait_in_batchgate_not_in_the_engines(
    stack: Stack, sdk: AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    before = await scrape(http, stack.batchgate.url)
    samples: list[Observation] = []
    sampler = asyncio.create_task(sample_until_cancelled(http, stack, samples))
    try:
        tokens = await asyncio.wait_for(
            asyncio.gather(*(generate(sdk, i) for i in range(CALLERS))), BOUND_S * 2
        )
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    assert tokens == [MAX_TOKENS] * CALLERS

    for n, s in enumerate(samples):
        for replica, engine in zip(REPLICAS, s.engines, strict=True):
            seen = f"sample {n}, {replica}: {engine}"
            assert engine[METRIC_PROCESSING] <= SLOTS, seen
            assert engine[METRIC_DEFERRED] == 0, seen
            assert s.batchgate.get("batchgate_replica_in_flight", replica=replica) <= SLOTS
        assert s.batchgate.total("batchgate_queue_depth") <= CALLERS - len(REPLICAS) * SLOTS

    # Saturation, seen from both sides: every slot of every engine busy at some point (the
    # proof that the samples above were taken while it mattered)...
    for i, replica in enumerate(REPLICAS):
        assert any(s.engines[i][METRIC_PROCESSING] == SLOTS for s in samples), replica
        assert any(
            s.batchgate.get("batchgate_replica_in_flight", replica=replica) == SLOTS
            for s in samples
        ), replica
    # ...while the callers that found no free slot waited in batchgate's queue.
    assert max(s.batchgate.total("batchgate_queue_depth") for s in samples) > 0

    after = await scrape(http, stack.batchgate.url)
    served = {
        r: after.total("batchgate_requests_total", replica=r, code="200")
        - before.total("batchgate_requests_total", replica=r, code="200")
        for r in REPLICAS
    }
    assert sum(served.values()) == CALLERS and all(served.values()), served
    assert after.total("batchgate_rejected_requests_total") == before.total(
        "batchgate_rejected_requests_total"
    )
