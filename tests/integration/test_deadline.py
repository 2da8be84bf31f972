"""Early refusal and the caller's deadline (X-Batchgate-Deadline-Ms), over real sockets.

The scheduler's clock is the test's: service times, deadlines and the estimate are exactly
what the test advanced it by; nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import FakeReplica, Proxy, make_config, until

Factory = Callable[..., Any]
COMPLETIONS = "/v1/completions"
DEADLINE = "X-Batchgate-Deadline-Ms"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def hold_one(r: FakeReplica, p: Proxy, client: aiohttp.ClientSession) -> Any:
    r.gate.clear()
    held = asyncio.create_task(client.post(p.url + COMPLETIONS, json={"hold": True}))
    await until(lambda: r.in_flight == 1, "the slot held")
    return held


async def test_a_request_that_cannot_start_before_its_deadline_is_refused_at_once(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    clock = Clock()
    p: Proxy = await proxy(make_config(("r", r.url, 1), queue_timeout_s=30.0), clock=clock)
    # History: one request held its slot 2 s on the scheduler's clock.
    held = await hold_one(r, p, client)
    clock.now += 2.0
    r.gate.set()
    (await held).release()
    held = await hold_one(r, p, client)
    ahead = [asyncio.create_task(client.post(p.url + COMPLETIONS, json={})) for _ in range(2)]
    await until(lambda: p.scheduler.queue_depth == 2, "two waiting")
    # Third in line: 2 ahead at one per 2 s is 4 s; a 3 s deadline cannot be met.
    async with client.post(p.url + COMPLETIONS, json={}, headers={DEADLINE: "3000"}) as answer:
        assert answer.status == 429
        body = await answer.json()
        assert body["error"]["code"] == "deadline_unreachable"
        assert body["error"]["type"] == "rate_limit_error"
        assert answer.headers["X-Batchgate-Rejected"] == "deadline_unreachable"
        assert answer.headers["Retry-After"] == "6"  # third in line at one per 2 s
        assert answer.headers["X-Batchgate-Queue-Ms"] == "0"
    assert p.scheduler.queue_depth == 2  # it never joined
    assert p.metric("batchgate_rejected_requests_total", reason="deadline_unreachable") == 1
    # A 5 s deadline can be met: it waits, and is served.
    reachable = asyncio.create_task(
        client.post(p.url + COMPLETIONS, json={}, headers={DEADLINE: "5000"}))
    await until(lambda: p.scheduler.queue_depth == 3, "the reachable one waiting")
    r.gate.set()
    for task in [held, *ahead, reachable]:
        async with await task as answer:
            assert answer.status == 200


async def test_the_callers_deadline_shortens_the_queue_timeout(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    clock = Clock()
    p: Proxy = await proxy(make_config(("r", r.url, 1), queue_timeout_s=30.0), clock=clock)
    held = await hold_one(r, p, client)
    short = asyncio.create_task(
        client.post(p.url + COMPLETIONS, json={}, headers={DEADLINE: "500"}))
    plain = asyncio.create_task(client.post(p.url + COMPLETIONS, json={}))
    await until(lambda: p.scheduler.queue_depth == 2, "both waiting")
    clock.now += 0.6
    p.scheduler.expire()
    async with await short as answer:
        assert answer.status == 503
        assert (await answer.json())["error"]["code"] == "queue_timeout"
        assert answer.headers["X-Batchgate-Queue-Ms"] == "600"
    assert p.scheduler.queue_depth == 1  # queue.timeout_s still holds the other
    r.gate.set()
    for task in (held, plain):
        async with await task as answer:
            assert answer.status == 200


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "soon", "", "12345678901", "١٢"])
async def test_a_bad_deadline_header_is_a_400(
    value: str, replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1)))
    async with client.post(p.url + COMPLETIONS, json={}, headers={DEADLINE: value}) as answer:
        assert answer.status == 400
        body = await answer.json()
        assert body["error"]["type"] == "invalid_request_error"
        assert DEADLINE in body["error"]["message"]
    assert r.arrivals == 0
