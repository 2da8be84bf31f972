"""A wedged engine: streams that produce nothing for ``health.stall_s`` are cut, slots freed.

Real sockets; the stall watch runs on a :class:`FakeTime`: ``look`` advances it by one period of
the watch and waits until the watch has looked (no real time passes).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp

from tests.integration.conftest import FakeReplica, FakeTime, Proxy, make_config, until

Factory = Callable[..., Any]


async def look(p: Proxy, time: FakeTime) -> None:
    """One period of the watch: min(health.interval_s, health.stall_s / 4)."""
    looks = p.health.looks
    time.advance(min(p.health.config.interval_s, p.health.config.stall_s / 4))
    await until(lambda: p.health.looks == looks + 1, "the stall watch looked")


async def open_stream(client: aiohttp.ClientSession, p: Proxy,
                      spec: dict[str, Any]) -> aiohttp.ClientResponse:
    resp = await client.post(p.url + "/v1/completions", json={"stream": True, **spec})
    assert resp.status == 200
    assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")  # its first event
    return resp


async def rest(resp: aiohttp.ClientResponse) -> bytes:
    async with resp:
        return await resp.read()


async def test_wedged_replica_streams_end_with_an_error_and_free_their_slots(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    time = FakeTime()
    p: Proxy = await proxy(make_config(("a", a.url, 2), ("b", b.url, 1)), timing=time.timing())
    replica = p.scheduler.replicas[0]
    # a gets two streams and its engine hangs after one event of each; b holds a request
    # that is not a stream (a long generation says nothing until it is done).
    first = await open_stream(client, p, {"hold": True})
    long = asyncio.create_task(client.post(p.url + "/v1/completions", json={"hold": True}))
    await until(lambda: b.in_flight == 1, "b busy")
    second = await open_stream(client, p, {"hold": True})
    assert a.in_flight == 2
    for _ in range(4):  # 60 s, but each stream's first byte was seen at the first look
        await look(p, time)
    assert replica.health == "healthy" and replica.in_flight == 2
    await look(p, time)  # 60 s since: wedged
    assert replica.health == "unhealthy"
    for body in await asyncio.gather(rest(first), rest(second)):
        event, data = body.split(b"\n", 1)
        assert event == b"event: error"
        error = json.loads(data.removeprefix(b"data: "))["error"]
        assert error["code"] == "upstream_timeout"
        assert "health.stall_s" in error["message"]
    await until(lambda: replica.in_flight == 0 and a.in_flight == 0, "slots and engine freed")
    assert a.aborted == 2
    assert p.metric("batchgate_upstream_errors_total", replica="a", kind="timeout") == 2
    assert p.metric("batchgate_client_disconnects_total", stage="streaming") == 0
    assert p.scheduler.replicas[1].health == "healthy"
    b.gate.set()
    async with await long as resp:
        assert resp.status == 200


async def test_one_stream_making_progress_keeps_its_replica(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    time = FakeTime()
    p: Proxy = await proxy(make_config(("a", a.url, 2), health={"stall_s": 30}),
                           timing=time.timing())
    replica = p.scheduler.replicas[0]
    stuck = await open_stream(client, p, {"hold": True})
    moving = await open_stream(client, p, {"step": True, "events": 100})
    for _ in range(8):  # 60 s: the stuck one alone is not a wedged engine
        a.steps.put_nowait(None)
        await moving.content.readuntil(b"\n\n")
        await look(p, time)
    assert replica.health == "healthy" and replica.in_flight == 2
    for _ in range(3):  # 22.5 s of silence
        await look(p, time)
    assert replica.health == "healthy"
    await look(p, time)  # 30 s (stall_s) since the last progress was seen
    assert replica.health == "unhealthy"
    for resp in (stuck, moving):
        assert (await rest(resp)).startswith(b"event: error\n")
    await until(lambda: replica.in_flight == 0, "slots freed")
