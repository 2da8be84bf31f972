"""Issue 10 from outside: the installed ``batchgate`` command, real processes, real sockets.

Each check reads like a sentence of the issue (model routing, classes and tenant fair share,
token budgets, adaptive caps, honest waiting, configuration). The proxy runs as
``batchgate serve --config file.yaml`` on 127.0.0.1; the replicas are FakeReplicas in this
process that block on their gates, so which request is where is decided by the test, and
every wait is for a state (a metric, a log line, a replica's count), bounded. One proxy
process serves each group of checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import requests
import yaml
from aiohttp import web
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import FakeReplica, start_app
from tests.integration.fakedns import FakeDns

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BATCHGATE = Path(sys.executable).parent / "batchgate"
BOUND_S = 15.0  # deadlock guard for each wait (two busy cores): a failure fails, never hangs
LISTENING = re.compile(rb"batchgate listening on (http://127\.0\.0\.1:\d+)")

pytestmark = pytest.mark.skipif(not BATCHGATE.exists(), reason="batchgate not installed")

Factory = Callable[..., Any]
CONFIGS = itertools.count()
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- harness ------------------------------------------------------------------------------


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    url: str
    lines: list[bytes] = field(default_factory=list)

    def logged(self, text: str) -> bool:
        return any(text.encode() in line for line in self.lines)


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, config: dict[str, Any]) -> AsyncIterator[Served]:
    """``batchgate serve --config`` as a subprocess; its port from the log; killed at the end."""
    config = {"server": {"host": "127.0.0.1", "port": 0}, "logging": {"format": "text"},
              **config}
    path = tmp_path / f"batchgate-{next(CONFIGS)}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        str(BATCHGATE), "serve", "--config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    lines: list[bytes] = []
    pump: asyncio.Task[None] | None = None
    try:
        async def listening() -> str:
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                lines.append(line)
                if match := LISTENING.search(line):
                    return match.group(1).decode()
            raise AssertionError(f"batchgate exited before listening: {b''.join(lines)!r}")

        url = await asyncio.wait_for(listening(), BOUND_S)

        async def keep_reading() -> None:
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                lines.append(line)

        pump = asyncio.create_task(keep_reading())
        yield Served(proc, url, lines)
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), BOUND_S)
        if pump is not None:
            await asyncio.wait_for(pump, BOUND_S)


@contextlib.asynccontextmanager
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=BOUND_S * 3),
    ) as s:
        yield s


async def scrape(client: aiohttp.ClientSession, url: str) -> Samples:
    async with client.get(url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


async def metric(client: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float | None:
    """The sample of ``name`` with exactly these labels, else None."""
    return (await scrape(client, url)).get((name, frozenset(labels.items())))


async def poll(check: Callable[[], Awaitable[bool]], what: str, bound: float = BOUND_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


async def depth_is(client: aiohttp.ClientSession, url: str, n: float, **labels: str) -> None:
    async def check() -> bool:
        return await metric(client, url, "batchgate_queue_depth", **labels) == n

    await poll(check, f"batchgate_queue_depth{labels} == {n}")


async def total_depth_is(client: aiohttp.ClientSession, url: str, n: float) -> None:
    async def check() -> bool:
        samples = await scrape(client, url)
        return sum(v for (name, _), v in samples.items() if name == "batchgate_queue_depth") == n

    await poll(check, f"whole queue == {n}")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


async def post(client: aiohttp.ClientSession, url: str, body: dict[str, Any],
               headers: dict[str, str] | None = None,
               path: str = "/v1/completions") -> Answer:
    async with client.post(url + path, json=body, headers=headers or {}) as r:
        raw = await r.read()
        try:
            parsed: Any = json.loads(raw)
        except ValueError:
            parsed = raw
        return Answer(r.status, dict(r.headers), parsed)


def error_code(answer: Answer) -> str:
    assert isinstance(answer.body, dict), answer.body
    error = answer.body["error"]
    assert set(error) >= {"message", "type", "code"}, error
    return str(error["code"])


def spawn(coro: Awaitable[Answer], stack: contextlib.AsyncExitStack) -> asyncio.Task[Answer]:
    task: asyncio.Task[Answer] = asyncio.ensure_future(coro)

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task

    stack.push_async_callback(cancel)
    return task


async def replica(name: str, stack: contextlib.AsyncExitStack,
                  model_ids: list[str] | None = None) -> FakeReplica:
    r = FakeReplica(name, model_ids=model_ids)
    r.runner, r.url = await start_app(r.app())

    async def stop() -> None:
        r.gate.set()
        assert r.runner is not None
        await r.runner.cleanup()

    stack.push_async_callback(stop)
    return r


def served_by(r: FakeReplica) -> list[dict[str, Any]]:
    return [json.loads(body) for method, _, body in r.seen if body[:1] == b"{"]


HEALTH = {"interval_s": 0.3, "timeout_s": 2}


# --- model routing ------------------------------------------------------------------------


async def test_model_routing(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        a = await replica("a", stack)
        b = await replica("b", stack, model_ids=["m2"])
        c = await replica("c", stack)
        config = {
            "replicas": [
                {"name": "a", "url": a.url, "max_concurrency": 1, "models": ["m1", "shared"]},
                {"name": "b", "url": b.url, "max_concurrency": 2, "models": "auto"},
                {"name": "c", "url": c.url, "max_concurrency": 1, "models": ["m3", "shared"]},
            ],
            "queue": {"max_size": 2},
            "health": HEALTH,
        }
        served = await stack.enter_async_context(serve(tmp_path, config))
        client = await stack.enter_async_context(session())
        url = served.url

        # The model of the JSON body picks the replica.
        assert (await post(client, url, {"model": "m1"})).body["replica"] == "a"
        assert (await post(client, url, {"model": "m3"})).body["replica"] == "c"
        # `auto`: read from the replica's /v1/models at startup.
        got = await post(client, url, {"model": "m2"})
        assert got.status == 200 and got.body["replica"] == "b", got
        assert "X-Batchgate-Queue-Ms" in got.headers

        # A model nobody serves: 404 model_not_found, no slot, no wait, never forwarded.
        arrivals = a.arrivals + b.arrivals + c.arrivals
        nobody = await post(client, url, {"model": "nobody-serves-this"})
        assert nobody.status == 404
        assert error_code(nobody) == "model_not_found"
        assert a.arrivals + b.arrivals + c.arrivals == arrivals
        assert await metric(client, url, "batchgate_rejected_requests_total",
                            reason="model_not_found") == 1

        # No head-of-line blocking: m1's only replica is busy and m1 requests wait (two fill
        # the queue, max_size 2); m3 and m2 requests still go at once, not 429.
        held = spawn(post(client, url, {"model": "m1", "hold": True}), stack)
        waiting = [spawn(post(client, url, {"model": "m1"}), stack) for _ in range(2)]
        await depth_is(client, url, 2, **{"class": "standard", "model": "m1"})
        assert a.in_flight == 1
        for model, name in (("m3", "c"), ("m2", "b")):
            at_once = await post(client, url, {"model": model})
            assert at_once.status == 200, at_once
            assert at_once.body["replica"] == name
        # A model nobody serves is 404 even now, not queue_full.
        nobody = await post(client, url, {"model": "nobody-serves-this"})
        assert nobody.status == 404 and error_code(nobody) == "model_not_found", nobody
        # And a request that must wait is refused: the queue is full.
        full = await post(client, url, {"model": "m1"})
        assert full.status == 429 and error_code(full) == "queue_full", full
        assert int(full.headers["Retry-After"]) >= 1
        assert not any(w.done() for w in waiting)
        a.gate.set()
        assert (await held).status == 200
        for w in waiting:
            done = await w
            assert done.status == 200 and done.body["replica"] == "a"
            assert int(done.headers["X-Batchgate-Queue-Ms"]) >= 0

        # Classes do not bring head-of-line blocking back: an interactive m1 waiter never
        # holds back a batch m3 waiter once m3's replica has a free slot.
        a.gate.clear()
        held_a = spawn(post(client, url, {"model": "m1", "hold": True}), stack)
        held_c = spawn(post(client, url, {"model": "m3", "hold": True}), stack)

        async def both_busy() -> bool:
            return a.in_flight == 1 and c.in_flight == 1

        await poll(both_busy, "a and c busy")
        top = spawn(post(client, url, {"model": "m1"}, {"X-Batchgate-Class": "interactive"}),
                    stack)
        low = spawn(post(client, url, {"model": "m3"}, {"X-Batchgate-Class": "batch"}), stack)
        await total_depth_is(client, url, 2)
        c.gate.set()
        assert (await held_c).status == 200
        got = await asyncio.wait_for(low, BOUND_S)
        assert got.status == 200 and got.body["replica"] == "c"
        assert not top.done()
        a.gate.set()
        assert (await held_a).status == 200 and (await top).status == 200

        # /v1/models lists each served model once.
        async def listed() -> list[str]:
            async with client.get(url + "/v1/models") as r:
                assert r.status == 200
                return [m["id"] for m in (await r.json())["data"]]

        ids = await listed()
        assert sorted(ids) == ["m1", "m2", "m3", "shared"], ids

        # `auto`: a newly served model is routed within a probe interval or so.
        b.model_ids = ["m2", "m4", "shared"]

        async def m4_listed() -> bool:
            return "m4" in await listed()

        await poll(m4_listed, "m4 in /v1/models after b started serving it")
        got = await post(client, url, {"model": "m4"})
        assert got.status == 200 and got.body["replica"] == "b", got
        ids = await listed()
        assert sorted(ids) == ["m1", "m2", "m3", "m4", "shared"], ids
        # ... and a model it stops serving is no longer routed to it.
        b.model_ids = ["m4"]

        async def m2_gone() -> bool:
            return (await post(client, url, {"model": "m2"})).status == 404

        await poll(m2_gone, "m2 no longer served once b's /v1/models dropped it")


async def test_early_refusal_counts_only_the_waiters_of_its_own_replicas(tmp_path: Path) -> None:
    """"Given its position": a request first in line for the replicas that serve its model
    is the head of its queue, whatever waits for other models (no head-of-line blocking
    across models), so it is never refused early."""
    async with contextlib.AsyncExitStack() as stack:
        a = await replica("a", stack)
        c = await replica("c", stack)
        config = {
            "replicas": [
                {"name": "a", "url": a.url, "max_concurrency": 1, "models": ["m1"]},
                {"name": "c", "url": c.url, "max_concurrency": 1, "models": ["m3"]},
            ],
            "health": HEALTH,
        }
        served = await stack.enter_async_context(serve(tmp_path, config))
        client = await stack.enter_async_context(session())
        url = served.url
        # History: slots held about 0.5 s each, on both replicas.
        history = await asyncio.gather(*(post(client, url, {"model": m, "delay_ms": 500})
                                         for m in ("m1", "m3", "m1", "m3")))
        assert all(h.status == 200 for h in history)
        held_a = spawn(post(client, url, {"model": "m1", "hold": True}), stack)
        held_c = spawn(post(client, url, {"model": "m3", "hold": True}), stack)

        async def both_busy() -> bool:
            return a.in_flight == 1 and c.in_flight == 1

        await poll(both_busy, "a and c busy")
        m1_waiters = [spawn(post(client, url, {"model": "m1"}), stack) for _ in range(10)]
        await depth_is(client, url, 10, **{"class": "standard", "model": "m1"})
        # First in line for c: not refused; it starts as soon as c's slot frees.
        m3 = spawn(post(client, url, {"model": "m3"}, {"X-Batchgate-Deadline-Ms": "2000"}),
                   stack)

        async def m3_queued_or_answered() -> bool:
            return m3.done() or await metric(client, url, "batchgate_queue_depth",
                                             **{"class": "standard", "model": "m3"}) == 1

        await poll(m3_queued_or_answered, "the m3 request queued (or answered)")
        c.gate.set()
        got = await asyncio.wait_for(m3, BOUND_S)
        assert got.status == 200, got
        assert got.body["replica"] == "c"
        a.gate.set()
        for task in (held_a, held_c, *m1_waiters):
            assert (await asyncio.wait_for(task, BOUND_S)).status == 200


async def test_discovery_models(tmp_path: Path) -> None:
    dns = FakeDns()
    await dns.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            d = await replica("d", stack)
            port = int(d.url.rsplit(":", 1)[1])
            dns.set("llm.test", "127.0.0.1")
            config = {
                "replicas": [],
                "discovery": [{"dns": "llm.test", "port": port, "max_concurrency": 2,
                               "name_prefix": "llm", "interval_s": 0.2,
                               "nameservers": [dns.nameserver], "models": ["dm"]}],
                "health": {**HEALTH, "ready_without_replicas": True},
                # No waiting at all: what can go at once still goes.
                "queue": {"max_size": 0},
            }
            served = await stack.enter_async_context(serve(tmp_path, config))
            client = await stack.enter_async_context(session())

            async def found() -> bool:
                got = await post(client, served.url, {"model": "dm"})
                return got.status == 200

            await poll(found, "a request for dm served by the discovered replica")
            together = await asyncio.gather(*(post(client, served.url, {"model": "dm"})
                                              for _ in range(2)))
            assert [t.status for t in together] == [200, 200], together
            other = await post(client, served.url, {"model": "not-dm"})
            assert other.status == 404 and error_code(other) == "model_not_found"
    finally:
        await dns.close()


# --- classes, eviction, tenants -----------------------------------------------------------


async def test_classes_and_eviction(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        r = await replica("r", stack)
        config = {
            "replicas": [{"name": "r", "url": r.url, "max_concurrency": 1}],
            "queue": {"max_size": 3},
            "health": HEALTH,
            "auth": {"api_keys": [
                {"name": "web", "key": "k-web", "class": "interactive"},
                {"name": "etl", "key": "k-etl", "class": "batch"},
                {"name": "std", "key": "k-std"},
            ]},
        }
        served = await stack.enter_async_context(serve(tmp_path, config))
        client = await stack.enter_async_context(session())
        url = served.url

        def key(k: str, **extra: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {k}", **extra}

        # Default classes, exported at 0 from startup.
        samples = await scrape(client, url)
        for cls in ("interactive", "standard", "batch"):
            assert samples.get(("batchgate_queue_depth",
                                frozenset({"class": cls, "model": ""}.items()))) == 0, cls

        # An unknown class name: 400, OpenAI-style.
        bad = await post(client, url, {"i": 0}, key("k-std", **{"X-Batchgate-Class": "vip"}))
        assert bad.status == 400, bad
        error_code(bad)
        # Model-blind (no `models`): any model name is sent on.
        assert (await post(client, url, {"model": "anything"}, key("k-std"))).status == 200

        held = spawn(post(client, url, {"i": "held", "hold": True}, key("k-std")), stack)

        async def busy() -> bool:
            return r.in_flight == 1

        await poll(busy, "the only slot is held")
        batch1 = spawn(post(client, url, {"i": "batch1"}, key("k-etl")), stack)
        await depth_is(client, url, 1, **{"class": "batch", "model": ""})
        # The header wins over the key's class.
        batch2 = spawn(post(client, url, {"i": "batch2"},
                            key("k-std", **{"X-Batchgate-Class": "batch"})), stack)
        await depth_is(client, url, 2, **{"class": "batch", "model": ""})
        standard = spawn(post(client, url, {"i": "standard"}, key("k-std")), stack)
        await depth_is(client, url, 1, **{"class": "standard", "model": ""})
        # Full (3): a batch newcomer is refused itself.
        refused = await post(client, url, {"i": "batch3"}, key("k-etl"))
        assert refused.status == 429 and error_code(refused) == "queue_full"
        # A higher class evicts the newest waiter of the lowest class, batch2.
        interactive = spawn(post(client, url, {"i": "interactive"}, key("k-web")), stack)
        evicted = await asyncio.wait_for(batch2, BOUND_S)
        assert evicted.status == 429 and error_code(evicted) == "queue_full", evicted
        assert int(evicted.headers["Retry-After"]) >= 1
        await depth_is(client, url, 1, **{"class": "interactive", "model": ""})
        assert not batch1.done()

        r.gate.set()
        for task in (held, interactive, standard, batch1):
            assert (await asyncio.wait_for(task, BOUND_S)).status == 200
        order = [body.get("i") for body in served_by(r)]
        assert order[-4:] == ["held", "interactive", "standard", "batch1"], order

        samples = await scrape(client, url)
        assert samples.get(("batchgate_queue_wait_seconds_count",
                            frozenset({"class": "interactive"}.items())), 0) >= 1
        tenants = {dict(labels).get("tenant") for (name, labels) in samples
                   if name == "batchgate_requests_total"}
        assert {"web", "etl", "std"} <= tenants, tenants


async def test_fair_share_by_weight_and_burst(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        r = await replica("r", stack)
        config = {
            "replicas": [{"name": "r", "url": r.url, "max_concurrency": 1}],
            "queue": {"max_size": 2000},
            "health": HEALTH,
            "auth": {"api_keys": [
                {"name": "heavy", "key": "k-heavy", "weight": 2},
                {"name": "light", "key": "k-light"},
                {"name": "capped", "key": "k-capped", "max_queued": 1},
            ]},
        }
        served = await stack.enter_async_context(serve(tmp_path, config))
        client = await stack.enter_async_context(session())
        url = served.url
        heavy = {"Authorization": "Bearer k-heavy"}
        light = {"Authorization": "Bearer k-light"}

        async def hold_slot() -> asyncio.Task[Answer]:
            r.gate.clear()
            task = spawn(post(client, url, {"t": "hold", "hold": True}, light), stack)

            async def busy() -> bool:
                return r.in_flight == 1

            await poll(busy, "the slot is held")
            return task

        # Per-tenant max_queued.
        held = await hold_slot()
        one = spawn(post(client, url, {"t": "capped"}, {"Authorization": "Bearer k-capped"}),
                    stack)
        await total_depth_is(client, url, 1)
        two = await post(client, url, {"t": "capped"}, {"Authorization": "Bearer k-capped"})
        assert two.status == 429 and error_code(two) == "queue_full", two
        r.gate.set()
        assert (await held).status == 200 and (await one).status == 200

        # Weights 2:1 with both backlogged; the heavy tenant arrived first, in full.
        start = len(r.seen)
        held = await hold_slot()
        tasks = [spawn(post(client, url, {"t": "heavy"}, heavy), stack) for _ in range(30)]
        await total_depth_is(client, url, 30)
        tasks += [spawn(post(client, url, {"t": "light"}, light), stack) for _ in range(30)]
        await total_depth_is(client, url, 60)
        r.gate.set()
        for task in [held, *tasks]:
            assert (await asyncio.wait_for(task, BOUND_S)).status == 200
        order = [body["t"] for body in served_by(r)[start + 1:]]
        first = order[:30]
        assert 18 <= first.count("heavy") <= 22, order

        # A burst of one tenant does not delay another's single request by more than a
        # handful of dispatches.
        start = len(r.seen)
        held = await hold_slot()
        burst = [spawn(post(client, url, {"t": "heavy"}, heavy), stack) for _ in range(1000)]
        await total_depth_is(client, url, 1000)
        single = spawn(post(client, url, {"t": "single"}, light), stack)
        await total_depth_is(client, url, 1001)
        r.gate.set()
        for task in [held, single, *burst]:
            assert (await asyncio.wait_for(task, BOUND_S * 2)).status == 200
        order = [body["t"] for body in served_by(r)[start + 1:]]
        assert order.index("single") <= 5, order[:10]


# --- token budgets, tenant header ---------------------------------------------------------


async def test_token_budgets_and_tenant_header(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        r = await replica("r", stack)
        config = {
            "replicas": [{"name": "r", "url": r.url, "max_concurrency": 4,
                          "max_tokens_in_flight": 1000}],
            "scheduling": {"default_max_tokens": 600, "tenant_header": "X-Team",
                           "max_queued_per_tenant": 20},
            "health": HEALTH,
        }
        served = await stack.enter_async_context(serve(tmp_path, config))
        client = await stack.enter_async_context(session())
        url = served.url

        # Too large for an empty replica: 400 at once, never forwarded.
        for body in ({"prompt": "hi", "max_tokens": 2000},
                     {"prompt": "hi", "max_completion_tokens": 2000},
                     {"prompt": "x" * 4000, "max_tokens": 10},
                     {"messages": [{"role": "user", "content": "x" * 4000}], "max_tokens": 10}):
            too_large = await post(client, url, body)
            assert too_large.status == 400, (body, too_large)
            error_code(too_large)
        assert r.arrivals == 0
        # Once `usage` has shown the real characters per token (FakeReplica: 3 prompt tokens
        # for 3,000 characters), a 4,000-character prompt is no longer too large.
        assert (await post(client, url, {"prompt": "x" * 3000, "max_tokens": 10})).status == 200
        calibrated = await post(client, url, {"prompt": "x" * 4000, "max_tokens": 10})
        assert calibrated.status == 200, calibrated

        # Both must fit: a free slot (4) but no tokens -> it waits; default_max_tokens counts.
        held = spawn(post(client, url, {"prompt": "hi", "max_tokens": 600, "hold": True}),
                     stack)

        async def busy() -> bool:
            return r.in_flight == 1

        await poll(busy, "a 600-token request in flight")
        small = await post(client, url, {"prompt": "hi", "max_tokens": 100})
        assert small.status == 200, small  # 100 more tokens fit beside the 600
        waits = spawn(post(client, url, {"prompt": "hi"}), stack)
        await total_depth_is(client, url, 1)
        assert not waits.done() and r.in_flight == 1
        r.gate.set()
        assert (await held).status == 200 and (await waits).status == 200

        # scheduling.tenant_header: each value a tenant (weight 1), fair within a class;
        # every request costs 600 of 1000 tokens, so they run one at a time.
        r.gate.clear()
        start = len(r.seen)
        held = spawn(post(client, url, {"t": "hold", "max_tokens": 600, "hold": True}), stack)
        await poll(busy, "held again")
        team_a = [spawn(post(client, url, {"t": "a", "max_tokens": 600}, {"X-Team": "a"}),
                        stack) for _ in range(20)]
        await total_depth_is(client, url, 20)
        over = await post(client, url, {"t": "a", "max_tokens": 600}, {"X-Team": "a"})
        assert over.status == 429 and error_code(over) == "queue_full", over  # its 21st
        team_b = [spawn(post(client, url, {"t": "b", "max_tokens": 600}, {"X-Team": "b"}),
                        stack) for _ in range(20)]
        await total_depth_is(client, url, 40)
        r.gate.set()
        for task in [held, *team_a, *team_b]:
            assert (await asyncio.wait_for(task, BOUND_S)).status == 200
        order = [body["t"] for body in served_by(r)[start + 1:]]
        assert 8 <= order[:20].count("a") <= 12, order
        assert r.peak <= 2  # 600 + 600 never ran together; at most 600 + 100
        # Tenants named by a header are not metric labels (unbounded): `none`.
        samples = await scrape(client, url)
        tenants = {dict(labels).get("tenant") for (name, labels) in samples
                   if name == "batchgate_requests_total"}
        assert tenants == {"none"}, tenants


# --- honest waiting -----------------------------------------------------------------------


async def test_heartbeats_deadlines_and_early_refusal(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        r = await replica("r", stack)
        config = {
            "replicas": [{"name": "r", "url": r.url, "max_concurrency": 1}],
            "queue": {"sse_heartbeat_s": 0.1, "timeout_s": 30},
            "health": HEALTH,
        }
        served = await stack.enter_async_context(serve(tmp_path, config))
        client = await stack.enter_async_context(session())
        url = served.url

        bad = await post(client, url, {"i": 0}, {"X-Batchgate-Deadline-Ms": "soon"})
        assert bad.status == 400
        error_code(bad)

        # A stream that need not wait is unchanged: the replica's answer, with its queue time.
        async with client.post(url + "/v1/completions", json={"stream": True}) as at_once:
            assert at_once.status == 200 and at_once.headers["X-Batchgate-Queue-Ms"] == "0"
            assert b"data: [DONE]" in await at_once.read()

        held = spawn(post(client, url, {"hold": True}), stack)

        async def busy() -> bool:
            return r.in_flight == 1

        await poll(busy, "the slot is held")

        # A waiting stream: 200 + text/event-stream at once, then `: queued position=1`.
        stream = await stack.enter_async_context(
            client.post(url + "/v1/completions", json={"stream": True, "events": 2}))
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert await metric(client, url, "batchgate_queue_depth",
                            **{"class": "standard", "model": ""}) == 1
        beats = 0
        while beats < 2:
            line = await asyncio.wait_for(stream.content.readline(), BOUND_S)
            assert line.strip() in (b"", b": queued position=1"), line
            beats += line.strip() == b": queued position=1"
        # A second waiting stream is told its own place; the openai SDK reads it unchanged.
        sdk = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stack.push_async_callback(sdk.close)

        async def sdk_stream(extra: dict[str, str] | None = None) -> list[str]:
            chunks = await sdk.completions.create(model="any", prompt="hi", stream=True,
                                                  extra_headers=extra,
                                                  extra_body={"events": 3})
            return [c.choices[0].text async for c in chunks]

        second = await stack.enter_async_context(
            client.post(url + "/v1/completions", json={"stream": True, "events": 2}))
        assert second.status == 200
        await depth_is(client, url, 2, **{"class": "standard", "model": ""})
        while (line := await asyncio.wait_for(second.content.readline(), BOUND_S)).strip() \
                in (b"", b": queued position=1"):
            pass
        assert line.strip() == b": queued position=2", line
        via_sdk = asyncio.ensure_future(sdk_stream())
        await depth_is(client, url, 3, **{"class": "standard", "model": ""})
        via_requests = asyncio.ensure_future(asyncio.to_thread(seed_client, url))
        await depth_is(client, url, 4, **{"class": "standard", "model": ""})
        r.gate.set()
        assert (await held).status == 200
        rest = await asyncio.wait_for(stream.content.read(), BOUND_S)
        assert b"data: [DONE]" in rest and b'"text":" t1"' in rest, rest
        assert b"data: [DONE]" in await asyncio.wait_for(second.content.read(), BOUND_S)
        assert await asyncio.wait_for(via_sdk, BOUND_S) == [" t0", " t1", " t2"]
        assert await asyncio.wait_for(via_requests, BOUND_S) == [" t0", " t1", " t2"]

        # Rejected while it waits: an `event: error` with the OpenAI error object, then end.
        r.gate.clear()
        held = spawn(post(client, url, {"hold": True}), stack)
        await poll(busy, "held again")
        async with client.post(url + "/v1/completions", json={"stream": True},
                               headers={"X-Batchgate-Deadline-Ms": "300"}) as late:
            assert late.status == 200
            text = (await asyncio.wait_for(late.content.read(), BOUND_S)).decode()
        assert "event: error" in text, text
        data = text.split("event: error", 1)[1].split("data: ", 1)[1].split("\n", 1)[0]
        error = json.loads(data)["error"]
        assert error["code"] == "queue_timeout", error
        assert {"message", "type"} <= set(error)
        # A non-streaming request's shorter deadline ends its wait: 503 queue_timeout.
        short = await post(client, url, {"i": 0}, {"X-Batchgate-Deadline-Ms": "300"})
        assert short.status == 503 and error_code(short) == "queue_timeout", short
        assert "Retry-After" in short.headers and "X-Batchgate-Queue-Ms" in short.headers
        # The SDK raises that event as an APIError carrying the code.
        with pytest.raises(openai.APIError) as raised:
            await asyncio.wait_for(sdk_stream({"X-Batchgate-Deadline-Ms": "300"}), BOUND_S)
        assert raised.value.code == "queue_timeout", raised.value

        # Early refusal: with history (the held slot took its time), the third in line with
        # a 50 ms deadline cannot start in time: 429 deadline_unreachable at once.
        r.gate.set()
        assert (await held).status == 200
        for _ in range(3):  # history: requests that held their slot ~0.2 s each
            assert (await post(client, url, {"delay_ms": 200})).status == 200
        r.gate.clear()
        held = spawn(post(client, url, {"hold": True}), stack)
        await poll(busy, "held a third time")
        queued_1 = spawn(post(client, url, {"i": 1}), stack)
        queued_2 = spawn(post(client, url, {"i": 2}), stack)
        await total_depth_is(client, url, 2)
        hopeless = await post(client, url, {"i": 3}, {"X-Batchgate-Deadline-Ms": "50"})
        assert hopeless.status == 429, hopeless
        assert error_code(hopeless) == "deadline_unreachable"
        assert int(hopeless.headers["Retry-After"]) >= 1
        assert "X-Batchgate-Queue-Ms" in hopeless.headers
        assert not queued_1.done() and not queued_2.done()  # it was refused while they waited
        r.gate.set()
        for task in (held, queued_1, queued_2):
            got = await task
            assert got.status == 200 and "X-Batchgate-Queue-Ms" in got.headers
        assert int((await queued_1).headers["X-Batchgate-Queue-Ms"]) > 0


def seed_client(url: str) -> list[str]:
    """The seed's `requests` loop: the `data:` lines of ``iter_lines()``, their choices."""
    texts: list[str] = []
    with requests.post(url + "/v1/completions", json={"stream": True, "events": 3},
                       stream=True, timeout=BOUND_S) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                texts.append(json.loads(line[6:])["choices"][0]["text"])
    return texts


