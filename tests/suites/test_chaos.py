"""Chaos: 2,000 mixed requests over three misbehaving replicas while callers hang up.

JSON completions, SSE streams and slot-free GETs go through the proxy to three real aiohttp
replicas on 127.0.0.1: ``flaky`` is killed (every connection reset) and restarted mid-run,
``bursty`` answers 500 in runs, ``slow`` takes ten times as long. One caller in four hangs
up: before the answer's head, right after it, or mid-stream. Everything random comes from one
seed, so a failure replays.

Then, by what the callers and the replicas saw (not only by what the proxy says):
- every request has exactly one line in the access log, whose outcome agrees with what its
  caller got (a caller that stayed always got an answer);
- the counters agree with the log: rejections, hang-ups, and replica answers by code;
- no POST body reached a replica twice, and no replica ever held more than its cap;
- at the end every gauge is 0: queue, slots, slot-free bound, handlers, pooled connections.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from proxy.edge.keys import METRICS
from proxy.observe.accesslog import AccessLog
from tests.integration.conftest import BOUND_S, make_config
from tests.suites.chaos_replica import MARK, ChaosReplica
from tests.suites.harness import RunningProxy, running_proxy

SEED = 20261201
REQUESTS = 2000
CALLERS = 40  # concurrent callers: with 12 slots and a queue of 24, some get 429
CAP = 4
KILL_AT, RESTART_AT = 600, 1000  # request numbers at which flaky dies and comes back


@dataclass(frozen=True)
class Plan:
    rid: str
    kind: str  # "json", "sse" or "get"
    hangup: str | None  # None, "before_head", "after_head" or "mid_stream"
    delay_s: float  # before_head: how long the caller waits before it leaves
    events: int  # mid_stream: events read before it leaves


@dataclass
class Got:
    """What one caller saw."""

    status: int | None = None
    marked: bool = False  # the answer came from a replica
    complete: bool = False  # its body ended properly ([DONE] for a stream)
    error_event: bool = False  # a stream ended with batchgate's ``event: error``
    code: str | None = None  # batchgate's own error code (JSON body)
    hung_up: bool = False


def plans(rng: random.Random) -> list[Plan]:
    out = []
    for i in range(REQUESTS):
        kind = rng.choices(["json", "sse", "get"], weights=[5, 4, 1])[0]
        hangup = None
        if rng.random() < 0.25:
            hangup = rng.choice(["before_head", "after_head"]
                                + (["mid_stream", "mid_stream"] if kind == "sse" else []))
        out.append(Plan(f"c{i}", kind, hangup, rng.uniform(0, 0.015), rng.randint(0, 3)))
    return out


def wire(plan: Plan) -> bytes:
    if plan.kind == "get":
        return (f"GET /version?id={plan.rid} HTTP/1.1\r\nHost: chaos\r\n"
                f"X-Request-Id: {plan.rid}\r\n\r\n").encode()
    spec: dict[str, Any] = {"id": plan.rid, "prompt": "hi", "max_tokens": 3}
    if plan.kind == "sse":
        spec |= {"stream": True, "events": 5}
    body = json.dumps(spec).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nHost: chaos\r\nX-Request-Id: {plan.rid}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def call(url: str, plan: Plan) -> Got:
    got = Got()
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(wire(plan))
        if plan.hangup == "before_head":
            await asyncio.sleep(plan.delay_s)  # the caller's own impatience
            got.hung_up = True
            return got
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return got  # closed without an answer: the test fails on it
        lines = head.decode("latin-1").split("\r\n")
        got.status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        got.marked = MARK.lower() in headers
        if plan.hangup == "after_head":
            got.hung_up = True
            return got
        await read_body(reader, headers, plan, got)
        return got
    finally:
        writer.close()


async def read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], plan: Plan, got: Got
) -> None:
    try:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body, events = b"", 0
            while size := int((await reader.readline()).split(b";")[0], 16):
                body += (await reader.readexactly(size + 2))[:-2]
                events = body.count(b"\n\n")
                if plan.hangup == "mid_stream" and events > plan.events:
                    got.hung_up = True
                    return
            await reader.readline()
            got.error_event = b"event: error" in body
            got.complete = body.endswith(b"data: [DONE]\n\n") or got.error_event
        else:
            body = await reader.readexactly(int(headers["content-length"]))
            got.complete = True
            if plan.hangup == "mid_stream":  # the answer was not a stream: it is over
                got.hung_up = True
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        return  # cut: complete stays False
    if not got.marked and got.status is not None and got.status >= 400:
        got.code = json.loads(body)["error"]["code"]


@pytest.fixture
async def replicas() -> AsyncIterator[list[ChaosReplica]]:
    started = [ChaosReplica("flaky"), ChaosReplica("bursty", burst=(6, 40)),
               ChaosReplica("slow", latency_s=0.02)]
    for replica in started:
        await replica.start()
    yield started
    for replica in started:
        await replica.stop()


async def scrape_gauges(proxy: RunningProxy) -> dict[str, float]:
    reader, writer = await asyncio.open_connection(*proxy.url[7:].split(":"))
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: chaos\r\nConnection: close\r\n\r\n")
    text = (await asyncio.wait_for(reader.read(), BOUND_S)).decode()
    writer.close()
    wanted = ("batchgate_queue_depth{", "batchgate_replica_in_flight{")
    gauges: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(wanted):
            name, value = line.rsplit(" ", 1)
            if name.startswith("batchgate_queue_depth"):  # per class and model: the sum
                name = "batchgate_queue_depth"
            gauges[name] = gauges.get(name, 0.0) + float(value)
    return gauges


def expected_outcome(got: Got) -> set[str]:
    """The access-log outcomes that agree with what a caller who stayed saw."""
    if got.marked and got.complete and not got.error_event:
        return {"ok"}
    if got.marked:  # a replica's answer that then failed: a cut body or an error event
        return {"upstream_error:reset", "upstream_error:timeout", "upstream_error:malformed"}
    assert got.code is not None
    kind = got.code.removeprefix("upstream_")
    return {f"upstream_error:{kind}"} if kind != got.code else {f"rejected:{got.code}"}


async def test_chaos(replicas: list[ChaosReplica]) -> None:
    flaky, bursty, slow = replicas
    rng = random.Random(SEED)
    todo = plans(rng)
    log = io.BytesIO()
    access_log = AccessLog(log, "json")
    config = make_config(*((r.name, r.url, CAP) for r in replicas), max_queue=24,
                         health_interval_s=0.1)
    results: dict[str, Got] = {}
    try:
        async with running_proxy(config, access_log=access_log) as proxy:
            callers = asyncio.Semaphore(CALLERS)
            tasks = []

            async def one(plan: Plan) -> None:
                try:
                    results[plan.rid] = await asyncio.wait_for(call(proxy.url, plan), BOUND_S)
                finally:
                    callers.release()

            for i, plan in enumerate(todo):
                await callers.acquire()
                if i == KILL_AT:
                    await flaky.kill()
                elif i == RESTART_AT:
                    await flaky.start()
                tasks.append(asyncio.create_task(one(plan)))
            await asyncio.gather(*tasks)
            await proxy.settled("after the run")
            gauges = await scrape_gauges(proxy)
            metrics = {name: sum_samples(proxy, name) for name in COUNTERS}
            by_code = {code: sum_samples(proxy, "batchgate_requests_total", code=code)
                       for code in ("200", "500")}
    finally:
        access_log.close()

    # -- one terminal outcome per request, agreeing with its caller -------------------------
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    ids = Counter(line["request_id"] for line in lines)
    assert ids == Counter(p.rid for p in todo), "not exactly one access-log line per request"
    entry = {line["request_id"]: line for line in lines}
    for plan in todo:
        got = results[plan.rid]
        if got.hung_up:
            continue
        assert got.status is not None, f"{plan}: the connection closed without an answer"
        line = entry[plan.rid]
        assert line["status"] == got.status, (plan, got, line)
        assert line["outcome"] in expected_outcome(got), (plan, got, line)
    outcomes = Counter(line["outcome"].split(":")[0] for line in lines)

    # -- the counters agree with the log --------------------------------------------------
    assert metrics["batchgate_rejected_requests_total"] == outcomes["rejected"]
    assert metrics["batchgate_client_disconnects_total"] == outcomes["client_disconnect"]
    for code, count in by_code.items():
        assert count == sum(1 for line in lines if line["status"] == int(code)), code
    assert sum_samples(proxy, "batchgate_upstream_errors_total", kind="status_5xx") == \
        by_code["500"]

    # -- what the replicas saw ------------------------------------------------------------
    posts = {p.rid for p in todo if p.kind != "get"}
    twice = {rid: n for rid in posts
             if (n := sum(r.seen[rid] for r in replicas)) > 1}
    assert not twice, f"POST bodies that reached replicas more than once: {twice}"
    assert all(r.peak <= CAP for r in replicas), [(r.name, r.peak) for r in replicas]
    assert gauges == {"batchgate_queue_depth": 0.0,
                      **{f'batchgate_replica_in_flight{{replica="{r.name}"}}': 0.0
                         for r in replicas}}, gauges
    # The run did what it says: every misbehaviour happened, and so did every hang-up stage.
    assert bursty.arrivals and slow.arrivals and flaky.arrivals
    assert outcomes["client_disconnect"] and outcomes["upstream_error"] and by_code["500"]
    stages = Counter(p.hangup for p in todo)
    assert all(stages[s] for s in ("before_head", "after_head", "mid_stream"))


COUNTERS = ("batchgate_rejected_requests_total", "batchgate_client_disconnects_total")


def sum_samples(proxy: RunningProxy, name: str, **labels: str) -> float:
    """The sum of a counter's samples over every label set that has ``labels``."""
    total = 0.0
    for family in proxy.app[METRICS].registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total
