"""Active probes: thresholds, jitter, readiness at start and real (POST) probes.

Real sockets; the health checker's time is a :class:`FakeTime` the test advances, so probes
happen exactly when the test says and a fake replica answers each with the status it is given.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.control.health import probe_delay
from tests.integration.conftest import FakeReplica, FakeTime, Proxy, make_config, until

Factory = Callable[..., Any]
INTERVAL = 60.0  # make_config's health.interval_s: the loop then sleeps on FakeTime


async def probe(p: Proxy, r: FakeReplica, status: int, time: FakeTime, n: int) -> None:
    """Let the replica's probe number ``n`` happen and answer ``status``."""
    assert r.health_script is not None
    r.health_script.put_nowait(status)
    if n > 1:
        time.advance(INTERVAL * 1.1)  # past the longest jittered interval
    replica = p.scheduler.replicas[0]
    await until(lambda: p.health.probes(replica) == n, f"probe {n} applied")


async def test_unhealthy_after_and_healthy_after_count_consecutive_probes(
    replicas: Factory, proxy: Factory
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    a.health_script = asyncio.Queue()
    time = FakeTime()
    p: Proxy = await proxy(make_config(("a", a.url, 1), ("b", b.url, 1)), timing=time.timing())
    replica = p.scheduler.replicas[0]
    states = []
    for n, status in enumerate([500, 500, 200, 500, 500, 500, 200, 200], start=1):
        await probe(p, a, status, time, n)
        states.append(replica.health)
    # Two failures, a pass (the streak starts again), three failures: out after the third.
    # One pass is not enough to come back (healthy_after: 2); the second is.
    assert states == ["healthy"] * 5 + ["unhealthy", "unhealthy", "healthy"]
    assert p.metric("batchgate_replica_state", replica="a", state="healthy") == 1
    assert p.metric("batchgate_replica_state", replica="a", state="unhealthy") == 0


async def test_thresholds_are_configurable(replicas: Factory, proxy: Factory) -> None:
    a: FakeReplica = await replicas("a")
    a.health_script = asyncio.Queue()
    time = FakeTime()
    p: Proxy = await proxy(
        make_config(("a", a.url, 1), health={"unhealthy_after": 1, "healthy_after": 3}),
        timing=time.timing(),
    )
    states = []
    for n, status in enumerate([500, 200, 200, 200], start=1):
        await probe(p, a, status, time, n)
        states.append(p.scheduler.replicas[0].health)
    assert states == ["unhealthy", "unhealthy", "unhealthy", "healthy"]
    assert p.metric("batchgate_replica_state", replica="a", state="unhealthy") == 0


async def test_probe_intervals_are_jittered_per_replica(replicas: Factory, proxy: Factory) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    draws = iter([0.0, 0.999])
    time = FakeTime(rng=lambda: next(draws, 0.5))
    p: Proxy = await proxy(make_config(("a", a.url, 1), ("b", b.url, 1)), timing=time.timing())
    watchdog = min(INTERVAL, p.health.config.stall_s / 4)
    await until(lambda: len([s for s in time.sleeps if s != watchdog]) == 2,
                "both replicas probed once and waiting")
    waits = sorted(s for s in time.sleeps if s != watchdog)
    assert waits == [INTERVAL * 0.9, INTERVAL * (0.9 + 0.2 * 0.999)]
    assert probe_delay(10.0, lambda: 0.0) == 9.0
    assert 10.99 < probe_delay(10.0, lambda: 0.9999) < 11.0


async def test_not_assumed_healthy_waits_for_the_first_passing_probe(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    a.health_script = asyncio.Queue()
    time = FakeTime()
    p: Proxy = await proxy(
        make_config(("a", a.url, 1), health={"assume_healthy_at_start": False}),
        timing=time.timing(),
    )
    async with client.get(p.url + "/readyz") as resp:
        assert resp.status == 503  # not ready before the engine is
    waiting = asyncio.create_task(client.post(p.url + "/v1/completions", json={}))
    await until(lambda: p.scheduler.queue_depth == 1, "the request waits")
    await probe(p, a, 503, time, 1)
    assert p.scheduler.queue_depth == 1 and a.arrivals == 0
    await probe(p, a, 200, time, 2)  # the first pass: in at once (not healthy_after passes)
    async with await waiting as resp:
        assert resp.status == 200
        assert (await resp.json())["replica"] == "a"
    async with client.get(p.url + "/readyz") as resp:
        assert resp.status == 200


async def test_assumed_healthy_takes_work_before_any_probe(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    a.health_script = asyncio.Queue()  # the first probe never gets an answer
    p: Proxy = await proxy(make_config(("a", a.url, 1)), timing=FakeTime().timing())
    async with client.post(p.url + "/v1/completions", json={}) as resp:
        assert resp.status == 200
    assert p.health.probes(p.scheduler.replicas[0]) == 0


async def test_probe_method_and_json_body(replicas: Factory, proxy: Factory) -> None:
    a: FakeReplica = await replicas("a")
    a.answer_status = 500  # /v1/completions fails, /health would pass
    body = {"prompt": "hi", "max_tokens": 1}
    p: Proxy = await proxy(
        make_config(("a", a.url, 1), health={"method": "POST", "path": "/v1/completions",
                                             "body": body, "unhealthy_after": 1}),
        timing=FakeTime().timing(),
    )
    await until(lambda: p.health.probes(p.scheduler.replicas[0]) == 1, "first probe")
    assert a.seen == [("POST", "/v1/completions", json.dumps(body).encode())]
    assert a.seen_headers[0]["Content-Type"] == "application/json"
    assert a.health_hits == 0
    assert p.scheduler.replicas[0].health == "unhealthy"


async def test_add_remove_and_reconfigure_for_live_reload(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    b.health_script = asyncio.Queue()
    time = FakeTime()
    p: Proxy = await proxy(make_config(("a", a.url, 1)), timing=time.timing())
    # What a reload does with a new replica when assume_healthy_at_start is false:
    p.scheduler.add_replica("b", b.url, 1, healthy=False)
    new = p.scheduler.replica("b")
    assert new is not None and new.health == "unhealthy"
    p.health.add(new)
    b.health_script.put_nowait(200)
    await until(lambda: new.health == "healthy", "b in on its first passing probe")
    # New thresholds apply from the next probe.
    p.health.reconfigure(dataclasses.replace(p.health.config, unhealthy_after=1))
    b.health_script.put_nowait(500)
    time.advance(INTERVAL * 1.1)
    await until(lambda: new.health == "unhealthy", "one failure is enough now")
    p.health.remove(new)
    hits = b.health_hits
    time.advance(INTERVAL * 1.1)
    await until(lambda: p.health.probes(p.scheduler.replicas[0]) >= 3, "a probed again")
    assert b.health_hits == hits and p.health.probes(new) == 0  # b no longer probed
    p.scheduler.remove_replica(new)
