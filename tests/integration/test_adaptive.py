"""Adaptive caps over real sockets: the cap settles at the simulated engine's batch limit
under load, and freezes (logged, counted) when the engine's /metrics goes away."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import (
    AdaptiveConfig,
    Config,
    DiscoveryConfig,
    ReplicaConfig,
    ServerConfig,
    SimulatedConfig,
)
from proxy.control.adaptive import ADAPTIVE
from proxy.edge.keys import METRICS as METRICS_KEY
from proxy.edge.keys import RELOADER
from proxy.server import embedded_replicas
from tests.integration.conftest import Proxy, make_config, start_app, until

Factory = Callable[..., Any]
INTERVAL_S = 0.05


async def callers(url: str, n: int, stop: asyncio.Event, body: dict[str, Any]) -> int:
    """``n`` callers, each sending one request after another until ``stop``; the answers."""
    answered = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal answered
        while not stop.is_set():
            async with session.post(url + "/v1/completions", json=body) as response:
                assert response.status == 200, await response.text()
                await response.read()
                answered += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(one(session) for _ in range(n)))
    return answered


async def test_the_cap_settles_at_the_engines_batch_limit(proxy: Factory) -> None:
    config = Config(
        replicas=(ReplicaConfig(
            name="sim", max_concurrency=1,
            # Steps of about 22 ms and readings 0.2 s apart (samples 50 ms apart): both well
            # above what a busy event loop adds to a request's way to the engine.
            simulated=SimulatedConfig(max_batch=16, time_scale=0.5),
            adaptive=AdaptiveConfig(min=1, max=128, interval_s=0.2)),),
        server=ServerConfig(host="127.0.0.1", port=0),
    )
    async with embedded_replicas(config) as resolved:
        p: Proxy = await proxy(resolved)
        adaptive = p.app[ADAPTIVE]
        replica = p.scheduler.replica("sim")
        assert replica is not None
        history: list[int] = []
        seen = [0]

        def settled() -> bool:
            # The cap after each reading; settled once it stayed put for 8 readings in a row
            # at or near 16 (a higher or lower one would be moved by the next reading).
            readings = adaptive.readings("sim")
            if readings > seen[0]:
                seen[0] = readings
                history.append(replica.max_concurrency)
            tail = history[-8:]
            return len(tail) == 8 and len(set(tail)) == 1 and readings > 20

        stop = asyncio.Event()
        load = asyncio.create_task(callers(p.url, 40, stop, {"prompt": "hi", "max_tokens": 50}))
        try:
            await until(settled, "the cap stays put for 8 readings", bound=60)
        finally:
            stop.set()
            answered = await load
        cap = replica.max_concurrency
        # 16, or a little more: a request on its way to or from the engine holds a slot the
        # engine does not see; on a busy machine (one event loop for callers, proxy and
        # engine) that can be two or three, and the engine's batch still wants them.
        assert 14 <= cap <= 19, history
        # The engine's own queue, as batchgate read it last: (near) empty.
        assert p.metric("batchgate_replica_engine_waiting", replica="sim") <= 1
        assert p.metric("batchgate_replica_max_concurrency", replica="sim") == cap
        assert max(history) < 40  # it never let every caller onto the engine
        assert answered > 0
        assert p.metric("batchgate_adaptive_scrape_errors_total", replica="sim") == 0


def found_state_why(p: Proxy) -> str:
    state = p.app[ADAPTIVE].state("v-127.0.0.1")
    assert state is not None
    return state.why


class Engine:
    """A fake engine whose /metrics the test sets: text, a status, or a refusal (stopped)."""

    def __init__(self) -> None:
        self.text = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n"
        self.status = 200
        self.scrapes = 0

    def app(self) -> web.Application:
        app = web.Application()

        async def metrics(request: web.Request) -> web.Response:
            self.scrapes += 1
            return web.Response(status=self.status, text=self.text)

        async def health(request: web.Request) -> web.Response:
            return web.Response()

        app.router.add_get("/metrics", metrics)
        app.router.add_get("/health", health)
        return app


@pytest.mark.parametrize("failure", ["404", "not prometheus", "no known series", "refused"])
async def test_a_metrics_endpoint_that_fails_freezes_the_cap(
    proxy: Factory, failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine()
    runner, url = await start_app(engine.app())
    base = make_config(("e", url, 8))
    config = dataclasses.replace(base, replicas=(dataclasses.replace(
        base.replicas[0], adaptive=AdaptiveConfig(min=1, max=64, interval_s=INTERVAL_S)),))
    p: Proxy = await proxy(config)
    adaptive = p.app[ADAPTIVE]
    replica = p.scheduler.replica("e")
    assert replica is not None
    caplog.set_level(logging.INFO, logger="batchgate.adaptive")
    try:
        # The engine queues: the cap comes down from 8 (it reads, it moves).
        engine.text = "vllm:num_requests_waiting 2\nvllm:num_requests_running 4\n"
        await until(lambda: replica.max_concurrency < 8, "the cap comes down")
        engine.text = "vllm:num_requests_waiting 0\nvllm:num_requests_running 4\n"
        await until(lambda: adaptive.state("e") is not None
                    and adaptive.state("e").why == "hold", "the cap holds")  # type: ignore[union-attr]
        cap = replica.max_concurrency
        # What the loop logs from here on (a reading that timed out earlier on a busy machine
        # is its own transition, logged as such).
        start = len(caplog.records)

        def logged(level: int) -> list[str]:
            return [r.getMessage() for r in caplog.records[start:]
                    if r.name == "batchgate.adaptive" and r.levelno == level]

        # Then the endpoint fails, while the engine would say "queue" if it could.
        if failure == "404":
            engine.status = 404
        elif failure == "not prometheus":
            engine.text = "vllm:num_requests_waiting {{{\n"
        elif failure == "no known series":
            engine.text = "# HELP up 1\nup 1\n"
        else:
            await runner.cleanup()
        errors = "batchgate_adaptive_scrape_errors_total"
        await until(lambda: p.metric(errors, replica="e") >= 5, "five failed readings")
        assert replica.max_concurrency == cap  # frozen, not dropped to min
        assert p.metric("batchgate_replica_max_concurrency", replica="e") == cap
        warnings = logged(logging.WARNING)
        assert len(warnings) == 1, warnings  # once per transition
        assert f"replica e: cannot read its engine's metrics, its cap stays at {cap}" in (
            warnings[0])
        if failure == "refused":
            return
        # It reads again: said once, and the cap moves again.
        engine.status = 200
        engine.text = "vllm:num_requests_waiting 3\nvllm:num_requests_running 1\n"
        await until(lambda: replica.max_concurrency < cap, "the cap moves again")
        assert logged(logging.INFO).count("replica e: its engine's metrics read again") == 1
        assert p.metric("batchgate_replica_engine_waiting", replica="e") == 3
    finally:
        await runner.cleanup()


def adaptive_replica(name: str, url: str, cap: int, adaptive: AdaptiveConfig | None
                     ) -> ReplicaConfig:
    return ReplicaConfig(name=name, url=url, max_concurrency=cap, adaptive=adaptive)


async def test_reload_starts_changes_and_stops_the_loops(proxy: Factory) -> None:
    """A replica added with `adaptive` gets its loop; `adaptive` taken off a replica that
    stays stops it (its cap stays); a new max_concurrency is a new start; a removed replica's
    loop and series go with it."""
    engine = Engine()
    runner, url = await start_app(engine.app())
    try:
        wide = AdaptiveConfig(min=1, max=64, interval_s=INTERVAL_S)
        base = make_config(("a", url, 4))
        p: Proxy = await proxy(base)
        adaptive = p.app[ADAPTIVE]
        assert adaptive.state("a") is None
        assert p.app[METRICS_KEY].registry.get_sample_value(
            "batchgate_replica_engine_waiting", {"replica": "a"}) is None

        async def reload(*replicas: ReplicaConfig) -> None:
            p.app[RELOADER].load = lambda: dataclasses.replace(base, replicas=replicas)
            result = await p.app[RELOADER].reload("test")
            assert result.ok, result.message

        # Added with adaptive (and a staying one given it): both loops run and read.
        await reload(adaptive_replica("a", url, 4, wide), adaptive_replica("b", url, 6, wide))
        await until(lambda: adaptive.readings("a") > 0 and adaptive.readings("b") > 0,
                    "both replicas read")
        assert p.metric("batchgate_replica_engine_waiting", replica="b") == 0
        # The engine queues: both come down.
        engine.text = "vllm:num_requests_waiting 2\nvllm:num_requests_running 2\n"
        b = p.scheduler.replica("b")
        a = p.scheduler.replica("a")
        assert a is not None and b is not None
        await until(lambda: a.max_concurrency < 4 and b.max_concurrency < 6, "caps come down")
        engine.text = "vllm:num_requests_waiting 0\nvllm:num_requests_running 2\n"
        # adaptive off for a: its loop stops and its cap stays where it was.
        await reload(adaptive_replica("a", url, 4, None), adaptive_replica("b", url, 6, wide))
        assert adaptive.state("a") is None
        # a's cap: the file's 4 is unchanged, so the reload does not re-cap it.
        assert a.max_concurrency < 4
        # A new max_concurrency for b: the reload sets it and the rule starts from there.
        await reload(adaptive_replica("a", url, 4, None), adaptive_replica("b", url, 9, wide))
        assert b.max_concurrency == 9
        readings = adaptive.readings("b")
        await until(lambda: adaptive.readings("b") > readings + 1, "b read twice more")
        state = adaptive.state("b")
        assert state is not None and state.cap == 9 and state.ceiling is None
        # b removed: its loop and series go once it is retired.
        await reload(adaptive_replica("a", url, 4, None))
        await until(lambda: p.scheduler.replica("b") is None, "b retired")
        assert adaptive.state("b") is None
        assert p.app[METRICS_KEY].registry.get_sample_value(
            "batchgate_adaptive_scrape_errors_total", {"replica": "b"}) is None
    finally:
        await runner.cleanup()


async def test_replicas_found_by_discovery_follow_their_entrys_adaptive(proxy: Factory) -> None:
    engine = Engine()
    engine.text = "vllm:num_requests_waiting 3\nvllm:num_requests_running 4\n"
    runner, url = await start_app(engine.app())
    port = int(url.rsplit(":", 1)[1])

    async def lookup(entry: DiscoveryConfig) -> frozenset[str]:
        return frozenset({"127.0.0.1"})

    try:
        config = dataclasses.replace(make_config(), replicas=(), discovery=(DiscoveryConfig(
            dns="engines.test", port=port, max_concurrency=8, name_prefix="v",
            adaptive=AdaptiveConfig(min=2, max=8, interval_s=INTERVAL_S)),))
        p: Proxy = await proxy(config, lookup=lookup)
        await until(lambda: p.scheduler.replica("v-127.0.0.1") is not None, "found in DNS")
        found = p.scheduler.replica("v-127.0.0.1")
        assert found is not None
        # Its engine queues: the cap comes down, to the entry's min at the lowest.
        await until(lambda: found.max_concurrency == 2, "the cap at the entry's min")
        assert p.app[ADAPTIVE].state("v-127.0.0.1") is not None
        assert p.metric("batchgate_replica_engine_waiting", replica="v-127.0.0.1") == 3
        # At min, every reading of the queue says so (nothing moves any more).
        await until(lambda: found_state_why(p) == "hold: at min", "held at min")
        async with aiohttp.ClientSession() as session, session.get(
                p.url + "/admin/replicas") as response:
            (entry,) = await response.json()
        assert entry["max_concurrency"] == 2
        assert entry["adaptive"] == {"min": 2, "max": 8, "interval_s": INTERVAL_S,
                                     "last": "hold: at min", "reading": True}
    finally:
        await runner.cleanup()


async def test_a_full_kv_cache_brings_the_cap_down_without_a_queue(proxy: Factory) -> None:
    engine = Engine()
    engine.text = ("vllm:num_requests_waiting 0\nvllm:num_requests_running 8\n"
                   "vllm:kv_cache_usage_perc 0.95\n")
    runner, url = await start_app(engine.app())
    try:
        base = make_config(("e", url, 8))
        config = dataclasses.replace(base, replicas=(dataclasses.replace(
            base.replicas[0], adaptive=AdaptiveConfig(min=5, max=64, interval_s=INTERVAL_S)),))
        p: Proxy = await proxy(config)
        replica = p.scheduler.replica("e")
        assert replica is not None
        adaptive = p.app[ADAPTIVE]
        await until(lambda: replica.max_concurrency < 8, "the cap comes down")
        state = adaptive.state("e")
        assert state is not None and state.why == "decrease: kv cache full"
        assert replica.max_concurrency == 6  # x0.75
        await until(lambda: replica.max_concurrency == 5, "down to min")
        readings = adaptive.readings("e")
        await until(lambda: adaptive.readings("e") > readings + 2, "more readings")
        assert replica.max_concurrency == 5  # never below min
    finally:
        await runner.cleanup()
