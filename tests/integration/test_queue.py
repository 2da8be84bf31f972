"""The queue on real sockets: Retry-After, deadlines, byte bounds, retries at the head."""

from __future__ import annotations

import asyncio
import dataclasses
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


async def test_queue_deadline_starts_when_the_request_joins_the_queue(
    replicas: Factory, proxy: Factory
) -> None:
    """An upload slower than queue.timeout_s still gets its full queue.timeout_s of waiting."""
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1), queue_timeout_s=0.5))
    async with aiohttp.ClientSession() as client:
        busy = asyncio.create_task(client.post(p.url + "/v1/completions", json={"hold": True}))
        await until(lambda: r.in_flight == 1, "replica busy")
        host, port = p.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            body = b'{"slow": "upload"}'
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                         b"Content-Type: application/json\r\nConnection: close\r\n\r\n%s"
                         % (len(body), body[:5]))
            await writer.drain()
            # The upload's own pace (the condition under test, not a synchronisation): it
            # takes longer than queue.timeout_s before the request can join the queue.
            await asyncio.sleep(0.7)
            writer.write(body[5:])
            await writer.drain()
            answer = asyncio.create_task(reader.read())
            await until(lambda: p.scheduler.queue_depth == 1 or answer.done(), "queued")
            r.gate.set()  # the slot frees well inside the 0.5 s the request may wait
            raw = await asyncio.wait_for(answer, 10)
        finally:
            writer.close()
        assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
        (await busy).release()
    assert p.metric("batchgate_rejected_requests_total", reason="queue_timeout") == 0


async def test_queued_bodies_past_max_bytes_get_429_queue_full(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    config = make_config(("r", r.url, 1))
    config = dataclasses.replace(config, queue=dataclasses.replace(config.queue, max_bytes=1000))
    p: Proxy = await proxy(config)
    busy = asyncio.create_task(
        client.post(p.url + "/v1/completions", json={"hold": True, "pad": "x" * 5000})
    )  # a free slot: a body larger than the bound is not queued, so not refused
    await until(lambda: r.in_flight == 1, "replica busy")
    waiting = asyncio.create_task(
        client.post(p.url + "/v1/completions", json={"pad": "x" * 600})
    )
    await until(lambda: p.scheduler.queue_depth == 1, "one waiting")
    async with client.post(p.url + "/v1/completions", json={"pad": "x" * 600}) as resp:
        assert resp.status == 429
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
        body = await resp.json()
    assert body["error"]["code"] == "queue_full"
    assert body["error"]["type"] == "rate_limit_error"
    assert "queue.max_bytes (1000 bytes)" in body["error"]["message"]
    r.gate.set()
    for task in (busy, waiting):
        async with await task as resp:
            assert resp.status == 200
    assert r.arrivals == 2
    assert p.metric("batchgate_rejected_requests_total", reason="queue_full") == 1


async def test_a_retried_request_goes_back_ahead_of_later_waiters(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    """A request refused by a dead replica re-enters at the head, ahead of one queued after it.

    "dead" holds a request while "busy" holds another, so A and then B queue. "dead" stops
    listening and its held request ends: A is granted dead's slot, its connection is refused,
    and it goes back to the queue, where B has been waiting since after A arrived. The next free
    slot must be A's.
    """
    busy: FakeReplica = await replicas("busy")
    dead: FakeReplica = await replicas("dead")
    p: Proxy = await proxy(make_config(("dead", dead.url, 1), ("busy", busy.url, 1),
                                       health_interval_s=60))
    await until(lambda: dead.health_hits >= 1 and busy.health_hits >= 1, "startup probes")

    def post(name: str, spec: dict[str, Any]) -> asyncio.Task[aiohttp.ClientResponse]:
        return asyncio.create_task(client.post(
            p.url + "/v1/completions", json=spec, headers={"X-Request-Id": name}
        ))

    held_dead = post("D", {"hold": True})
    await until(lambda: dead.in_flight == 1, "dead's slot taken")
    held_busy = post("H", {"hold": True})
    await until(lambda: busy.in_flight == 1, "busy's slot taken")
    a = post("A", {"i": "a"})
    await until(lambda: p.scheduler.queue_depth == 1, "A queued")
    b = post("B", {"i": "b"})
    await until(lambda: p.scheduler.queue_depth == 2, "B queued behind A")
    assert dead.runner is not None
    stopping = asyncio.create_task(dead.runner.cleanup())  # stops listening, then cuts D
    await until(lambda: not p.scheduler.replicas[0].healthy, "A refused by dead")
    await until(lambda: p.scheduler.queue_depth == 2, "A back in the queue")
    busy.gate.set()
    responses = await asyncio.gather(held_busy, a, b, held_dead)
    await stopping
    assert [r.status for r in responses] == [200, 200, 200, 502]
    for r in responses:
        r.release()
    served = [{k.lower(): v for k, v in h.items()}.get("x-request-id") for h in busy.seen_headers]
    assert served == ["H", "A", "B"]
    assert p.metric("batchgate_upstream_retries_total", replica="dead") == 1
