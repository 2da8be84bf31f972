"""Model routing at the edge, real sockets: a gateway in front of a "chat" and an "embed"
replica; `models: auto` read from the replicas; the model 404 and /v1/models.

Deterministic throughout: replicas hold requests on their gate (or `steps`), tests wait for
states (`until`), health probes run on a FakeTime the test advances.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.config import ApiKey, AuthConfig, Config
from tests.integration.conftest import FakeReplica, FakeTime, Proxy, make_config, until

Factory = Callable[..., Any]
CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"
INTERVAL = 60.0  # make_config's health.interval_s: the probe loop sleeps on FakeTime


def routed(config: Config, **replica: dict[str, Any]) -> Config:
    """``config`` with more keys on the named replicas (``chat={"models": ("chat",)}``)."""
    return dataclasses.replace(config, replicas=tuple(
        dataclasses.replace(r, **replica.get(r.name, {})) for r in config.replicas))


async def chat_and_embed(replicas: Factory, proxy: Factory, *, max_queue: int = 1000,
                         **more: Any) -> tuple[Proxy, FakeReplica, FakeReplica]:
    chat: FakeReplica = await replicas("chat")
    embed: FakeReplica = await replicas("embed")
    config = routed(make_config(("chat", chat.url, 1), ("embed", embed.url, 1),
                                max_queue=max_queue),
                    chat={"models": ("chat",)}, embed={"models": ("embed", "embed-v2")})
    return await proxy(config, **more), chat, embed


async def test_each_request_goes_to_a_replica_serving_its_model(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    p, chat, embed = await chat_and_embed(replicas, proxy)
    for model, path in [("chat", CHAT), ("embed", EMBED), ("embed-v2", EMBED), ("chat", CHAT)]:
        async with client.post(p.url + path, json={"model": model, "input": "x"}) as r:
            assert r.status == 200
            assert (await r.json())["replica"] == model.split("-")[0]
    assert (chat.arrivals, embed.arrivals) == (2, 2)


async def test_a_model_nobody_serves_is_404_without_a_slot_or_a_wait(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    p, chat, embed = await chat_and_embed(replicas, proxy, max_queue=1)
    # Both replicas full and the queue full: the 404 still comes at once, not a 429.
    held = [asyncio.create_task(client.post(p.url + CHAT, json={"model": m, "hold": True}))
            for m in ("chat", "embed")]
    await until(lambda: chat.in_flight == 1 and embed.in_flight == 1, "both slots held")
    waiting = asyncio.create_task(client.post(p.url + CHAT, json={"model": "chat"}))
    await until(lambda: p.scheduler.queue_depth == 1, "the queue full")
    async with client.post(p.url + CHAT, json={"model": "gpt-4o", "messages": []}) as r:
        assert r.status == 404
        body = await r.json()
        assert r.headers["X-Batchgate-Queue-Ms"] == "0"
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["type"] == "invalid_request_error"
    assert "gpt-4o" in body["error"]["message"]
    assert p.scheduler.queue_depth == 1 and p.scheduler.in_flight == 2
    assert p.metric("batchgate_rejected_requests_total", reason="model_not_found") == 1
    chat.gate.set()
    embed.gate.set()
    for task in (*held, waiting):
        (await task).release()
    assert (chat.arrivals, embed.arrivals) == (2, 1)  # the 404 reached no replica


async def test_no_head_of_line_blocking_across_models(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    """The chat replica full and its waiters filling the queue: an embedding request that
    finds a free slot goes at once, never refused for the full queue."""
    p, chat, _ = await chat_and_embed(replicas, proxy, max_queue=2)
    held = asyncio.create_task(client.post(p.url + CHAT, json={"model": "chat", "hold": True}))
    await until(lambda: chat.in_flight == 1, "chat's slot held")
    waiting = [asyncio.create_task(client.post(p.url + CHAT, json={"model": "chat"}))
               for _ in range(2)]
    await until(lambda: p.scheduler.queue_depth == 2, "chat's waiters fill the queue")
    async with client.post(p.url + EMBED, json={"model": "embed", "input": "x"}) as r:
        assert r.status == 200
        assert (await r.json())["replica"] == "embed"
    assert p.scheduler.queue_depth == 2
    assert p.metric("batchgate_queue_depth", **{"class": "standard", "model": "chat"}) == 2
    async with client.post(p.url + CHAT, json={"model": "chat"}) as r:
        assert r.status == 429  # chat's own waiters are bounded by queue.max_size
    chat.gate.set()
    for task in (held, *waiting):
        assert (await task).status == 200


async def test_models_lists_each_served_model_once_configured_or_not_listed(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    chat: FakeReplica = await replicas("chat")
    chat2: FakeReplica = await replicas("chat2")
    embed: FakeReplica = await replicas("embed")
    chat.model_ids = ["chat", "chat-lora"]  # lists one it is not configured for
    chat2.model_ids = ["chat"]  # the same model on a second replica
    embed.model_ids = ["embed"]
    config = routed(make_config(("chat", chat.url, 1), ("chat2", chat2.url, 1),
                                ("embed", embed.url, 1)),
                    chat={"models": ("chat",)}, chat2={"models": ("chat",)},
                    embed={"models": ("embed", "embed-alias")})
    p: Proxy = await proxy(config)
    async with client.get(p.url + "/v1/models") as r:
        assert r.status == 200
        ids = [m["id"] for m in (await r.json())["data"]]
    # chat once; chat-lora not routed there, so not listed; the alias no replica lists, once.
    assert sorted(ids) == ["chat", "embed", "embed-alias"]
    assert sorted(ids) == p.scheduler.models()


async def test_models_auto_is_read_at_startup_and_with_every_probe(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    a.model_ids = ["llama"]
    time = FakeTime()
    config = routed(make_config(("a", a.url, 2)), a={"models": "auto"})
    p: Proxy = await proxy(config, timing=time.timing())
    replica = p.scheduler.replicas[0]
    await until(lambda: p.health.model_reads == 1, "the list read at startup")
    assert replica.models == frozenset({"llama"}) and not replica.models_pending
    async with client.post(p.url + CHAT, json={"model": "qwen"}) as r:
        assert r.status == 404
    # The replica starts serving qwen: routed within one probe interval.
    a.model_ids = ["llama", "qwen"]
    time.advance(INTERVAL * 1.1)
    await until(lambda: p.health.model_reads == 2, "the list read with the next probe")
    assert replica.models == frozenset({"llama", "qwen"})
    async with client.post(p.url + CHAT, json={"model": "qwen"}) as r:
        assert r.status == 200
    async with client.get(p.url + "/admin/replicas") as r:  # what an operator sees
        [shown] = await r.json()
    assert (shown["models"], shown["models_pending"], shown["max_tokens_in_flight"],
            shown["tokens_in_flight"]) == (["llama", "qwen"], False, None, 0)
    # A failed read keeps the last list.
    a.models_status = 500
    time.advance(INTERVAL * 1.1)
    await until(lambda: p.health.model_read_failures == 1, "the next read failed")
    assert replica.models == frozenset({"llama", "qwen"})
    async with client.get(p.url + "/v1/models") as r:  # the replica's own answer is a 500
        assert r.status == 503


async def test_until_the_first_read_a_request_for_its_model_waits_instead_of_404(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    a.model_ids = ["llama"]
    a.models_gate = asyncio.Event()  # the list is slow to come
    config = routed(make_config(("a", a.url, 1)), a={"models": "auto"})
    p: Proxy = await proxy(config, timing=FakeTime().timing())
    replica = p.scheduler.replicas[0]
    await until(lambda: a.models_hits == 1, "the list asked for")
    assert replica.models_pending
    call = asyncio.create_task(client.post(p.url + CHAT, json={"model": "llama"}))
    await until(lambda: p.scheduler.queue_depth == 1, "it waits for the list")
    assert a.arrivals == 0
    a.models_gate.set()
    async with await call as r:
        assert r.status == 200
    assert not replica.models_pending and a.arrivals == 1


async def test_models_auto_reads_with_the_replicas_credential(
    replicas: Factory, proxy: Factory
) -> None:
    a: FakeReplica = await replicas("a")
    config = routed(make_config(("a", a.url, 1)), a={"models": "auto", "api_key": "engine-k"})
    config = dataclasses.replace(config, auth=AuthConfig(api_keys=(ApiKey("t", "k" * 16),)))
    p: Proxy = await proxy(config, timing=FakeTime().timing())
    await until(lambda: p.health.model_reads == 1, "the list read")
    assert a.models_headers[0]["Authorization"] == "Bearer engine-k"
