"""Priority classes, tenant fairness and token budgets through the edge, real sockets.

One slot held by a request the replica answers only when the test puts a token in its
`steps`: the waiters behind it are then dispatched one at a time, and the replica's `seen`
list is the order of dispatch (deterministic: no sleep, no timing).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.config import ApiKey, AuthConfig, Config, SchedulingConfig
from tests.integration.conftest import FakeReplica, Proxy, make_config, until

Factory = Callable[..., Any]
COMPLETIONS = "/v1/completions"
KEYS = {"web": "sk-web-0123456789abcdef", "etl": "sk-etl-0123456789abcdef",
        "big": "sk-big-0123456789abcdef", "small": "sk-small-0123456789abcd"}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def with_keys(config: Config, *keys: ApiKey, **scheduling: Any) -> Config:
    return dataclasses.replace(config, auth=AuthConfig(api_keys=keys),
                               scheduling=dataclasses.replace(SchedulingConfig(), **scheduling))


def dispatched(replica: FakeReplica) -> list[str]:
    """The ``who`` of each request the replica has seen, in the order it got them."""
    return [json.loads(body).get("who", "") for _, _, body in replica.seen]


async def queued(p: Proxy, n: int) -> None:
    await until(lambda: p.scheduler.queue_depth == n, f"{n} queued")


async def release_one(r: FakeReplica) -> None:
    """Answer the request the replica holds; the next waiter arrives in its place."""
    seen = len(r.seen)
    r.steps.put_nowait(None)
    await until(lambda: len(r.seen) == seen + 1, "the next one dispatched")


async def hold_the_slot(client: aiohttp.ClientSession, p: Proxy, r: FakeReplica,
                        headers: dict[str, str]) -> asyncio.Task[aiohttp.ClientResponse]:
    held = asyncio.create_task(client.post(p.url + COMPLETIONS, headers=headers,
                                           json={"step": True, "who": "first"}))
    await until(lambda: r.in_flight == 1, "the only slot held")
    return held


async def test_an_unknown_class_is_400_before_the_body_is_read(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1)))
    async with client.post(p.url + COMPLETIONS, json={},
                           headers={"X-Batchgate-Class": "vip"}) as answer:
        assert answer.status == 400
        body = await answer.json()
    assert body["error"]["code"] == "bad_request"
    assert body["error"]["message"] == (
        "X-Batchgate-Class must be one of interactive, standard, batch, got 'vip'")
    assert r.arrivals == 0
    async with client.post(p.url + COMPLETIONS, json={},
                           headers={"X-Batchgate-Class": "batch"}) as answer:
        assert answer.status == 200


async def test_a_keys_class_puts_its_requests_ahead_and_the_header_overrides_it(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    config = with_keys(make_config(("r", r.url, 1)), ApiKey("web", KEYS["web"], "interactive"),
                       ApiKey("etl", KEYS["etl"], "batch"))
    p: Proxy = await proxy(config)
    held = await hold_the_slot(client, p, r, bearer("etl"))
    waiting = []
    for who, key, headers in [("etl-1", "etl", {}), ("etl-2", "etl", {}),
                              ("web", "web", {}),
                              ("etl-urgent", "etl", {"X-Batchgate-Class": "interactive"})]:
        waiting.append(asyncio.create_task(client.post(
            p.url + COMPLETIONS, headers={**bearer(key), **headers}, json={"who": who})))
        await queued(p, len(waiting))
    assert p.metric("batchgate_queue_depth", **{"class": "batch", "model": ""}) == 2
    assert p.metric("batchgate_queue_depth", **{"class": "interactive", "model": ""}) == 2
    r.steps.put_nowait(None)
    for task in (held, *waiting):
        assert (await task).status == 200
    # Interactive first (in arrival order), then batch.
    assert dispatched(r) == ["first", "web", "etl-urgent", "etl-1", "etl-2"]
    assert p.metric("batchgate_queue_wait_seconds_count", **{"class": "interactive"}) == 2
    assert p.metric("batchgate_queue_wait_seconds_count", **{"class": "batch"}) == 3  # + first


async def test_two_backlogged_tenants_share_dispatches_by_their_weights(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    config = with_keys(make_config(("r", r.url, 1)), ApiKey("big", KEYS["big"], weight=3),
                       ApiKey("small", KEYS["small"]))
    p: Proxy = await proxy(config)
    held = await hold_the_slot(client, p, r, bearer("small"))
    # The big tenant arrives first with all of its backlog: FIFO would serve it all first.
    waiting = []
    for who in ["big"] * 12 + ["small"] * 12:
        waiting.append(asyncio.create_task(client.post(
            p.url + COMPLETIONS, headers=bearer(who), json={"who": who, "step": True})))
        await queued(p, len(waiting))
    for _ in range(1 + 12):  # the first, then 12 dispatches while both are backlogged
        await release_one(r)
    shares = dispatched(r)[1:13]
    assert shares.count("big") == 9 and shares.count("small") == 3, shares
    for _ in range(24):
        r.steps.put_nowait(None)
    for task in (held, *waiting):
        assert (await task).status == 200


async def test_a_tenant_bound_refuses_its_own_next_request_not_the_others(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    config = with_keys(make_config(("r", r.url, 1)), ApiKey("big", KEYS["big"], max_queued=1),
                       ApiKey("small", KEYS["small"]))
    p: Proxy = await proxy(config)
    held = await hold_the_slot(client, p, r, bearer("small"))
    first = asyncio.create_task(client.post(p.url + COMPLETIONS, headers=bearer("big"),
                                            json={}))
    await until(lambda: p.scheduler.queue_depth == 1, "big's one request queued")
    async with client.post(p.url + COMPLETIONS, headers=bearer("big"), json={}) as answer:
        assert answer.status == 429
        assert (await answer.json())["error"]["code"] == "queue_full"
        assert "Retry-After" in answer.headers
    other = asyncio.create_task(client.post(p.url + COMPLETIONS, headers=bearer("small"),
                                            json={}))
    await until(lambda: p.scheduler.queue_depth == 2, "small still queues")
    r.steps.put_nowait(None)
    for task in (held, first, other):
        assert (await task).status == 200


async def test_a_token_budget_keeps_two_costly_requests_apart_and_refuses_one_too_large(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    config = make_config(("r", r.url, 4))
    config = dataclasses.replace(config, replicas=(
        dataclasses.replace(config.replicas[0], max_tokens_in_flight=100),))
    p: Proxy = await proxy(config)
    # Each costs 1 (a 4-character prompt) + 60: two would be 122 > 100.
    costly = {"prompt": "abcd", "max_tokens": 60, "hold": True}
    first = asyncio.create_task(client.post(p.url + COMPLETIONS, json=costly))
    await until(lambda: r.in_flight == 1, "the first runs")
    second = asyncio.create_task(client.post(p.url + COMPLETIONS, json=costly))
    await until(lambda: p.scheduler.queue_depth == 1, "the second waits: its cost does not fit")
    assert r.in_flight == 1  # a slot is free (max_concurrency 4), the budget is not
    async with client.get(p.url + "/admin/replicas") as shown:
        [entry] = await shown.json()
    assert (entry["tokens_in_flight"], entry["max_tokens_in_flight"]) == (61, 100)
    # Larger than the budget of an empty replica: 400 at once, never queued.
    async with client.post(p.url + COMPLETIONS,
                           json={"prompt": "abcd", "max_tokens": 500}) as answer:
        assert answer.status == 400
        assert (await answer.json())["error"]["code"] == "request_too_large"
    assert p.metric("batchgate_rejected_requests_total", reason="request_too_large") == 1
    r.gate.set()
    for task in (first, second):
        assert (await task).status == 200
    assert r.peak == 1  # never both at once


async def test_a_full_queue_evicts_the_newest_batch_waiter_for_an_interactive_one(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    config = with_keys(make_config(("r", r.url, 1), max_queue=2),
                       ApiKey("web", KEYS["web"], "interactive"),
                       ApiKey("etl", KEYS["etl"], "batch"))
    p: Proxy = await proxy(config)
    held = await hold_the_slot(client, p, r, bearer("etl"))
    older = asyncio.create_task(client.post(p.url + COMPLETIONS, headers=bearer("etl"),
                                            json={"who": "etl-old"}))
    await queued(p, 1)
    newest = asyncio.create_task(client.post(p.url + COMPLETIONS, headers=bearer("etl"),
                                             json={"who": "etl-new"}))
    await queued(p, 2)
    urgent = asyncio.create_task(client.post(p.url + COMPLETIONS, headers=bearer("web"),
                                             json={"who": "web"}))
    evicted = await newest  # told at once, while the others still wait
    assert evicted.status == 429
    assert (await evicted.json())["error"]["code"] == "queue_full"
    assert "Retry-After" in evicted.headers
    assert evicted.headers["X-Batchgate-Rejected"] == "queue_full"  # a tier in front resends
    assert p.scheduler.queue_depth == 2
    # Another batch request finds the queue full of equal or higher classes: refused itself.
    async with client.post(p.url + COMPLETIONS, headers=bearer("etl"), json={}) as answer:
        assert answer.status == 429
    r.steps.put_nowait(None)
    for task in (held, older, urgent):
        assert (await task).status == 200
    assert dispatched(r) == ["first", "web", "etl-old"]
