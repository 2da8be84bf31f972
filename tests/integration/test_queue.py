"""The queue on real sockets: Retry-After, deadlines, byte bounds, retries at the head."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from tests.integration.conftest import FakeReplica, Proxy, make_config, until

Factory = Callable[..., Any]


async def test_cold_proxy_says_retry_after_one_second(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    """No request has completed yet: there is no estimate, and 60 s would stall every SDK."""
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1), max_queue=1))
    busy = asyncio.create_task(client.post(p.url + "/v1/completions", json={"hold": True}))
    await until(lambda: r.in_flight == 1, "replica busy")
    waiting = asyncio.create_task(client.post(p.url + "/v1/completions", json={"x": 1}))
    await until(lambda: p.scheduler.queue_depth == 1, "one waiting")
    async with client.post(p.url + "/v1/completions", json={"x": 2}) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
    r.gate.set()
    for task in (busy, waiting):
        (await task).release()
