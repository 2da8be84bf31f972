"""queue.sse_heartbeat_s: a waiting stream gets its 200 at once, then `: queued position=N`.

The fake replica holds the only slot on its gate, so the stream under test waits for exactly as
long as the test says; its rejections are driven by ``Scheduler.expire``, not by a timer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import math
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import pytest
import requests  # the seed's client (shared/seed/batching-and-streaming.txt)
from openai import AsyncOpenAI

from proxy.config import Config, QueueConfig
from proxy.edge import heartbeat
from proxy.edge.app import LIFECYCLE
from proxy.edge.heartbeat import comment
from proxy.observe.accesslog import AccessLog
from tests.integration.conftest import (
    BOUND_S,
    FakeReplica,
    Proxy,
    make_config,
    sse_event,
    until,
)

Factory = Callable[..., Any]
COMPLETIONS = "/v1/completions"
#: What the fake replica streams for {"stream": true} (three events, then [DONE]).
REPLICA_STREAM = sse_event(0) + sse_event(1) + sse_event(2) + b"data: [DONE]\n\n"
HEARTBEATS = re.compile(rb"(: queued position=\d+\n\n)*")


def heartbeat_config(replica: FakeReplica, heartbeat_s: float, **more: Any) -> Config:
    config = make_config(("r", replica.url, 1), **more)
    return dataclasses.replace(
        config, queue=dataclasses.replace(config.queue, sse_heartbeat_s=heartbeat_s))


async def hold_the_slot(p: Proxy, r: FakeReplica, client: aiohttp.ClientSession
                        ) -> asyncio.Task[aiohttp.ClientResponse]:
    held = asyncio.create_task(client.post(p.url + COMPLETIONS, json={"hold": True}))
    await until(lambda: r.in_flight == 1, "the only slot held")
    return held


async def open_stream(client: aiohttp.ClientSession, url: str, **more: Any
                      ) -> aiohttp.ClientResponse:
    """POST a streaming request whose head must come while it waits (bounded: without
    heartbeats it would only come with the slot, which the test holds)."""
    async with asyncio.timeout(BOUND_S):
        return await client.post(url + COMPLETIONS, json={"stream": True}, **more)


async def read_event(response: aiohttp.ClientResponse) -> bytes:
    async with asyncio.timeout(BOUND_S):
        return await response.content.readuntil(b"\n\n")


async def test_a_waiting_stream_gets_200_at_once_then_its_position_then_the_replica_stream(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(heartbeat_config(r, 0.02))
    held = await hold_the_slot(p, r, client)
    first = await open_stream(client, p.url)
    # The head arrived while it still waits: nothing reached the replica yet.
    assert (first.status, p.scheduler.queue_depth, r.arrivals) == (200, 1, 1)
    assert first.headers["Content-Type"] == "text/event-stream"
    assert first.headers["Transfer-Encoding"] == "chunked"
    assert "X-Batchgate-Queue-Ms" not in first.headers  # unknown when the head went out
    assert first.headers["X-Request-Id"]
    assert await read_event(first) == b": queued position=1\n\n"
    second = await open_stream(client, p.url)
    assert await read_event(second) == b": queued position=2\n\n"
    assert await read_event(first) == b": queued position=1\n\n"
    r.gate.set()
    async with await held as answer:
        assert answer.status == 200
    for response in (first, second):
        body = await response.read()  # to the chunked terminator: a ClientPayloadError if cut
        # Heartbeats, then the replica's stream byte for byte.
        assert body.endswith(REPLICA_STREAM)
        assert HEARTBEATS.fullmatch(body[: -len(REPLICA_STREAM)]), body
        response.release()
    assert p.metric("batchgate_requests_total", replica="r", route="/v1/completions",
                    code="200", tenant="none") == 3


async def test_the_headers_do_not_wait_for_the_first_heartbeat(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(heartbeat_config(r, 3600))  # no heartbeat within the test
    held = await hold_the_slot(p, r, client)
    waiting = await open_stream(client, p.url)
    assert (waiting.status, p.scheduler.queue_depth) == (200, 1)
    r.gate.set()
    (await held).release()
    assert await waiting.read() == REPLICA_STREAM  # no comment was ever sent
    waiting.release()


async def test_a_rejection_while_waiting_is_an_sse_error_event_and_the_stream_ends(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    out = io.BytesIO()
    access = AccessLog(out, "json")
    p: Proxy = await proxy(heartbeat_config(r, 3600), access)
    held = await hold_the_slot(p, r, client)
    waiting = await open_stream(client, p.url, headers={"X-Request-Id": "hb"})
    assert waiting.status == 200
    assert p.scheduler.expire(math.inf)  # its deadline has passed
    body = await waiting.read()  # ends with the chunked terminator, or this raises
    waiting.release()
    event, data = body.split(b"\n", 1)
    assert event == b"event: error"
    assert data.startswith(b"data: ") and data.endswith(b"\n\n")
    assert json.loads(data[len(b"data: "):]) == {"error": {
        "message": "timed out waiting for a free slot", "type": "service_unavailable",
        "param": None, "code": "queue_timeout"}}
    assert r.arrivals == 1  # it never reached the replica
    r.gate.set()
    (await held).release()
    assert await p.app[LIFECYCLE].wait_idle(BOUND_S)
    # Counted as the rejection it is; logged with the status it was sent.
    assert p.metric("batchgate_rejected_requests_total", reason="queue_timeout") == 1
    access.close()
    line = next(json.loads(raw) for raw in out.getvalue().splitlines()
                if json.loads(raw)["request_id"] == "hb")
    assert (line["status"], line["outcome"]) == (200, "rejected:queue_timeout")
    assert line["bytes_out"] == len(body)


async def test_a_waiting_stream_evicted_by_a_higher_class_gets_queue_full_as_an_event(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(heartbeat_config(r, 3600, max_queue=1))
    held = await hold_the_slot(p, r, client)
    waiting = await open_stream(client, p.url)  # the default class, standard
    urgent = asyncio.create_task(client.post(
        p.url + COMPLETIONS, json={}, headers={"X-Batchgate-Class": "interactive"}))
    body = await waiting.read()
    waiting.release()
    assert body.startswith(b"event: error\ndata: ")
    error = json.loads(body[len(b"event: error\ndata: "):])["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
    assert p.metric("batchgate_rejected_requests_total", reason="queue_full") == 1
    r.gate.set()
    (await held).release()
    async with await urgent as answer:
        assert answer.status == 200


async def test_a_replica_refusing_the_stream_becomes_an_sse_error_event(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(heartbeat_config(r, 3600))
    held = await hold_the_slot(p, r, client)
    waiting = await open_stream(client, p.url)
    assert waiting.status == 200
    r.answer_status = 400  # from now on the replica answers JSON errors
    r.gate.set()
    (await held).release()
    body = await waiting.read()
    waiting.release()
    assert body.startswith(b"event: error\ndata: ")
    error = json.loads(body[len(b"event: error\ndata: "):])["error"]
    assert error == {"message": 'replica r answered 400: {"error": "failing on purpose"}',
                     "type": "upstream_error", "param": None, "code": "upstream_status_400"}
    # The replica's own status, as for every answer it gives.
    assert p.metric("batchgate_requests_total", replica="r", route="/v1/completions",
                    code="400", tenant="none") == 1


async def test_a_caller_hanging_up_during_heartbeats_leaves_the_queue_at_once(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(heartbeat_config(r, 0.02))
    held = await hold_the_slot(p, r, client)
    waiting = await open_stream(client, p.url)
    assert await read_event(waiting) == b": queued position=1\n\n"
    waiting.close()  # hangs up: the connection closes
    await until(lambda: p.scheduler.queue_depth == 0, "the waiter withdrawn")
    await until(lambda: p.metric("batchgate_client_disconnects_total", stage="queued") == 1,
                "the hang-up counted")
    r.gate.set()
    (await held).release()
    assert r.arrivals == 1  # the slot went to nobody else: the gone caller never got it
    await until(lambda: p.scheduler.idle(), "no slot left held")


async def test_a_drain_cut_while_waiting_is_a_draining_error_event(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(heartbeat_config(r, 3600))
    held = await hold_the_slot(p, r, client)
    waiting = await open_stream(client, p.url)
    lifecycle = p.app[LIFECYCLE]
    assert lifecycle.start_drain(0.0, 60.0, "test")  # cut by hand below
    assert lifecycle.cut() == 2
    body = await waiting.read()
    waiting.release()
    assert body.startswith(b"event: error\ndata: ")
    error = json.loads(body[len(b"event: error\ndata: "):])["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "draining")
    async with await held as answer:
        assert answer.status == 503  # it had reached the replica: the frame's own cut answer
    # Both counted as the frame counts a cut before the answer's head: draining.
    assert p.metric("batchgate_rejected_requests_total", reason="draining") == 2


async def test_plain_requests_and_heartbeats_off_are_unchanged(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    on: Proxy = await proxy(heartbeat_config(r, 0.02))
    held = await hold_the_slot(on, r, client)
    plain = asyncio.create_task(client.post(on.url + COMPLETIONS, json={}))
    await until(lambda: on.scheduler.queue_depth == 1, "the plain request queued")
    r.gate.set()
    (await held).release()
    async with await plain as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"] == "application/json; charset=utf-8"
        assert "X-Batchgate-Queue-Ms" in answer.headers
    r.gate.clear()

    off: Proxy = await proxy(make_config(("r", r.url, 1)))  # sse_heartbeat_s: 0
    held = await hold_the_slot(off, r, client)
    stream = asyncio.create_task(client.post(off.url + COMPLETIONS, json={"stream": True}))
    await until(lambda: off.scheduler.queue_depth == 1, "the stream queued")
    assert off.scheduler.expire(math.inf)
    async with await stream as answer:  # the rejection as always: its status and JSON
        assert answer.status == 503
        assert answer.headers["X-Batchgate-Rejected"] == "queue_timeout"
        assert (await answer.json())["error"]["code"] == "queue_timeout"
    r.gate.set()
    (await held).release()


@pytest.fixture
def beats(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The position of every heartbeat sent, as the proxy sends it."""
    sent: list[int] = []

    def counted(position: int) -> bytes:
        sent.append(position)
        return comment(position)

    monkeypatch.setattr(heartbeat, "comment", counted)
    return sent


