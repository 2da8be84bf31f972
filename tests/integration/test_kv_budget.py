"""A token budget keeps a KV-limited engine from preempting; a count-only cap does not.

The simulated engine (``simulated.kv_tokens: 1000``) runs in-process behind batchgate. Each
request costs 550 tokens (450 prompt token ids, ``max_tokens: 100``): one fits, two do not
once both have generated some 50 tokens. With ``max_concurrency: 2`` alone, the second is
sent while the first is still generating (right after the first's first token, about 1 s
before it ends) and the engine must preempt one. With ``max_tokens_in_flight: 1000`` too,
batchgate holds the second until the first has finished: no preemption.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.config import Config, ReplicaConfig, ServerConfig, SimulatedConfig
from proxy.server import embedded_replicas
from tests.integration.conftest import BOUND_S, Proxy

Factory = Callable[..., Any]
BODY = {"model": "sim", "prompt": [7] * 450, "max_tokens": 100, "stream": True}


async def preemptions(client: aiohttp.ClientSession, engine_url: str) -> float:
    async with client.get(engine_url + "/metrics") as answer:
        text = await answer.text()
    line = next(line for line in text.splitlines()
                if line.startswith("vllm:num_preemptions_total{"))
    return float(line.rsplit(" ", 1)[1])


async def two_overlapping(p: Proxy, client: aiohttp.ClientSession) -> list[bytes]:
    """The second request is sent once the first's first token is in."""
    url = p.url + "/v1/completions"
    async with asyncio.timeout(BOUND_S * 2):
        first = await client.post(url, json=BODY)
        head = await first.content.readuntil(b"\n\n")
        second = await client.post(url, json=BODY)
        bodies = [head + await first.read(), await second.read()]
        first.release()
        second.release()
    return bodies


async def run(proxy: Factory, client: aiohttp.ClientSession, **replica: Any) -> float:
    config = Config(
        replicas=(ReplicaConfig(name="sim", **replica, simulated=SimulatedConfig(
            max_batch=8, time_scale=0.5, kv_tokens=1000)),),
        server=ServerConfig(host="127.0.0.1", port=0),
    )
    async with embedded_replicas(config) as resolved:
        p: Proxy = await proxy(resolved)
        engine_url = resolved.replicas[0].url
        assert engine_url is not None
        bodies = await two_overlapping(p, client)
        assert all(body.endswith(b"data: [DONE]\n\n") for body in bodies)
        return await preemptions(client, engine_url)


async def test_a_count_only_cap_lets_the_engine_preempt(
    proxy: Factory, client: aiohttp.ClientSession
) -> None:
    assert await run(proxy, client, max_concurrency=2) > 0


async def test_a_token_budget_keeps_the_engine_from_preempting(
    proxy: Factory, client: aiohttp.ClientSession
) -> None:
    fields = {f.name for f in dataclasses.fields(ReplicaConfig)}
    assert "max_tokens_in_flight" in fields
    assert await run(proxy, client, max_concurrency=2, max_tokens_in_flight=1000) == 0
