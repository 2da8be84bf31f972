"""Requests that take no generation slot: GET, HEAD and OPTIONS, and the ``/v1/models`` union.

A probe copied from a vLLM manifest (``GET /health``) must answer while every slot is held and
the queue is full, relayed byte for byte like a proxied answer; the slot-free path has its own
small bound per replica (:data:`proxy.edge.light.LIGHT_LIMIT_PER_REPLICA`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.edge.light import LIGHT, LIGHT_LIMIT_PER_REPLICA
from tests.integration.conftest import FakeReplica, Proxy, make_config, start_app, until

Factory = Callable[..., Any]

#: Not valid gzip on purpose: relayed as is, never inflated or re-labelled.
VERSION_BODY = b'\x1f\x8b{"version": "0.6.3"}\r\n\x00\xff'


def engine_app(
    replica: FakeReplica, models: list[dict[str, Any]] | None = None, models_status: int = 200
) -> web.Application:
    app = web.Application()

    async def version(_request: web.Request) -> web.Response:
        return web.Response(body=VERSION_BODY, headers={
            "Content-Type": "application/octet-stream", "Content-Encoding": "gzip",
            "X-Engine": replica.name,
        })

    async def ping(request: web.Request) -> web.Response:
        return web.Response(text=f"pong {request.method}\n", headers={"Allow": "GET, OPTIONS"})

    async def list_models(request: web.Request) -> web.Response:
        replica.seen_headers.append(dict(request.headers))
        if request.query.get("hold") == replica.name:
            await replica.gate.wait()
        if models_status != 200:
            return web.json_response({"error": {"message": "nope"}}, status=models_status)
        if request.query.get("shape") == "bare":
            return web.json_response({"models": [m["id"] for m in models or []]})
        if models is None:
            return web.json_response({"object": "list", "data": [{"id": replica.name}]})
        return web.json_response({"object": "list", "data": models})

    app.router.add_get("/version", version)
    app.router.add_route("*", "/ping", ping)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", replica.health)
    app.router.add_route("*", "/{tail:.*}", replica.generate)
    return app


@pytest.fixture
async def engines() -> AsyncIterator[Callable[..., Any]]:
    """Factory of fake engines with /version, /ping and /health; all stopped at the end."""
    started: list[FakeReplica] = []

    async def make(
        name: str, models: list[dict[str, Any]] | None = None, models_status: int = 200
    ) -> FakeReplica:
        replica = FakeReplica(name)
        replica.runner, replica.url = await start_app(engine_app(replica, models, models_status))
        started.append(replica)
        return replica

    yield make
    for replica in started:
        replica.gate.set()
        assert replica.runner is not None
        await replica.runner.cleanup()


async def saturate(p: Proxy, r: FakeReplica, client: aiohttp.ClientSession
                   ) -> list[asyncio.Task[aiohttp.ClientResponse]]:
    """Hold the one slot and fill the one-place queue; prove it with a 429."""
    held = [asyncio.create_task(client.post(p.url + "/v1/completions", json={"hold": True}))]
    await until(lambda: r.in_flight == 1, "the only slot is taken")
    held.append(asyncio.create_task(client.post(p.url + "/v1/completions", json={"x": 1})))
    await until(lambda: p.scheduler.queue_depth == 1, "the queue is full")
    async with client.post(p.url + "/v1/completions", json={}) as resp:
        assert resp.status == 429
    return held


async def release(r: FakeReplica, held: list[asyncio.Task[aiohttp.ClientResponse]]) -> None:
    r.gate.set()
    for task in held:
        (await task).release()


async def test_health_probe_answers_200_while_every_slot_is_held_and_the_queue_is_full(
    engines: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await engines("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1), max_queue=1))
    await until(lambda: r.health_hits >= 1, "the startup probe is done")
    held = await saturate(p, r, client)
    hits = r.health_hits
    async with client.get(p.url + "/health") as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-Id"]
    assert r.health_hits == hits + 1  # answered by the replica, not by batchgate
    async with client.get(p.url + "/ping") as resp:
        assert resp.status == 200
        assert await resp.text() == "pong GET\n"
    assert p.scheduler.replicas[0].in_flight == 1  # still only the held generation
    assert p.metric("batchgate_requests_total", replica="r", route="other", code="200",
                    tenant="none") == 2
    await release(r, held)


async def test_slot_free_answers_are_relayed_byte_for_byte(
    engines: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await engines("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1), max_queue=0))
    held = [asyncio.create_task(client.post(p.url + "/v1/completions", json={"hold": True}))]
    await until(lambda: r.in_flight == 1, "the only slot is taken")
    async with client.get(p.url + "/version", auto_decompress=False) as resp:
        assert resp.status == 200
        assert await resp.read() == VERSION_BODY
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert resp.headers["X-Engine"] == "r"
    async with client.head(p.url + "/ping") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len("pong HEAD\n"))
        assert await resp.read() == b""
    async with client.options(p.url + "/ping") as resp:
        assert resp.status == 200
        assert resp.headers["Allow"] == "GET, OPTIONS"
        assert await resp.text() == "pong OPTIONS\n"
    await release(r, held)


async def test_slot_free_requests_have_their_own_small_bound_per_replica(
    engines: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await engines("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1), max_queue=0))
    await until(lambda: r.health_hits >= 1, "the startup probe is done")
    # GETs that the engine holds (a GET with a body the fake reads as {"hold": true}).
    held = [
        asyncio.create_task(client.get(p.url + "/slow", json={"hold": True}))
        for _ in range(LIGHT_LIMIT_PER_REPLICA)
    ]
    await until(lambda: r.in_flight == LIGHT_LIMIT_PER_REPLICA, "every slot-free place taken")
    assert p.scheduler.replicas[0].in_flight == 0  # none of them took a generation slot
    async with client.get(p.url + "/slow") as resp:
        assert resp.status == 429
        body = await resp.json()
    assert body["error"]["code"] == "queue_full"
    assert str(LIGHT_LIMIT_PER_REPLICA) in body["error"]["message"]
    # The model listing is slot-free too: at the bound it is refused the same way.
    async with client.get(p.url + "/v1/models") as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "queue_full"
    # Generations are not affected by the slot-free bound.
    work = asyncio.create_task(client.post(p.url + "/v1/completions", json={"hold": True}))
    await until(lambda: r.in_flight == LIGHT_LIMIT_PER_REPLICA + 1, "the generation runs")
    await release(r, [*held, work])
    assert [(await t).status for t in held] == [200] * LIGHT_LIMIT_PER_REPLICA
    await until(lambda: p.app[LIGHT].slots.idle(), "every slot-free place given back")
    assert r.arrivals == LIGHT_LIMIT_PER_REPLICA + 1  # the refused GET never reached it


async def test_slot_free_request_goes_to_a_healthy_replica_only(
    engines: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await engines("a")
    b: FakeReplica = await engines("b")
    a.health_status = 500
    p: Proxy = await proxy(make_config(("a", a.url, 1), ("b", b.url, 1), health_interval_s=0.05))
    await until(lambda: not p.scheduler.replicas[0].healthy, "a fails its probe")
    for _ in range(3):
        async with client.get(p.url + "/version") as resp:
            assert resp.headers["X-Engine"] == "b"
    b.health_status = 500
    await until(lambda: not p.scheduler.any_healthy(), "both down")
    async with client.get(p.url + "/version") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "no_healthy_replica"


def model(name: str, owner: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 1, "owned_by": owner}


async def test_models_lists_the_union_of_the_healthy_replicas(
    engines: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await engines("a", [model("llama-8b", "a"), model("shared", "a")])
    b: FakeReplica = await engines("b", [model("qwen-7b", "b"), model("shared", "b")])
    p: Proxy = await proxy(make_config(("a", a.url, 1), ("b", b.url, 1), max_queue=0))
    held = [asyncio.create_task(client.post(p.url + "/v1/completions", json={"hold": True}))
            for _ in range(2)]
    await until(lambda: a.in_flight == b.in_flight == 1, "every slot is taken")
    async with client.get(p.url + "/v1/models", headers={"Authorization": "Bearer k"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/json")
        listing = await resp.json()
    assert listing == {
        "object": "list",
        # Each id once, in replica order; the first replica that lists an id speaks for it.
        "data": [model("llama-8b", "a"), model("shared", "a"), model("qwen-7b", "b")],
    }
    assert a.seen_headers[-1]["Authorization"] == b.seen_headers[-1]["Authorization"]
    for name in ("a", "b"):
        assert p.metric("batchgate_requests_total", replica=name, route="/v1/models",
                        code="200", tenant="none") == 1
    for replica in (a, b):
        replica.gate.set()
    for task in held:
        (await task).release()


async def test_models_asks_the_replicas_concurrently(
    engines: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await engines("a", [model("m-a", "a")])
    b: FakeReplica = await engines("b", [model("m-b", "b")])
    p: Proxy = await proxy(make_config(("a", a.url, 1), ("b", b.url, 1)))
    listing = asyncio.create_task(client.get(p.url + "/v1/models?hold=a"))
    # b is asked while a still holds its answer: the replicas are not asked one by one.
    await until(lambda: len(a.seen_headers) == len(b.seen_headers) == 1, "both asked")
    assert not listing.done()
    a.gate.set()
    resp = await listing
    assert [m["id"] for m in (await resp.json())["data"]] == ["m-a", "m-b"]
    resp.release()


async def test_models_skips_a_replica_that_fails_or_is_silent(
    engines: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await engines("a", [model("m-a", "a")])
    b: FakeReplica = await engines("b", models_status=500)
    c: FakeReplica = await engines("c", [model("m-c", "c")])
    p: Proxy = await proxy(make_config(("a", a.url, 1), ("b", b.url, 1), ("c", c.url, 1),
                                       read_timeout_s=0.3))
    # c holds its answer: the listing does not wait past upstream.read_timeout_s for it.
    async with client.get(p.url + "/v1/models?hold=c") as resp:
        assert resp.status == 200
        assert (await resp.json())["data"] == [model("m-a", "a")]
    assert p.metric("batchgate_requests_total", replica="b", route="/v1/models", code="500",
                    tenant="none") == 1
    c.gate.set()
    assert c.runner is not None
    await c.runner.cleanup()  # now refuses connections: skipped too
    async with client.get(p.url + "/v1/models") as resp:
        assert resp.status == 200
        assert (await resp.json())["data"] == [model("m-a", "a")]
    await until(lambda: p.app[LIGHT].slots.idle(), "every slot-free place given back")


async def test_models_with_no_replica_answering_is_503_no_healthy_replica(
    engines: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await engines("a", models_status=500)
    b: FakeReplica = await engines("b")
    p: Proxy = await proxy(make_config(("a", a.url, 1), ("b", b.url, 1)))
    assert b.runner is not None
    await b.runner.cleanup()
    async with client.get(p.url + "/v1/models") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["error"]["code"] == "no_healthy_replica"
    assert p.metric("batchgate_rejected_requests_total", reason="no_healthy_replica") == 1


async def test_models_refused_by_every_replica_relays_the_refusal(
    engines: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await engines("a", models_status=401)
    b: FakeReplica = await engines("b", models_status=401)
    p: Proxy = await proxy(make_config(("a", a.url, 1), ("b", b.url, 1)))
    async with client.get(p.url + "/v1/models") as resp:
        assert resp.status == 401  # a wrong API key is the caller's to see, not a 503
        assert await resp.json() == {"error": {"message": "nope"}}


async def test_models_relays_an_answer_that_is_not_a_list_when_no_replica_lists_models(
    engines: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await engines("a", models_status=500)
    b: FakeReplica = await engines("b", [model("m-b", "b")])
    p: Proxy = await proxy(make_config(("a", a.url, 1), ("b", b.url, 1)))
    # b's answer lacks `data` here: the caller gets it untouched rather than a made-up 503.
    async with client.get(p.url + "/v1/models?shape=bare") as resp:
        assert resp.status == 200
        assert await resp.json() == {"models": ["m-b"]}