async def test_the_openai_sdk_reads_a_heartbeat_stream_and_raises_its_error_event(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession, beats: list[int]
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(heartbeat_config(r, 0.02))
    sdk = AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0)
    try:
        held = await hold_the_slot(p, r, client)
        stream = await sdk.completions.create(model="m", prompt="x", stream=True)
        assert p.scheduler.queue_depth == 1  # the SDK has its stream while it still waits
        await until(lambda: len(beats) >= 2, "two heartbeats sent")
        r.gate.set()
        (await held).release()
        texts = [chunk.choices[0].text async for chunk in stream]
        assert texts == [" t0", " t1", " t2"]

        r.gate.clear()
        held = await hold_the_slot(p, r, client)
        stream = await sdk.completions.create(model="m", prompt="x", stream=True)
        assert p.scheduler.expire(math.inf)
        with pytest.raises(openai.APIError) as raised:
            async for _ in stream:
                pass
        # What the caller sees: an APIError with batchgate's message, code and error object.
        assert raised.value.message == "timed out waiting for a free slot"
        assert raised.value.code == "queue_timeout"
        assert raised.value.body == {"message": "timed out waiting for a free slot",
                                     "type": "service_unavailable", "param": None,
                                     "code": "queue_timeout"}
        r.gate.set()
        (await held).release()
    finally:
        await sdk.close()


