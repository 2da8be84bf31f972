"""The access log's operator fields: client, tenant, model, stream, attempts, bytes in and
out, and queue_ms for a request that waited and was then rejected."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.config import ApiKey, AuthConfig
from proxy.edge.app import LIFECYCLE
from proxy.observe.accesslog import AccessLog
from tests.integration.conftest import BOUND_S, FakeReplica, Proxy, make_config, until

Factory = Callable[..., Any]
COMPLETIONS = "/v1/completions"


def log_lines(out: io.BytesIO) -> dict[str, dict[str, Any]]:
    lines = (json.loads(line) for line in out.getvalue().decode().splitlines())
    return {line["request_id"]: line for line in lines}


async def test_client_tenant_model_stream_attempts_and_bytes(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    out = io.BytesIO()
    access = AccessLog(out, "json")
    auth = AuthConfig(api_keys=(ApiKey("team-a", "sk-a-0123456789"),))
    p: Proxy = await proxy(dataclasses.replace(make_config(("r", r.url, 1)), auth=auth), access)
    key = {"Authorization": "Bearer sk-a-0123456789"}
    body = json.dumps({"model": "llama-3", "prompt": "hi"}).encode()
    async with client.post(p.url + COMPLETIONS, data=body, headers={
            **key, "X-Request-Id": "json", "Content-Type": "application/json"}) as answer:
        json_answer = await answer.read()
    stream_body = json.dumps({"messages": [], "model": "m-2", "stream": True, "events": 4})
    async with client.post(p.url + "/v1/chat/completions", data=stream_body,
                           headers={**key, "X-Request-Id": "sse"}) as answer:
        sse_answer = await answer.read()
    async with client.get(p.url + "/v1/models", headers={**key, "X-Request-Id": "models"}) as a:
        models_answer = await a.read()
    async with client.post(p.url + COMPLETIONS, data=b"{}", headers={"X-Request-Id": "401"}
                           ) as answer:
        unauthorized_answer = await answer.read()
    assert await p.app[LIFECYCLE].wait_idle(BOUND_S)
    access.close()
    lines = log_lines(out)

    plain = lines["json"]
    assert plain["client"] == "127.0.0.1" and plain["tenant"] == "team-a"
    assert plain["model"] == "llama-3" and plain["stream"] is False and plain["attempts"] == 1
    assert (plain["bytes_in"], plain["bytes_out"]) == (len(body), len(json_answer))

    sse = lines["sse"]
    assert sse["model"] == "m-2" and sse["stream"] is True
    assert (sse["bytes_in"], sse["bytes_out"]) == (len(stream_body), len(sse_answer))

    models = lines["models"]
    assert models["model"] is None and models["tenant"] == "team-a"
    assert (models["bytes_in"], models["bytes_out"]) == (0, len(models_answer))

    refused = lines["401"]
    assert refused["status"] == 401 and refused["outcome"] == "rejected:unauthorized"
    assert refused["tenant"] is None and refused["model"] is None
    assert refused["attempts"] == 0 and refused["bytes_out"] == len(unauthorized_answer)


async def test_queue_ms_is_filled_for_a_request_rejected_after_waiting(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    out = io.BytesIO()
    access = AccessLog(out, "json")
    p: Proxy = await proxy(make_config(("r", r.url, 1), queue_timeout_s=0.2), access)
    held = asyncio.create_task(client.post(p.url + COMPLETIONS, json={"hold": True},
                                           headers={"X-Request-Id": "held"}))
    await until(lambda: r.in_flight == 1, "slot held")
    async with client.post(p.url + COMPLETIONS, json={},
                           headers={"X-Request-Id": "waited"}) as answer:
        assert answer.status == 503
    r.gate.set()
    (await held).release()
    assert await p.app[LIFECYCLE].wait_idle(BOUND_S)
    access.close()
    waited = log_lines(out)["waited"]
    assert waited["outcome"] == "rejected:queue_timeout"
    # The queue's deadline decided it: at least that long, whatever the machine's speed.
    assert waited["queue_ms"] is not None and waited["queue_ms"] >= 200
    assert waited["attempts"] == 0 and waited["tenant"] is None


async def test_bytes_out_counts_large_writes_once(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    """Writes past the stall check's size (16 KiB) go out bounded by server.send_timeout_s:
    counted once, like any other (a stream of 40 KB events)."""
    r: FakeReplica = await replicas("r")
    out = io.BytesIO()
    access = AccessLog(out, "json")
    p: Proxy = await proxy(make_config(("r", r.url, 1)), access)
    stream_body = json.dumps({"stream": True, "events": 3, "pad": 40_000})
    async with client.post(p.url + COMPLETIONS, data=stream_body,
                           headers={"X-Request-Id": "big-sse"}) as answer:
        sse_answer = await answer.read()
    assert await p.app[LIFECYCLE].wait_idle(BOUND_S)
    access.close()
    lines = log_lines(out)
    assert len(sse_answer) > 120_000
    assert lines["big-sse"]["bytes_out"] == len(sse_answer)
