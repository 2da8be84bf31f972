"""The proxy on real sockets: concurrency caps, streaming, cancellation, rejection, retries."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import FakeReplica, Proxy, make_config, sse_event, until

Factory = Callable[..., Any]


async def test_exact_peaks_across_two_replicas(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    p: Proxy = await proxy(make_config(("a", a.url, 4), ("b", b.url, 2)))

    async def call(i: int) -> tuple[int, dict[str, Any]]:
        async with client.post(p.url + "/v1/completions", json={"hold": True, "i": i}) as r:
            return r.status, await r.json()

    tasks = [asyncio.create_task(call(i)) for i in range(60)]
    await until(lambda: a.in_flight == 4 and b.in_flight == 2 and p.scheduler.queue_depth == 54,
                "replicas saturated, the rest queued in the proxy")
    assert p.metric("batchgate_queue_depth", **{"class": "standard", "model": ""}) == 54
    assert p.metric("batchgate_replica_in_flight", replica="a") == 4
    assert p.metric("batchgate_replica_in_flight", replica="b") == 2
    a.gate.set()
    b.gate.set()
    results = await asyncio.gather(*tasks)
    assert [s for s, _ in results] == [200] * 60
    assert (a.peak, b.peak) == (4, 2)
    assert a.completed + b.completed == 60
    assert p.metric("batchgate_requests_total", replica="a", route="/v1/completions",
                    code="200", tenant="none") == a.completed


async def test_sse_reaches_caller_incrementally_and_byte_for_byte(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 2)))
    async with client.post(
        p.url + "/v1/completions", json={"stream": True, "hold": True, "events": 5}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        first = await resp.content.readuntil(b"\n\n")
        # The replica is still blocked before its second event: the first was not buffered.
        assert first == sse_event(0)
        assert r.completed == 0 and not r.gate.is_set()
        r.gate.set()
        rest = await resp.content.read()
    assert rest == b"".join(sse_event(i) for i in range(1, 5)) + b"data: [DONE]\n\n"


async def test_replica_dying_mid_stream_ends_it_with_an_error_event(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1)))
    async with client.post(
        p.url + "/v1/completions", json={"stream": True, "die": True, "events": 5}
    ) as resp:
        body = await resp.content.read()  # ends cleanly: the error is said in the stream
    first, error, rest = body.split(b"\n\n", 2)
    assert first + b"\n\n" == sse_event(0)
    event, data = error.split(b"\n")
    assert event == b"event: error"
    assert json.loads(data.removeprefix(b"data: "))["error"]["code"] == "upstream_reset"
    assert rest == b""
    assert p.metric("batchgate_upstream_errors_total", replica="r", kind="reset") == 1


async def test_caller_leaving_while_queued_never_reaches_replica(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1)))
    first = asyncio.create_task(client.post(p.url + "/v1/completions", json={"hold": True}))
    await until(lambda: r.in_flight == 1, "first request on the replica")
    async with aiohttp.ClientSession() as leaver:
        queued = asyncio.create_task(leaver.post(p.url + "/v1/completions", json={"x": 1}))
        await until(lambda: p.scheduler.queue_depth == 1, "second request queued")
        queued.cancel()
    await until(lambda: p.scheduler.queue_depth == 0, "the leaver left the queue")
    assert p.metric("batchgate_client_disconnects_total", stage="queued") == 1
    r.gate.set()
    resp = await first
    assert resp.status == 200
    resp.release()
    assert r.arrivals == 1


async def test_caller_leaving_mid_stream_aborts_upstream(
    replicas: Factory, proxy: Factory
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1)))
    async with aiohttp.ClientSession() as leaver:
        resp = await leaver.post(
            p.url + "/v1/completions", json={"stream": True, "hold": True, "events": 100}
        )
        assert await resp.content.readuntil(b"\n\n") == sse_event(0)
        resp.close()  # hang up mid-stream
    await until(lambda: r.aborted == 1, "replica saw its client leave")
    assert r.completed == 0
    await until(lambda: p.scheduler.idle(), "slot released")
    assert p.metric("batchgate_client_disconnects_total", stage="streaming") == 1


async def test_caller_leaving_mid_generation_aborts_upstream(
    replicas: Factory, proxy: Factory
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1)))
    async with aiohttp.ClientSession() as leaver:
        call = asyncio.create_task(leaver.post(p.url + "/v1/completions", json={"hold": True}))
        await until(lambda: r.in_flight == 1, "request generating on the replica")
        call.cancel()
    await until(lambda: r.aborted == 1, "replica saw its client leave")
    await until(lambda: p.scheduler.idle(), "slot released")
    assert p.metric("batchgate_client_disconnects_total", stage="waiting_first_byte") == 1


async def test_large_body_passes_and_oversize_is_413(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1), max_body_bytes=16 * 1024 * 1024))
    # Not JSON (the fake replica parses a body that starts with "{": 1 run in 256 did).
    body = b"\0" + os.urandom(8 * 1024 * 1024 - 1)
    async with client.post(p.url + "/v1/embeddings", data=io.BytesIO(body)) as resp:
        assert resp.status == 200
        echo = await resp.json()
    assert echo["bytes"] == len(body)
    assert echo["sha256"] == hashlib.sha256(body).hexdigest()

    too_big = io.BytesIO(os.urandom(17 * 1024 * 1024))
    async with client.post(p.url + "/v1/embeddings", data=too_big) as resp:
        assert resp.status == 413
        err = await resp.json()
    assert err["error"]["code"] == "body_too_large"
    assert r.arrivals == 1
    assert p.metric("batchgate_rejected_requests_total", reason="body_too_large") == 1


async def test_queue_full_429_and_timeout_503_with_retry_after(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1), max_queue=1, queue_timeout_s=0.3))
    busy = asyncio.create_task(client.post(p.url + "/v1/completions", json={"hold": True}))
    await until(lambda: r.in_flight == 1, "replica busy")
    waiting = asyncio.create_task(client.post(p.url + "/v1/completions", json={"x": 1}))
    await until(lambda: p.scheduler.queue_depth == 1, "one waiting")

    async with client.post(p.url + "/v1/completions", json={"x": 2}) as resp:
        assert resp.status == 429
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
        assert resp.headers["X-Request-Id"]
        body = await resp.json()
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "queue_full"

    timed_out = await waiting  # nothing frees the slot: the wait passes queue.timeout_s
    assert timed_out.status == 503
    assert 1 <= int(timed_out.headers["Retry-After"]) <= 60
    assert (await timed_out.json())["error"]["code"] == "queue_timeout"
    r.gate.set()
    (await busy).release()
    assert r.arrivals == 1  # neither rejection reached the replica
    assert p.metric("batchgate_rejected_requests_total", reason="queue_full") == 1
    assert p.metric("batchgate_rejected_requests_total", reason="queue_timeout") == 1


async def test_zero_queue_rejects_at_once(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1), max_queue=0))
    busy = asyncio.create_task(client.post(p.url + "/v1/completions", json={"hold": True}))
    await until(lambda: r.in_flight == 1, "replica busy")
    async with client.post(p.url + "/v1/completions", json={}) as resp:
        assert resp.status == 429
    r.gate.set()
    (await busy).release()


async def test_headers_hop_by_hop_forwarded_and_request_id(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1)))
    headers = {
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic Zm9v",
        "TE": "trailers",
        "Authorization": "Bearer k",
        "X-Forwarded-For": "10.1.2.3",
        "X-Request-Id": "req-42",
    }
    async with client.post(p.url + "/v1/completions?x=1", json={}, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-Id"] == "req-42"
        assert (await resp.json())["path"] == "/v1/completions?x=1"
    seen = {k.lower(): v for k, v in r.seen_headers[-1].items()}
    for hop in ("x-secret-hop", "keep-alive", "proxy-authorization", "te"):
        assert hop not in seen
    assert seen["authorization"] == "Bearer k"
    assert seen["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == p.url.removeprefix("http://")
    assert seen["x-request-id"] == "req-42"

    async with client.get(p.url + "/anything") as resp:
        generated = resp.headers["X-Request-Id"]
    last = {k.lower(): v for k, v in r.seen_headers[-1].items()}
    assert len(generated) == 32 and last["x-request-id"] == generated


async def test_models_answered_without_a_slot(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1), max_queue=0))
    busy = asyncio.create_task(client.post(p.url + "/v1/completions", json={"hold": True}))
    await until(lambda: r.in_flight == 1, "the only slot is taken")
    async with client.get(p.url + "/v1/models") as resp:
        assert resp.status == 200
        assert (await resp.json())["data"][0]["id"] == "r"
    assert p.metric("batchgate_requests_total", replica="r", route="/v1/models", code="200",
                    tenant="none") == 1
    r.gate.set()
    (await busy).release()


async def test_own_endpoints_and_health_failover(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    a.health_status = 500
    p: Proxy = await proxy(make_config(("a", a.url, 1), ("b", b.url, 1), health_interval_s=0.05))
    await until(lambda: not p.scheduler.replicas[0].healthy, "a fails its probe")
    for _ in range(4):
        async with client.post(p.url + "/v1/completions", json={}) as resp:
            assert (await resp.json())["replica"] == "b"
    assert p.metric("batchgate_replica_healthy", replica="a") == 0
    async with client.get(p.url + "/readyz") as resp:
        assert resp.status == 200
    b.health_status = 503
    await until(lambda: not p.scheduler.any_healthy(), "both down")
    async with client.get(p.url + "/readyz") as resp:
        assert resp.status == 503
    async with client.get(p.url + "/healthz") as resp:
        assert resp.status == 200  # the process itself is fine
    a.health_status = 200
    await until(lambda: p.scheduler.replicas[0].healthy, "a back")
    async with client.post(p.url + "/v1/completions", json={}) as resp:
        assert (await resp.json())["replica"] == "a"


async def test_refused_connection_is_retried_on_another_replica(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    good: FakeReplica = await replicas("good")
    dead: FakeReplica = await replicas("dead")
    p: Proxy = await proxy(make_config(("dead", dead.url, 4), ("good", good.url, 1)))
    await until(lambda: dead.health_hits >= 1, "startup probe passed")
    assert dead.runner is not None
    await dead.runner.cleanup()  # from now on its port refuses connections
    assert p.scheduler.replicas[0].healthy  # no probe until the next interval (60 s)
    async with client.post(p.url + "/v1/completions", json={}) as resp:
        assert resp.status == 200
        assert (await resp.json())["replica"] == "good"
    assert not p.scheduler.replicas[0].healthy
    assert p.metric("batchgate_upstream_errors_total", replica="dead", kind="connect") == 1
    assert good.arrivals == 1


async def test_only_replica_refusing_ends_in_503_no_healthy_replica(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    dead: FakeReplica = await replicas("dead")
    p: Proxy = await proxy(make_config(("dead", dead.url, 1), retries=2, queue_timeout_s=0.3,
                                       health_interval_s=60))
    await until(lambda: dead.health_hits >= 1, "startup probe passed")
    assert dead.runner is not None
    await dead.runner.cleanup()
    async with client.post(p.url + "/v1/completions", json={}) as resp:
        # Refused once, marked down; the retry then waits (first in line) for a healthy
        # replica until queue.timeout_s, and says why it gave up.
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "no_healthy_replica"
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert p.metric("batchgate_rejected_requests_total", reason="no_healthy_replica") == 1


async def test_silent_replica_is_504_and_never_resent(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1), read_timeout_s=0.2))
    async with client.post(p.url + "/v1/completions", json={"hold": True}) as resp:
        assert resp.status == 504
        body = await resp.json()
    assert body["error"]["code"] == "upstream_timeout"
    await until(lambda: r.aborted == 1, "the replica saw the request abandoned")
    assert r.arrivals == 1
    assert p.metric("batchgate_upstream_errors_total", replica="r", kind="timeout") == 1


async def test_upstream_error_status_passes_through(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1)))
    async with client.post(p.url + "/v1/completions", json={"status": 503}) as resp:
        assert resp.status == 503
    assert p.metric("batchgate_upstream_errors_total", replica="r", kind="status_5xx") == 1
    assert p.metric("batchgate_requests_total", replica="r", route="/v1/completions",
                    code="503", tenant="none") == 1


async def test_draining_flag_refuses_new_work(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    from proxy.edge.app import LIFECYCLE

    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1)))
    p.app[LIFECYCLE].start_drain(0, 30, "test")  # no quiet period: refused at once
    async with client.post(p.url + "/v1/chat/completions", json={}) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert json.loads(await resp.text())["error"]["code"] == "draining"
    async with client.get(p.url + "/readyz") as resp:
        assert resp.status == 503
    assert r.arrivals == 0
    assert p.metric("batchgate_rejected_requests_total", reason="draining") == 1


async def test_a_bug_inside_batchgate_is_a_500_json_and_frees_the_slot(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from proxy.edge.app import UPSTREAMS

    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1)))

    async def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(p.app[UPSTREAMS], "send", broken)
    with caplog.at_level(logging.ERROR, logger="batchgate"):
        async with client.post(p.url + "/v1/completions", json={}) as resp:
            assert resp.status == 500
            body = await resp.json()
    assert body["error"]["code"] == "internal_error"
    assert "RuntimeError" in body["error"]["message"] and "boom" not in body["error"]["message"]
    assert any("failed inside batchgate" in rec.message for rec in caplog.records)
    await until(lambda: p.scheduler.idle(), "slot released")


async def test_caller_that_stops_reading_loses_its_slot_after_the_stall_limit(
    replicas: Factory, proxy: Factory
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1), send_timeout_s=0.3))
    host, port = p.url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"stream": True, "events": 400, "pad": 65536}).encode()  # ~26 MB
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    try:
        # The caller never reads: sockets fill, the proxy waits stall_limit, then cuts it.
        await until(lambda: r.arrivals == 1, "the stream started")
        await until(lambda: p.scheduler.idle(), "slot released from a stalled caller")
        await until(lambda: r.aborted == 1, "the engine saw its request abandoned")
    finally:
        writer.close()
    assert r.completed == 0
    assert p.metric("batchgate_client_disconnects_total", stage="streaming") == 1