# --- adaptive -----------------------------------------------------------------------------


class Engine(FakeReplica):
    """A FakeReplica that also serves a /metrics the test writes (or fails)."""

    metrics_text: str = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n"
    metrics_status: int = 200

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/{tail:.*}", self.generate)
        return app

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(status=self.metrics_status, text=self.metrics_text)


async def test_adaptive_cap_moves_and_freezes(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        e = Engine("e")
        e.runner, e.url = await start_app(e.app())

        async def stop() -> None:
            e.gate.set()
            assert e.runner is not None
            await e.runner.cleanup()

        stack.push_async_callback(stop)
        config = {
            "replicas": [{"name": "e", "url": e.url, "max_concurrency": 2,
                          "adaptive": {"min": 1, "max": 64, "interval_s": 0.05}}],
            "queue": {"max_size": 1000},
            "health": HEALTH,
        }
        served = await stack.enter_async_context(serve(tmp_path, config))
        client = await stack.enter_async_context(session())
        url = served.url

        async def cap() -> float | None:
            return await metric(client, url, "batchgate_replica_max_concurrency", replica="e")

        assert await metric(client, url, "batchgate_replica_engine_waiting", replica="e") == 0
        # Waiters and an engine without a queue: the cap goes up from 2.
        _ = [spawn(post(client, url, {"hold": True}), stack) for _ in range(100)]

        async def up() -> bool:
            return (await cap() or 0) >= 6

        await poll(up, "the cap rises above its start while batchgate has waiters")
        # KV usage past 0.9 without a queue: the cap comes down.
        high = await cap() or 0
        e.metrics_text = ("vllm:num_requests_waiting 0\nvllm:num_requests_running 3\n"
                          "vllm:kv_cache_usage_perc 0.95\n")

        async def down() -> bool:
            return (await cap() or 0) < high

        await poll(down, "the cap comes down while the KV cache is over 90 % full")
        e.metrics_text = "vllm:num_requests_waiting 0\nvllm:num_requests_running 3\n"
        await poll(up, "the cap rises again once the KV cache has room")
        # The engine queues: the cap comes down, and its queue is exported.
        e.metrics_text = "vllm:num_requests_waiting 5\nvllm:num_requests_running 3\n"

        async def engine_waiting(n: float) -> bool:
            return await metric(client, url, "batchgate_replica_engine_waiting",
                                replica="e") == n

        async def five() -> bool:
            return await engine_waiting(5)

        await poll(five, "batchgate_replica_engine_waiting == 5")
        high = await cap() or 0
        await poll(down, "the cap comes down while the engine queues")
        e.metrics_text = "vllm:num_requests_waiting 0\nvllm:num_requests_running 3\n"

        async def above_min() -> bool:
            return (await cap() or 0) >= 2 and await engine_waiting(0)

        await poll(above_min, "the engine's queue gone, the cap above min")
        # The endpoint disappears: the cap freezes (counted, logged), never drops to min.
        e.metrics_text = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n"
        e.metrics_status = 404

        async def errors() -> float:
            return await metric(client, url, "batchgate_adaptive_scrape_errors_total",
                                replica="e") or 0

        async def failing() -> bool:
            return await errors() >= 2

        await poll(failing, "scrape errors counted")
        frozen = await cap()
        seen = await errors()

        async def more() -> bool:
            return await errors() >= seen + 5

        await poll(more, "five more failed scrapes")
        assert await cap() == frozen and (frozen or 0) > 1
        assert served.logged("cannot read its engine's metrics")

        # Back, and other engines' names: TGI, SGLang, llama.cpp; older vLLM's KV name.
        e.metrics_status = 200
        for n, text in ((7, "tgi_queue_size 7\ntgi_batch_current_size 2\n"),
                        (8, "sglang:num_queue_reqs 8\nsglang:num_running_reqs 2\n"),
                        (9, "llamacpp:requests_deferred 9\nllamacpp:requests_processing 2\n"),
                        (4, "vllm:num_requests_waiting 4\nvllm:num_requests_running 2\n"
                            "vllm:gpu_cache_usage_perc 0.5\n")):
            e.metrics_text = text

            async def reads() -> bool:
                return await engine_waiting(n)  # noqa: B023 (awaited in this iteration)

            await poll(reads, f"engine queue {n} read from {text.split()[0]}")


async def test_sim_max_batch_16_settles_near_16(tmp_path: Path) -> None:
    """`batchgate sim --max-batch 16` behind `adaptive: {min: 1, max: 128}`: the cap settles
    at about 16 with the engine's own queue near zero."""
    async with contextlib.AsyncExitStack() as stack:
        sim_url = await stack.enter_async_context(sim_process(
            "--max-batch", "16", "--time-scale", "0.02"))
        config = {
            "replicas": [{"name": "sim", "url": sim_url, "max_concurrency": 1,
                          "adaptive": {"min": 1, "max": 128, "interval_s": 0.05}}],
            "health": HEALTH,
        }
        served = await stack.enter_async_context(serve(tmp_path, config))
        client = await stack.enter_async_context(session())
        stop = asyncio.Event()

        async def caller() -> None:
            while not stop.is_set():
                got = await post(client, served.url, {"prompt": "hi", "max_tokens": 100})
                assert got.status == 200, got

        load = [asyncio.ensure_future(caller()) for _ in range(40)]
        history: list[float] = []
        try:
            async def settled() -> bool:
                history.append(await metric(client, served.url,
                                            "batchgate_replica_max_concurrency",
                                            replica="sim") or 0)
                tail = history[-15:]
                return len(tail) == 15 and len(set(tail)) == 1 and 12 <= tail[0] <= 20

            await poll(settled, "the cap settles near 16", bound=45)
            waiting = await metric(client, served.url, "batchgate_replica_engine_waiting",
                                   replica="sim")
            assert waiting is not None and waiting <= 2, (waiting, history)
        finally:
            stop.set()
            await asyncio.gather(*load, return_exceptions=True)


@contextlib.asynccontextmanager
async def sim_process(*args: str) -> AsyncIterator[str]:
    """`batchgate sim` as a subprocess on an ephemeral port; its URL from its log."""
    sim = await asyncio.create_subprocess_exec(
        str(BATCHGATE), "sim", "--port", "0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    pump: asyncio.Task[None] | None = None
    try:
        async def listening() -> str:
            assert sim.stdout is not None
            while line := await sim.stdout.readline():
                if match := re.search(rb"(http://127\.0\.0\.1:\d+)", line):
                    return match.group(1).decode()
            raise AssertionError("sim exited before listening")

        url = await asyncio.wait_for(listening(), BOUND_S)

        async def drain() -> None:
            assert sim.stdout is not None
            while await sim.stdout.readline():
                pass

        pump = asyncio.create_task(drain())
        yield url
    finally:
        if sim.returncode is None:
            sim.kill()
        await sim.wait()
        if pump is not None:
            await pump


async def test_sim_kv_tokens_budget_prevents_preemption(tmp_path: Path) -> None:
    """`batchgate sim --kv-tokens`: a count-only cap lets the engine preempt, a budgeted
    batchgate (max_tokens_in_flight = the KV budget) does not."""
    async with contextlib.AsyncExitStack() as stack:
        sim_url = await stack.enter_async_context(sim_process(
            "--max-batch", "8", "--kv-tokens", "1000", "--time-scale", "0.02"))
        client = await stack.enter_async_context(session())

        async def preemptions() -> float:
            samples = await scrape(client, sim_url)
            return sum(v for (name, _), v in samples.items()
                       if name.startswith("vllm:num_preemptions"))

        async def load(budget: int | None) -> float:
            replica: dict[str, Any] = {"name": "sim", "url": sim_url, "max_concurrency": 8}
            if budget is not None:
                replica["max_tokens_in_flight"] = budget
            before = await preemptions()
            async with serve(tmp_path, {"replicas": [replica], "health": HEALTH}) as served:
                answers = await asyncio.gather(*(
                    post(client, served.url, {"prompt": "hi", "max_tokens": 300})
                    for _ in range(16)))
                assert all(a.status == 200 for a in answers), answers
            return await preemptions() - before

        assert await load(None) > 0
        assert await load(1000) == 0


# --- configuration ------------------------------------------------------------------------


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BATCHGATE), "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=BOUND_S,
                          env={**os.environ, **(env or {})})


