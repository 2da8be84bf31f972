"""``health.ready_without_replicas``: a gateway that holds requests while its engines scale
up from zero stays ready (in its Service), and an empty replica set is valid config: requests
wait for a replica until ``queue.timeout_s``."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from proxy.config import ConfigError, ReplicaConfig, parse_config
from proxy.edge.keys import RELOADER
from tests.integration.conftest import make_config, until

Factory = Callable[..., Any]
READY = {"ready_without_replicas": True}


def test_an_empty_replica_set_is_valid_only_with_the_key() -> None:
    config = parse_config({"replicas": [], "health": READY})
    assert config.replicas == () and config.health.ready_without_replicas
    assert parse_config({"replicas": [{"name": "a", "url": "http://h:1",
                                       "max_concurrency": 1}]}).health.ready_without_replicas \
        is False
    with pytest.raises(ConfigError, match=r"^config: replicas: must be a non-empty list of "
                       r"replicas \(or set health.ready_without_replicas: true"):
        parse_config({"replicas": []})
    with pytest.raises(ConfigError) as err:
        parse_config({"replicas": [], "health": {"ready_without_replicas": "yes"}})
    assert str(err.value) == ("config: health.ready_without_replicas: must be true or false, "
                              "got 'yes'")
    with pytest.raises(ConfigError) as err:
        parse_config({"replicas": [], "health": READY, "server": {"load_headers": 1}})
    assert str(err.value) == "config: server.load_headers: must be true or false, got 1"


async def test_ready_with_no_replica_and_requests_wait_until_the_queue_timeout(
    proxy: Factory, client: aiohttp.ClientSession
) -> None:
    p = await proxy(make_config(queue_timeout_s=0.3, health=READY))
    async with client.get(p.url + "/readyz") as resp:
        assert resp.status == 200
    async with client.post(p.url + "/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 503
        body = await resp.json()
        assert body["error"]["code"] == "no_healthy_replica"
        # Never delivered: a gateway in front may send it elsewhere.
        assert resp.headers["X-Batchgate-Rejected"] == "no_healthy_replica"
    # It waited, then gave up.
    assert p.metric("batchgate_queue_wait_seconds_count", **{"class": "standard"}) == 1


async def test_a_replica_added_while_requests_wait_serves_them(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    p = await proxy(make_config(queue_timeout_s=20.0, health=READY))
    waiting = asyncio.create_task(client.post(p.url + "/v1/completions", json={"prompt": "x"}))
    await until(lambda: p.scheduler.queue_depth == 1, "a request waits for any replica")
    engine = await replicas("e")
    new = dataclasses.replace(make_config(queue_timeout_s=20.0, health=READY),
                              replicas=(ReplicaConfig(name="e", url=engine.url,
                                                      max_concurrency=1),))
    p.app[RELOADER].load = lambda: new
    assert (await p.app[RELOADER].reload("test")).ok
    async with await waiting as resp:
        assert resp.status == 200
        assert (await resp.json())["replica"] == "e"


async def test_ready_while_every_replica_is_down_only_with_the_key(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    engine = await replicas("e")
    strict = await proxy(make_config(("e", engine.url, 1)))
    lenient = await proxy(make_config(("e", engine.url, 1), health=READY))
    for p in (strict, lenient):
        p.scheduler.set_healthy(p.scheduler.replicas[0], False)
    async with client.get(strict.url + "/readyz") as resp:
        assert resp.status == 503
    async with client.get(lenient.url + "/readyz") as resp:
        assert resp.status == 200
