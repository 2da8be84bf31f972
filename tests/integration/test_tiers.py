"""Two tiers of batchgate: a gateway in front of sidecars.

A sidecar marks its own rejections of requests that never reached its engine with
``X-Batchgate-Rejected: <reason>``; a gateway that gets such an answer treats the request as
never delivered and sends it to another replica, within ``upstream.retries``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.edge.keys import LIFECYCLE, UPSTREAMS
from tests.integration.conftest import FakeReplica, Proxy, make_config, until

Factory = Callable[..., Any]
REJECTED = "X-Batchgate-Rejected"


def _hold() -> dict[str, Any]:
    return {"json": {"prompt": "x", "hold": True}}


async def _full_sidecar(proxy: Factory, replicas: Factory, client: aiohttp.ClientSession,
                        name: str, *, max_queue: int = 0) -> tuple[Proxy, FakeReplica,
                                                                   asyncio.Task[Any]]:
    """A sidecar (a batchgate with one slot) whose one slot is held by a direct request."""
    engine = await replicas(name)
    sidecar = await proxy(make_config((name, engine.url, 1), max_queue=max_queue,
                                      queue_timeout_s=0.2))
    held = asyncio.create_task(client.post(sidecar.url + "/v1/completions", **_hold()))
    await until(lambda: engine.in_flight == 1, "the sidecar's one slot is taken")
    return sidecar, engine, held


async def test_own_rejections_carry_the_rejected_header(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    sidecar, engine, held = await _full_sidecar(proxy, replicas, client, "e")
    async with client.post(sidecar.url + "/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 429
        assert resp.headers[REJECTED] == "queue_full"
    engine.gate.set()
    async with await held as resp:
        assert resp.status == 200
        assert REJECTED not in resp.headers  # a relayed answer is not a rejection


async def test_queue_timeout_and_no_healthy_replica_carry_the_header(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    sidecar, engine, held = await _full_sidecar(proxy, replicas, client, "e", max_queue=5)
    async with client.post(sidecar.url + "/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 503
        assert resp.headers[REJECTED] == "queue_timeout"
    sidecar.scheduler.set_healthy(sidecar.scheduler.replicas[0], False)
    engine.gate.set()
    async with await held as resp:
        assert resp.status == 200
    async with client.post(sidecar.url + "/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 503
        assert resp.headers[REJECTED] == "no_healthy_replica"


async def test_a_replicas_own_503_and_an_upstream_error_carry_no_header(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    engine = await replicas("e")
    engine.answer_status = 503
    p = await proxy(make_config(("e", engine.url, 1)))
    async with client.post(p.url + "/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 503
        assert REJECTED not in resp.headers  # the engine's 503: it was delivered
    dead = await proxy(make_config(("gone", "http://127.0.0.1:9", 1), retries=0))
    async with client.post(dead.url + "/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 502
        assert REJECTED not in resp.headers  # batchgate's, but about the replica's failure


async def test_a_gateway_resends_a_rejected_request_to_another_replica(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    sidecar, engine, held = await _full_sidecar(proxy, replicas, client, "a-engine")
    other = await replicas("b")
    gateway = await proxy(make_config(("a", sidecar.url, 4), ("b", other.url, 4)))
    # One request held on b: in the gateway's own view, the full sidecar a is now the less
    # loaded replica, so a resend that did not prefer another replica would go back to it.
    on_b = asyncio.create_task(client.post(gateway.url + "/v1/completions", **_hold()))
    await until(lambda: other.in_flight == 1, "a request held on b")
    async with client.post(gateway.url + "/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 200, await resp.text()
        assert REJECTED not in resp.headers
        assert (await resp.json())["replica"] == "b"
    assert engine.arrivals == 1  # only the request that holds the sidecar's slot
    assert other.arrivals == 2
    rejected = gateway.metric("batchgate_upstream_errors_total", replica="a", kind="rejected")
    assert rejected == sidecar.metric("batchgate_rejected_requests_total", reason="queue_full")
    assert rejected >= 1
    assert gateway.metric("batchgate_upstream_retries_total", replica="a") == rejected
    # The rejected answers were read to their end: their connections went back to the pool.
    pool = next(p for p in gateway.app[UPSTREAMS].pools() if p.name == "a")
    assert pool.active == 0 and pool.idle >= 1
    other.gate.set()
    engine.gate.set()
    for task in (on_b, held):
        async with await task as resp:
            assert resp.status == 200


async def test_retries_exhausted_relays_the_last_rejection(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    sidecar, engine, held = await _full_sidecar(proxy, replicas, client, "a-engine")
    gateway = await proxy(make_config(("a", sidecar.url, 4), retries=1,
                                      upstream={"eject_after": 1}))
    async with client.post(gateway.url + "/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 429
        assert resp.headers[REJECTED] == "queue_full"  # a tier in front may resend it too
        assert "Retry-After" in resp.headers
        body = json.loads(await resp.read())
        assert body["error"]["code"] == "queue_full"
    # Sent to the only replica twice (the resend prefers another one; there is none).
    assert sidecar.metric("batchgate_rejected_requests_total", reason="queue_full") == 2
    assert gateway.metric("batchgate_upstream_errors_total", replica="a", kind="rejected") == 2
    assert gateway.metric("batchgate_upstream_retries_total", replica="a") == 1
    assert engine.arrivals == 1
    # A full sidecar is not a failing one: no ejection, still healthy.
    assert gateway.scheduler.replicas[0].healthy
    assert gateway.metric("batchgate_replica_ejections_total", replica="a") == 0
    engine.gate.set()
    async with await held as resp:
        assert resp.status == 200


async def test_a_drain_cut_marks_only_the_request_that_never_reached_its_engine(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    engine = await replicas("e")
    p = await proxy(make_config(("e", engine.url, 1), max_queue=5))
    sent = asyncio.create_task(client.post(p.url + "/v1/completions", **_hold()))
    await until(lambda: engine.in_flight == 1, "one request at the engine")
    queued = asyncio.create_task(client.post(p.url + "/v1/completions", json={"prompt": "x"}))
    await until(lambda: p.scheduler.queue_depth == 1, "one request queued")
    lifecycle = p.app[LIFECYCLE]
    assert lifecycle.start_drain(0.0, 60.0, "test")  # refusing at once; cut by hand below
    assert lifecycle.cut() == 2
    async with await sent as resp:
        assert resp.status == 503
        # It may have reached the engine (it was sent): a gateway must not send it again.
        assert REJECTED not in resp.headers
    async with await queued as resp:
        assert resp.status == 503
        assert resp.headers[REJECTED] == "draining"  # it never left the queue
    await until(lambda: engine.in_flight == 0, "the engine saw its client leave")