def yaml_blocks(section: str) -> list[str]:
    start = README.index(section)
    end = README.index("\n## ", start + len(section))
    return re.findall(r"```yaml\n(.*?)```", README[start:end], re.DOTALL)


EXAMPLE_ENV = {"WEB_KEY": "sk-web-example", "ETL_KEY": "sk-etl-example",
               "TEAM_A_KEY": "sk-team-a-example", "VLLM_0_KEY": "sk-vllm"}


@pytest.mark.parametrize("section", ["## Scheduling", "## Adaptive concurrency",
                                     "## Configuration reference"])
def test_check_config_accepts_the_readme_examples(tmp_path: Path, section: str) -> None:
    blocks = yaml_blocks(section)
    assert blocks, section
    for i, block in enumerate(blocks):
        path = tmp_path / f"example-{i}.yaml"
        path.write_text(block)
        done = check_config(path, EXAMPLE_ENV)
        assert done.returncode == 0, (section, i, done.stderr)


def test_check_config_shows_the_issue_defaults(tmp_path: Path) -> None:
    path = tmp_path / "minimal.yaml"
    path.write_text("replicas:\n  - {name: a, url: 'http://127.0.0.1:9000', max_concurrency: 2}\n")
    done = check_config(path)
    assert done.returncode == 0, done.stderr
    effective = yaml.safe_load(done.stdout)
    assert effective["scheduling"]["classes"] == ["interactive", "standard", "batch"]
    assert effective["scheduling"]["default_class"] == "standard"
    assert effective["scheduling"]["default_max_tokens"] == 256
    assert effective["queue"]["sse_heartbeat_s"] == 0
    assert effective["replicas"][0].get("adaptive") is None  # off by default


