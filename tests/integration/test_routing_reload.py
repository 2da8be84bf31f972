"""Issue 10's keys on live reload: models, token budgets, weights and bounds apply at once;
the list of classes needs a restart (409 from /admin/reload)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from proxy.config import ApiKey, AuthConfig, Config, DiscoveryConfig, SchedulingConfig
from proxy.control.reload import INVALID, REFUSED, SUCCESS
from proxy.edge.auth import AUTH
from proxy.edge.keys import RELOADER
from proxy.edge.route import ROUTING
from tests.integration.conftest import FakeReplica, FakeTime, Proxy, make_config, until

Factory = Callable[..., Any]
CHAT = "/v1/chat/completions"


def reload_to(p: Proxy, config: Config) -> None:
    p.app[RELOADER].load = lambda: config


def with_replica(config: Config, **keys: Any) -> Config:
    return dataclasses.replace(config, replicas=(dataclasses.replace(config.replicas[0], **keys),))


async def test_a_replicas_models_change_live_and_its_waiters_are_served(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    config = make_config(("a", a.url, 1), ("b", b.url, 1))
    config = dataclasses.replace(config, replicas=(
        dataclasses.replace(config.replicas[0], models=("chat",)),
        dataclasses.replace(config.replicas[1], models=("embed",))))
    p: Proxy = await proxy(config)
    held = asyncio.create_task(client.post(p.url + CHAT, json={"model": "chat", "hold": True}))
    await until(lambda: a.in_flight == 1, "a holds chat")
    waiting = asyncio.create_task(client.post(p.url + CHAT, json={"model": "chat"}))
    await until(lambda: p.scheduler.queue_depth == 1, "a chat request waits")
    async with client.post(p.url + CHAT, json={"model": "qwen"}) as r:
        assert r.status == 404
    # b serves chat too from now: the waiter goes to it at once; qwen is now served.
    new = dataclasses.replace(config, replicas=(
        config.replicas[0], dataclasses.replace(config.replicas[1],
                                                models=("embed", "chat", "qwen"))))
    reload_to(p, new)
    result = await p.app[RELOADER].reload("test")
    assert (result.result, result.message) == (SUCCESS, "b models/max_tokens_in_flight")
    answer = await waiting
    assert answer.status == 200 and (await answer.json())["replica"] == "b"
    async with client.post(p.url + CHAT, json={"model": "qwen"}) as r:
        assert r.status == 200
    a.gate.set()
    (await held).release()


async def test_a_token_budget_added_live_applies_to_the_next_request(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    config = make_config(("a", a.url, 4))
    p: Proxy = await proxy(config)
    big = {"prompt": "abcd", "max_tokens": 500}
    async with client.post(p.url + CHAT, json=big) as r:
        assert r.status == 200  # no budget yet: the body is not even parsed
    assert not p.app[ROUTING].needs_demand
    reload_to(p, with_replica(config, max_tokens_in_flight=100))
    assert (await p.app[RELOADER].reload("test")).result == SUCCESS
    assert p.scheduler.replicas[0].max_tokens == 100 and p.app[ROUTING].budgeted
    async with client.post(p.url + CHAT, json=big) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "request_too_large"


async def test_switching_a_replica_to_auto_reads_its_list_with_the_next_probe(
    replicas: Factory, proxy: Factory
) -> None:
    a: FakeReplica = await replicas("a")
    a.model_ids = ["llama", "qwen"]
    time = FakeTime()
    config = with_replica(make_config(("a", a.url, 1)), models=("llama",))
    p: Proxy = await proxy(config, timing=time.timing())
    replica = p.scheduler.replicas[0]
    await until(lambda: p.health.probes(replica) == 1, "its first probe applied")
    reload_to(p, with_replica(config, models="auto"))
    assert (await p.app[RELOADER].reload("test")).result == SUCCESS
    assert replica.models == frozenset({"llama"}) and a.models_hits == 0  # kept until read
    time.advance(60 * 1.1)
    await until(lambda: p.health.model_reads == 1, "the list read with the next probe")
    assert replica.models == frozenset({"llama", "qwen"})


async def test_weights_and_tenant_bounds_change_live(
    replicas: Factory, proxy: Factory
) -> None:
    a: FakeReplica = await replicas("a")
    config = dataclasses.replace(make_config(("a", a.url, 1)), auth=AuthConfig(
        api_keys=(ApiKey("t", "sk-t-0123456789abcdef"),)))
    p: Proxy = await proxy(config)
    assert p.scheduler.tenants.weights == {} and p.scheduler.tenants.default_max_queued == 0
    reload_to(p, dataclasses.replace(
        config, auth=AuthConfig(api_keys=(ApiKey("t", "sk-t-0123456789abcdef", weight=4,
                                                 max_queued=3),)),
        scheduling=SchedulingConfig(max_queued_per_tenant=10)))
    assert (await p.app[RELOADER].reload("test")).result == SUCCESS
    policy = p.scheduler.tenants
    assert (policy.weights, policy.max_queued, policy.default_max_queued) == (
        {"t": 4.0}, {"t": 3}, 10)


async def test_the_list_of_classes_needs_a_restart(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    config = make_config(("a", a.url, 1))
    p: Proxy = await proxy(config, load=lambda: config)
    reload_to(p, dataclasses.replace(config, scheduling=SchedulingConfig(
        classes=("gold", "standard"))))
    async with client.post(p.url + "/admin/reload") as r:
        assert r.status == 409
        body = await r.json()
    assert body["error"]["code"] == "cannot_change_live"
    assert "scheduling.classes" in body["error"]["message"]
    assert (await p.app[RELOADER].reload("test")).result == REFUSED


async def test_a_keys_file_that_names_an_unknown_class_refuses_the_reload(
    replicas: Factory, proxy: Factory, tmp_path: Path
) -> None:
    a: FakeReplica = await replicas("a")
    keys = tmp_path / "keys"
    keys.write_text("t:sk-t-0123456789abcdef class=batch\n")
    config = dataclasses.replace(make_config(("a", a.url, 1)),
                                 auth=AuthConfig(api_keys_file=str(keys)))
    p: Proxy = await proxy(config)
    # The file edited behind the config's back: the key ring re-reads it and refuses.
    keys.write_text("t:sk-t-0123456789abcdef class=gold\n")
    reload_to(p, config)
    result = await p.app[RELOADER].reload("test")
    assert result.result == INVALID
    assert "class: must be one of scheduling.classes" in result.message
    assert p.app[AUTH].keys[0].klass == "batch"  # the ring in force stays


async def test_discovered_replicas_inherit_models_and_budget_and_follow_the_entry(
    replicas: Factory, proxy: Factory
) -> None:
    a: FakeReplica = await replicas("a")
    port = int(a.url.rsplit(":", 1)[1])
    entry = DiscoveryConfig(dns="vllm.llm.svc", port=port, max_concurrency=1,
                            name_prefix="vllm", models=("chat",), max_tokens_in_flight=50)
    config = dataclasses.replace(make_config(), discovery=(entry,))

    async def lookup(_entry: DiscoveryConfig) -> frozenset[str]:
        return frozenset({"127.0.0.1"})

    time = FakeTime()
    p: Proxy = await proxy(config, lookup=lookup, discovery_timing=FakeTime().timing(),
                           timing=time.timing())
    await until(lambda: len(p.scheduler.replicas) == 1, "the address found")
    found = p.scheduler.replicas[0]
    await until(lambda: p.health.probes(found) == 1, "its first probe applied")
    assert (found.models, found.max_tokens, found.models_pending) == (
        frozenset({"chat"}), 50, False)
    # The entry switches to auto: the replica's list is read with its next probe.
    a.model_ids = ["chat", "qwen"]
    reload_to(p, dataclasses.replace(config, discovery=(dataclasses.replace(
        entry, models="auto", max_tokens_in_flight=None),)))
    assert (await p.app[RELOADER].reload("test")).result == SUCCESS
    await until(lambda: found.max_tokens is None, "the entry's budget gone from its replica")
    assert a.models_hits == 0 and found.models == frozenset({"chat"})
    time.advance(60 * 1.1)
    await until(lambda: found.models == frozenset({"chat", "qwen"}), "its list read")
