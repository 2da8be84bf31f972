"""A request that never reached a replica goes out again; one that did is never sent twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import FakeReplica, Proxy, make_config, until

Factory = Callable[..., Any]


#: Response headers a replica might send that must not cross the proxy (and two that must).
HOP_HEADERS = (
    b"Connection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Thing: 1\r\n"
    b"Trailer: X-Sum\r\nUpgrade: h2c\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Keep: yes\r\n"
)


@dataclass
class RawReplica:
    """A minimal HTTP/1.1 server that misbehaves on purpose.

    It answers the first request on each connection with ``Connection: keep-alive``, then
    reads the next request on it, body included, and closes the connection unanswered: the
    request may have reached the engine, so it must never be sent again (unless idempotent).
    A body containing ``"drop"`` is dropped even as a first request.
    """

    answered: int = 0
    dropped: int = 0
    crashed: int = 0
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served_here = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                if served_here and b"crash" in body:
                    # The engine works on it (longer than any close race), then dies.
                    self.crashed += 1
                    await asyncio.sleep(0.5)
                    writer.transport.abort()
                    return
                if served_here or b"drop" in body:
                    self.dropped += 1
                    return
                served_here += 1
                if not head.startswith(b"GET /health"):
                    self.answered += 1
                payload = json.dumps({"answered": self.answered}).encode()
                extra = HOP_HEADERS if b"hop" in body else b""
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Connection: keep-alive\r\nContent-Length: %d\r\n%s\r\n%s"
                    % (len(payload), extra, payload)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@pytest.fixture
async def raw_replica() -> AsyncIterator[RawReplica]:
    replica = RawReplica()
    server = await asyncio.start_server(replica.handle, "127.0.0.1", 0)
    replica.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield replica
    server.close()
    await server.wait_closed()


async def test_post_read_then_dropped_on_a_pooled_connection_is_never_sent_twice(
    raw_replica: RawReplica, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    """The replica reads the POST body on a reused connection, then drops it: the body may
    have reached the engine, so it reaches exactly one replica and the caller gets 502
    (today's main resent it within 250 ms: the body arrived twice)."""
    p: Proxy = await proxy(make_config(("raw", raw_replica.url, 1), health_interval_s=60))
    async with client.post(p.url + "/v1/completions", json={"n": 1}) as resp:
        assert resp.status == 200  # opens the pooled connection
    async with client.post(p.url + "/v1/completions", json={"n": 2}) as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"]["code"] == "upstream_reset"
    assert raw_replica.dropped == 1  # read once, never again
    assert p.metric("batchgate_upstream_retries_total", replica="raw") == 0
    assert p.metric("batchgate_upstream_errors_total", replica="raw", kind="reset") == 1


async def test_idempotent_request_read_then_dropped_is_resent(
    raw_replica: RawReplica, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    """The same drop, for a request carrying Idempotency-Key: resending it is safe."""
    p: Proxy = await proxy(make_config(("raw", raw_replica.url, 1), health_interval_s=60))
    async with client.post(p.url + "/v1/completions", json={"n": 1}) as resp:
        assert resp.status == 200
    async with client.post(p.url + "/v1/completions", json={"n": 2},
                           headers={"Idempotency-Key": "k-2"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["answered"] == 2
    assert raw_replica.dropped == 1
    assert p.metric("batchgate_upstream_retries_total", replica="raw") == 1


async def test_request_dropped_on_a_fresh_connection_is_not_resent(
    raw_replica: RawReplica, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    p: Proxy = await proxy(make_config(("raw", raw_replica.url, 1), health_interval_s=60))
    async with client.post(p.url + "/v1/completions", json={"drop": True}) as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"]["type"] == "upstream_error"
    assert body["error"]["code"] == "upstream_reset"
    assert raw_replica.dropped == 1  # it may have reached the engine: never sent twice
    assert raw_replica.answered == 0
    assert p.metric("batchgate_upstream_errors_total", replica="raw", kind="reset") == 1


async def test_retries_exhausted_is_502_openai_body(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    dead = [await replicas(f"d{i}") for i in range(3)]
    p: Proxy = await proxy(
        make_config(*((d.name, d.url, 1) for d in dead), retries=2, health_interval_s=60)
    )
    await until(lambda: all(d.health_hits >= 1 for d in dead), "startup probes passed")
    for d in dead:
        assert d.runner is not None
        await d.runner.cleanup()
    async with client.post(p.url + "/v1/completions", json={}) as resp:
        assert resp.status == 502
        body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "upstream_connect"
    assert "3 attempts" in body["error"]["message"]
    assert not p.scheduler.any_healthy()
    for d in dead:
        assert p.metric("batchgate_upstream_errors_total", replica=d.name, kind="connect") == 1


async def test_retry_waits_at_head_of_queue_for_a_healthy_replica(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    """One replica refuses, the other is busy: the retry waits first in line, then is served."""
    busy: FakeReplica = await replicas("busy")
    dead: FakeReplica = await replicas("dead")
    p: Proxy = await proxy(make_config(("dead", dead.url, 1), ("busy", busy.url, 1),
                                       health_interval_s=60))
    await until(lambda: dead.health_hits >= 1, "startup probe passed")
    assert dead.runner is not None
    await dead.runner.cleanup()
    hold = asyncio.create_task(client.post(p.url + "/v1/completions", json={"hold": True}))
    # Ties go round-robin from the first replica: "dead" takes the held request? No: it is
    # refused there, retried, and lands on "busy".
    await until(lambda: busy.in_flight == 1, "held request on busy")
    second = asyncio.create_task(client.post(p.url + "/v1/completions", json={"i": 2}))
    await until(lambda: p.scheduler.queue_depth == 1, "second waits")
    busy.gate.set()
    first, after = await asyncio.gather(hold, second)
    assert (first.status, after.status) == (200, 200)
    first.release()
    after.release()
    assert busy.arrivals == 2


async def test_hop_by_hop_response_headers_are_stripped(
    raw_replica: RawReplica, proxy: Factory
) -> None:
    p: Proxy = await proxy(make_config(("raw", raw_replica.url, 1), health_interval_s=60))
    host, port = p.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        body = b'{"hop": true}'
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(body), body))
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
        await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    names = [line.split(":", 1)[0].lower() for line in head.split("\r\n")[1:] if line]
    for hop in ("x-hop", "keep-alive", "proxy-thing", "trailer", "upgrade"):
        assert hop not in names, head
    assert names.count("set-cookie") == 2
    assert "x-keep" in names


async def test_replica_dying_after_it_took_a_pooled_request_is_not_resent(
    raw_replica: RawReplica, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    p: Proxy = await proxy(make_config(("raw", raw_replica.url, 1), health_interval_s=60))
    async with client.post(p.url + "/v1/completions", json={"n": 1}) as resp:
        assert resp.status == 200  # opens the pooled connection
    async with client.post(p.url + "/v1/completions", json={"crash": True}) as resp:
        assert resp.status == 502  # it reached the engine: never sent twice
        assert (await resp.json())["error"]["code"] == "upstream_reset"
    assert raw_replica.crashed == 1 and raw_replica.answered == 1
    assert p.metric("batchgate_upstream_retries_total", replica="raw") == 0