def seed_generate_text(url: str, prompt: str) -> tuple[str, list[str]]:
    """The seed's streaming client, as written there (requests, iter_lines, `data:` lines);
    it also returns the lines it skipped."""
    payload = {"model": "m", "prompt": prompt, "max_tokens": 200, "stream": True}
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
               "Cache-Control": "no-cache", "Connection": "keep-alive"}
    response = requests.post(url, json=payload, headers=headers, stream=True, timeout=BOUND_S)
    response.raise_for_status()
    full_text = ""
    skipped: list[str] = []
    for raw in response.iter_lines():
        if raw:
            line = raw.decode("utf-8")
            if line.startswith("data:"):
                data = line[5:]
                if data.strip() == "[DONE]":
                    break
                event_data = json.loads(data)
                full_text += event_data["choices"][0]["text"]
            else:
                skipped.append(line)
    response.close()
    return full_text, skipped


async def test_the_seed_requests_client_reads_a_heartbeat_stream_unchanged(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession, beats: list[int]
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(heartbeat_config(r, 0.02))
    held = await hold_the_slot(p, r, client)
    reading = asyncio.create_task(asyncio.to_thread(seed_generate_text, p.url + COMPLETIONS, "x"))
    await until(lambda: len(beats) >= 2, "two heartbeats sent")
    r.gate.set()
    (await held).release()
    text, skipped = await reading
    assert text == " t0 t1 t2"
    # It saw the comments (iter_lines hands them over) and skipped them, as it skips any line
    # that is not `data:`.
    assert len(skipped) >= 2 and set(skipped) == {": queued position=1"}, skipped


def test_sse_heartbeat_s_defaults_to_off() -> None:
    assert QueueConfig().sse_heartbeat_s == 0
