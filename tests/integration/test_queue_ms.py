"""X-Batchgate-Queue-Ms: the time a request waited for a slot, on the scheduler's clock.

The scheduler's clock is the test's (``create_app(clock=...)``): the wait is exactly what the
test advanced it by, whatever the machine's speed, and nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from tests.integration.conftest import FakeReplica, Proxy, make_config, until

Factory = Callable[..., Any]
COMPLETIONS = "/v1/completions"
QUEUE_MS = "X-Batchgate-Queue-Ms"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_held_back_request_says_how_long_it_waited_one_served_at_once_says_0(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    clock = Clock()
    p: Proxy = await proxy(make_config(("r", r.url, 1)), clock=clock)
    first = asyncio.create_task(client.post(p.url + COMPLETIONS, json={"hold": True}))
    await until(lambda: r.in_flight == 1, "the slot held")
    second = asyncio.create_task(client.post(p.url + COMPLETIONS, json={}))
    await until(lambda: p.scheduler.queue_depth == 1, "the second request queued")
    clock.now += 1.25  # exact in binary: 1250 ms, no rounding at stake
    r.gate.set()
    async with await first as answer:
        assert answer.status == 200
        assert answer.headers[QUEUE_MS] == "0"
    async with await second as answer:
        assert answer.status == 200
        assert answer.headers[QUEUE_MS] == "1250"


async def test_a_rejection_after_waiting_says_the_wait_one_at_the_door_says_0(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    clock = Clock()
    p: Proxy = await proxy(make_config(("r", r.url, 1), max_queue=1, queue_timeout_s=2.0),
                           clock=clock)
    held = asyncio.create_task(client.post(p.url + COMPLETIONS, json={"hold": True}))
    await until(lambda: r.in_flight == 1, "the slot held")
    waiting = asyncio.create_task(client.post(p.url + COMPLETIONS, json={}))
    await until(lambda: p.scheduler.queue_depth == 1, "one waiter")
    async with client.post(p.url + COMPLETIONS, json={}) as full:
        assert full.status == 429
        assert full.headers["X-Batchgate-Rejected"] == "queue_full"
        assert full.headers[QUEUE_MS] == "0"
    clock.now += 2.5
    p.scheduler.expire()  # the deadline passed on the scheduler's clock
    async with await waiting as answer:
        assert answer.status == 503
        assert answer.headers[QUEUE_MS] == "2500"
    r.gate.set()
    (await held).release()


async def test_slot_free_requests_carry_no_queue_ms(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1)))
    async with client.get(p.url + "/v1/models") as answer:
        assert answer.status == 200
        assert QUEUE_MS not in answer.headers
