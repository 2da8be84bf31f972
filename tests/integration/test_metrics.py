"""Every series checked against the traffic that was sent; the exposition checked by promtool."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from proxy.edge.app import LIFECYCLE
from proxy.observe.accesslog import AccessLog
from proxy.observe.exchange import Exchange
from tests.integration.conftest import FakeReplica, Proxy, make_config, until

Factory = Callable[..., Any]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `make test` installs Debian's prometheus package")
    return path


async def test_series_match_the_traffic_sent(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 2), max_queue=1))

    # 4 plain answers with usage 3 + 5, on two routes.
    for path in (COMPLETIONS, COMPLETIONS, CHAT, CHAT):
        async with client.post(p.url + path, json={}) as resp:
            assert resp.status == 200
            await resp.read()
    # 2 streams of 4 events with a final usage chunk (7 + 4 each).
    for _ in range(2):
        async with client.post(
            p.url + CHAT, json={"stream": True, "events": 4, "include_usage": True}
        ) as resp:
            await resp.read()
    # 1 stream with vLLM's cumulative usage in every chunk: the last counts (7 + 6), not the sum.
    async with client.post(
        p.url + CHAT, json={"stream": True, "events": 6, "continuous_usage": True}
    ) as resp:
        await resp.read()
    # 1 replica error.
    async with client.post(p.url + COMPLETIONS, json={"status": 500}) as resp:
        assert resp.status == 500
        await resp.read()
    # Saturate (2 held), queue one, reject one with 429.
    held = [asyncio.create_task(client.post(p.url + COMPLETIONS, json={"hold": True}))
            for _ in range(2)]
    await until(lambda: r.in_flight == 2, "both slots held")
    queued = asyncio.create_task(client.post(p.url + COMPLETIONS, json={}))
    await until(lambda: p.scheduler.queue_depth == 1, "one queued")
    assert p.metric("batchgate_queue_depth", **{"class": "standard", "model": ""}) == 1
    assert p.metric("batchgate_replica_in_flight", replica="r") == 2
    async with client.post(p.url + COMPLETIONS, json={}) as resp:
        assert resp.status == 429
    r.gate.set()
    for task in (*held, queued):
        resp = await task
        assert resp.status == 200
        await resp.read()
        resp.release()
    # 1 stream held after its first event: at least one gap between chunks, deterministically.
    r.gate.clear()
    async with client.post(
        p.url + CHAT, json={"stream": True, "hold": True, "events": 3, "include_usage": True}
    ) as resp:
        await resp.content.readuntil(b"\n\n")
        r.gate.set()
        await resp.read()
    # 1 caller that hangs up mid-stream.
    r.gate.clear()
    async with aiohttp.ClientSession() as leaver:
        resp = await leaver.post(p.url + CHAT, json={"stream": True, "hold": True, "events": 9})
        await resp.content.readuntil(b"\n\n")
        resp.close()
    await until(lambda: r.aborted == 1, "replica saw the caller leave")
    await until(lambda: p.scheduler.idle(), "all slots back")

    m = p.metric
    assert m("batchgate_requests_total", replica="r", route=COMPLETIONS, code="200",
             tenant="none") == 2 + 3
    assert m("batchgate_requests_total", replica="r", route=CHAT, code="200",
             tenant="none") == 2 + 2 + 1 + 1 + 1
    assert m("batchgate_requests_total", replica="r", route=COMPLETIONS, code="500",
             tenant="none") == 1
    assert m("batchgate_upstream_errors_total", replica="r", kind="status_5xx") == 1
    assert m("batchgate_rejected_requests_total", reason="queue_full") == 1
    assert m("batchgate_client_disconnects_total", stage="streaming") == 1
    # Tokens: 8 plain answers (incl. the 500 and the 3 released) x (3, 5); streams 2 x (7, 4),
    # one (7, 6) and one (7, 3); the hung-up stream never reached its usage.
    assert m("batchgate_tokens_total", replica="r", kind="prompt") == 8 * 3 + 3 * 7 + 7
    assert m("batchgate_tokens_total", replica="r", kind="completion") == 8 * 5 + 2 * 4 + 6 + 3
    # Histograms: every request that reached a replica has a TTFB; completed ones a duration.
    answered = 5 + 7 + 1  # completions 200s + chat 200s (incl. the hung-up one) + the 500
    ttfb = sum(m("batchgate_time_to_first_byte_seconds_count", route=x, stream=y)
               for x in (COMPLETIONS, CHAT) for y in ("true", "false"))
    assert ttfb == answered
    assert m("batchgate_request_duration_seconds_count", route=COMPLETIONS) == 5 + 1
    assert m("batchgate_request_duration_seconds_count", route=CHAT) == 2 + 2 + 1 + 1
    # Every request that asked for a slot waited (maybe 0 s); the 429 did not.
    assert m("batchgate_queue_wait_seconds_count", **{"class": "standard"}) == answered
    # Gaps between chunks of the four streams: at least one each, at most events - 1 + extras.
    gaps = m("batchgate_inter_chunk_seconds_count", route=CHAT)
    assert 1 <= gaps <= (4 + 1) * 2 + 6 + (3 + 1) + 9
    assert m("batchgate_inter_chunk_seconds_count", route=COMPLETIONS) == 0
    assert m("batchgate_build_info", version="0.1.0") == 1
    assert m("batchgate_queue_capacity") == 1
    assert m("batchgate_replica_max_concurrency", replica="r") == 2
    assert m("batchgate_replica_healthy", replica="r") == 1

    async with client.get(p.url + "/metrics") as resp:
        exposition = await resp.read()
    check = await asyncio.create_subprocess_exec(
        promtool(), "check", "metrics", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(check.communicate(exposition), 30)
    assert check.returncode == 0, out.decode()


async def test_queue_timeout_observes_its_wait_but_no_replica_series(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1), queue_timeout_s=0.2))
    held = asyncio.create_task(client.post(p.url + COMPLETIONS, json={"hold": True}))
    await until(lambda: r.in_flight == 1, "slot held")
    async with client.post(p.url + COMPLETIONS, json={}) as resp:
        assert resp.status == 503
    r.gate.set()
    (await held).release()
    await until(lambda: p.scheduler.idle(), "slot back")
    assert p.metric("batchgate_rejected_requests_total", reason="queue_timeout") == 1
    assert p.metric("batchgate_queue_wait_seconds_count", **{"class": "standard"}) == 2
    assert p.metric("batchgate_queue_wait_seconds_sum", **{"class": "standard"}) >= 0.2
    assert p.metric("batchgate_requests_total", replica="r", route=COMPLETIONS, code="200",
                    tenant="none") == 1
    assert p.metric("batchgate_requests_total", replica="r", route=COMPLETIONS, code="503",
                    tenant="none") == 0


async def test_access_log_line_per_request(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    out = io.BytesIO()
    access = AccessLog(out, "json")
    p: Proxy = await proxy(make_config(("r", r.url, 1), max_queue=0), access)
    secret = {"Authorization": "Bearer sk-secret", "X-Request-Id": "rid-1"}
    async with client.post(p.url + CHAT, json={"prompt": "private words"}, headers=secret) as r1:
        assert r1.status == 200
    held = asyncio.create_task(client.post(p.url + COMPLETIONS, json={"hold": True}))
    await until(lambda: r.in_flight == 1, "slot held")
    async with client.post(p.url + COMPLETIONS, json={}, headers={"X-Request-Id": "rid-2"}):
        pass
    r.gate.set()
    (await held).release()
    await until(lambda: p.scheduler.idle(), "all done")
    assert await p.app[LIFECYCLE].wait_idle(10)
    access.close()  # flushes

    text = out.getvalue().decode()
    lines = {entry["request_id"]: entry
             for entry in (json.loads(line) for line in text.splitlines())}
    assert len(lines) == 3
    ok = lines["rid-1"]
    assert set(ok) == {"time", "request_id", "method", "path", "replica", "status", "outcome",
                       "queue_ms", "ttfb_ms", "duration_ms", "prompt_tokens",
                       "completion_tokens", "client", "tenant", "model", "stream", "attempts",
                       "bytes_in", "bytes_out"}
    assert ok["method"] == "POST" and ok["path"] == CHAT and ok["replica"] == "r"
    assert ok["status"] == 200 and ok["outcome"] == "ok"
    assert ok["prompt_tokens"] == 3 and ok["completion_tokens"] == 5
    assert ok["time"].endswith("Z")
    for key in ("queue_ms", "ttfb_ms", "duration_ms"):
        assert isinstance(ok[key], float) and ok[key] >= 0
    rejected = lines["rid-2"]
    assert rejected["status"] == 429 and rejected["outcome"] == "rejected:queue_full"
    assert rejected["replica"] is None and rejected["ttfb_ms"] is None
    assert "sk-secret" not in text and "private words" not in text


def test_access_log_text_format() -> None:
    out = io.BytesIO()
    access = AccessLog(out, "text")
    exchange = Exchange(request_id="rid", method="GET", path="/v1/models", route="/v1/models",
                        arrival=0.0, started=time.monotonic(), replica="r", status=200)
    access.record(exchange)
    access.close()
    line = out.getvalue().decode()
    assert line.count("\n") == 1
    assert " GET /v1/models 200 ok request_id=rid replica=r " in line