def test_check_config_adaptive_defaults(tmp_path: Path) -> None:
    path = tmp_path / "adaptive.yaml"
    path.write_text("replicas:\n  - {name: a, url: 'http://127.0.0.1:9000', max_concurrency: 8,"
                    " adaptive: {}}\n")
    done = check_config(path)
    assert done.returncode == 0, done.stderr
    adaptive = yaml.safe_load(done.stdout)["replicas"][0]["adaptive"]
    assert adaptive == {"min": 4, "max": 128, "interval_s": 1}, adaptive


REPLICA = "replicas:\n  - {name: a, url: 'http://127.0.0.1:9000', max_concurrency: 8%s}\n"
BAD = [
    ("replicas[0].models", REPLICA % ", models: 5"),
    ("replicas[0].models", REPLICA % ", models: [m, m]"),
    ("replicas[0].max_tokens_in_flight", REPLICA % ", max_tokens_in_flight: 0"),
    ("replicas[0].adaptive", REPLICA % ", adaptive: {min: 16, max: 4}"),
    ("replicas[0].max_concurrency", REPLICA % ", adaptive: {min: 1, max: 4}"),  # 8 not in it
    ("replicas[0].adaptive", REPLICA % ", adaptive: {interval_s: 0}"),
    ("queue.sse_heartbeat_s", REPLICA % "" + "queue: {sse_heartbeat_s: -1}\n"),
    ("scheduling.classes", REPLICA % "" + "scheduling: {classes: [a, a]}\n"),
    ("scheduling.classes", REPLICA % "" + "scheduling: {classes: []}\n"),
    ("scheduling.default_class", REPLICA % "" + "scheduling: {default_class: vip}\n"),
    ("scheduling.default_max_tokens", REPLICA % "" + "scheduling: {default_max_tokens: 0}\n"),
    ("scheduling.max_queued_per_tenant",
     REPLICA % "" + "scheduling: {max_queued_per_tenant: -1}\n"),
    ("scheduling.tenant_header", REPLICA % "" + "scheduling: {tenant_header: 'X Team:'}\n"),
    ("auth.api_keys[0].class",
     REPLICA % "" + "auth: {api_keys: [{name: t, key: k1, class: vip}]}\n"),
    ("auth.api_keys[0].weight",
     REPLICA % "" + "auth: {api_keys: [{name: t, key: k1, weight: 0}]}\n"),
    ("auth.api_keys[0].max_queued",
     REPLICA % "" + "auth: {api_keys: [{name: t, key: k1, max_queued: -1}]}\n"),
    ("discovery[0].models",
     "discovery:\n  - {dns: x.test, port: 80, max_concurrency: 2, name_prefix: x, models: 5}\n"),
]


