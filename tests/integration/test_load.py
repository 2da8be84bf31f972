"""A sidecar's load, told to a gateway: ``server.load_headers`` on every proxied answer,
``GET /load`` always; a gateway prefers the sidecar with the most room by the freshest
reading (headers on each answer, else a poll of ``/load`` every ``health.interval_s``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.config import ApiKey, AuthConfig
from proxy.control.loadpoll import LOAD_POLLER
from proxy.edge.keys import RELOADER
from tests.integration.conftest import FakeTime, make_config, until

Factory = Callable[..., Any]
LOAD_HEADERS = ("X-Batchgate-In-Flight", "X-Batchgate-Max-Concurrency",
                "X-Batchgate-Queue-Depth")
HOLD = {"prompt": "x", "hold": True}


async def test_load_headers_on_every_proxied_answer(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    engine = await replicas("e")
    sidecar = await proxy(make_config(("e", engine.url, 2), load_headers=True))
    held = asyncio.create_task(client.post(sidecar.url + "/v1/completions", json=HOLD))
    await until(lambda: engine.in_flight == 1, "one request in flight")
    async with client.post(sidecar.url + "/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 200
        # As of its headers: itself and the held one in flight, of 2 slots, none waiting.
        assert [resp.headers[h] for h in LOAD_HEADERS] == ["2", "2", "0"]
    async with client.get(sidecar.url + "/version") as resp:  # slot-free: relayed too
        assert [resp.headers[h] for h in LOAD_HEADERS] == ["1", "2", "0"]
    engine.gate.set()
    async with await held as resp:
        assert resp.headers["X-Batchgate-In-Flight"] == "1"


async def test_no_load_headers_by_default(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    engine = await replicas("e")
    p = await proxy(make_config(("e", engine.url, 2)))
    async with client.post(p.url + "/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 200
        assert not any(h in resp.headers for h in LOAD_HEADERS)


async def test_load_headers_change_by_a_reload(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    engine = await replicas("e")
    p = await proxy(make_config(("e", engine.url, 2)))
    p.app[RELOADER].load = lambda: make_config(("e", engine.url, 2), load_headers=True)
    result = await p.app[RELOADER].reload("test")
    assert result.ok, result.message
    async with client.post(p.url + "/v1/completions", json={"prompt": "x"}) as resp:
        assert [resp.headers[h] for h in LOAD_HEADERS] == ["1", "2", "0"]


async def test_get_load_is_json_and_public(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    engine = await replicas("e")
    config = make_config(("e", engine.url, 1), max_queue=5)
    # With auth on, /load needs no key (gateways and autoscalers poll it, like /readyz).
    config = config.__class__(**{**{f: getattr(config, f) for f in config.__slots__},
                                 "auth": AuthConfig(api_keys=(ApiKey("t", "k-1"),))})
    p = await proxy(config)
    async with client.get(p.url + "/load") as resp:
        assert resp.status == 200
        assert await resp.json() == {"in_flight": 0, "max_concurrency": 1, "queue_depth": 0}
    auth = {"Authorization": "Bearer k-1"}
    held = [asyncio.create_task(client.post(p.url + "/v1/completions", json=HOLD,
                                            headers=auth)) for _ in range(3)]
    await until(lambda: p.scheduler.queue_depth == 2, "one in flight, two queued")
    async with client.get(p.url + "/load") as resp:
        assert await resp.json() == {"in_flight": 1, "max_concurrency": 1, "queue_depth": 2}
    assert engine.arrivals == 1  # /load is answered by batchgate, never proxied
    engine.gate.set()
    for task in held:
        async with await task as resp:
            assert resp.status == 200


async def test_a_gateway_prefers_the_sidecar_with_the_most_room(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    engine_a, engine_b = await replicas("ea"), await replicas("eb")
    sidecar_a = await proxy(make_config(("ea", engine_a.url, 1), max_queue=5, load_headers=True))
    sidecar_b = await proxy(make_config(("eb", engine_b.url, 1), max_queue=5, load_headers=True))
    fake = FakeTime()
    gateway = await proxy(make_config(("a", sidecar_a.url, 4), ("b", sidecar_b.url, 4),
                                      health_interval_s=60.0), timing=fake.timing())
    board = gateway.scheduler.load
    # Readings from answers: the first request of each sidecar tells the gateway it is one.
    for _ in range(2):
        async with client.post(gateway.url + "/v1/completions", json={"prompt": "x"}) as resp:
            assert resp.status == 200
    assert set(board.readings) == {"a", "b"}
    # Sidecar a gets busy behind the gateway's back (other gateways): 1 in flight, 2 queued.
    direct = [asyncio.create_task(client.post(sidecar_a.url + "/v1/completions", json=HOLD))
              for _ in range(3)]
    await until(lambda: sidecar_a.scheduler.queue_depth == 2, "sidecar a has a backlog")
    # A poll interval later, neither has answered anything: both are polled.
    poller = gateway.app[LOAD_POLLER]
    rounds = poller.rounds
    fake.advance(60.0)
    await until(lambda: poller.rounds > rounds, "a poll round")
    assert board.room(gateway.scheduler.replicas[0]) == -2
    assert board.room(gateway.scheduler.replicas[1]) == 1
    # The local view has both idle (and round-robin would say a): the readings say b.
    for _ in range(3):
        async with client.post(gateway.url + "/v1/completions", json={"prompt": "x"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["replica"] == "eb"
    assert engine_a.arrivals == 2  # the first request, and the direct one in flight
    engine_a.gate.set()
    for task in direct:
        async with await task as resp:
            assert resp.status == 200


async def test_a_plain_engine_is_never_polled(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    engine = await replicas("e")
    fake = FakeTime()
    p = await proxy(make_config(("e", engine.url, 2), health_interval_s=1.0),
                    timing=fake.timing())
    async with client.post(p.url + "/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 200
    poller = p.app[LOAD_POLLER]
    fake.advance(10.0)
    # No batchgate among its replicas: the poller waits for one, and never sleeps or asks.
    assert poller.rounds == 0 and not p.scheduler.load.batchgates
    async with client.get(p.url + "/readyz") as resp:  # a loop turn for any stray poll
        assert resp.status == 200
    assert [path for _, path, _ in engine.seen] == ["/v1/completions"]