def test_check_config_rejects_bad_values_in_one_line(tmp_path: Path) -> None:
    """Each bad value: exit 2, one line on stderr naming the field, no traceback."""

    def check(i: int) -> str | None:
        field_name, text = BAD[i]
        path = tmp_path / f"bad-{i}.yaml"
        path.write_text(text)
        done = check_config(path)
        lines = done.stderr.strip().splitlines()
        if done.returncode != 2 or len(lines) != 1 or "Traceback" in done.stderr \
                or field_name not in lines[0]:
            return f"{field_name}: rc {done.returncode}, stderr {done.stderr!r}"
        return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        wrong = [w for w in pool.map(check, range(len(BAD))) if w is not None]
    assert not wrong, wrong


KEYS = ["models:", "models: auto", "max_tokens_in_flight", "adaptive:", "interval_s",
        "scheduling:", "classes:", "default_class", "tenant_header", "default_max_tokens",
        "max_queued", "weight", "class:", "sse_heartbeat_s", "X-Batchgate-Class",
        "X-Batchgate-Deadline-Ms", "X-Batchgate-Queue-Ms", "deadline_unreachable",
        "model_not_found", "batchgate_queue_depth", "batchgate_queue_wait_seconds",
        "batchgate_replica_max_concurrency", "batchgate_replica_engine_waiting",
        "--kv-tokens", "--max-batch"]


@pytest.mark.parametrize("key", KEYS)
def test_readme_documents_each_key_with_an_example(key: str) -> None:
    assert key in README
    blocks = "\n".join(re.findall(r"```(?:yaml|console|sh|bash|)\n(.*?)```", README, re.DOTALL))
    bare = key.rstrip(":").split(": ")[0]
    if not bare.startswith(("X-", "batchgate_", "deadline_", "model_not", "--")):
        assert bare in blocks, f"{key} has no example in a README code block"
