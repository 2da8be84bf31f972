"""Real sockets on 127.0.0.1: a controllable fake replica, and the proxy in front of it.

The fake replica blocks on events the test controls, so saturation and cancellation are
deterministic: a test waits for a *state* (``until``), never for time to pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import (
    Config,
    HealthConfig,
    QueueConfig,
    ReplicaConfig,
    ServerConfig,
    UpstreamConfig,
)
from proxy.control.health import HealthChecker, Timing
from proxy.core.scheduler import Scheduler
from proxy.edge.app import LIFECYCLE, METRICS, SCHEDULER, create_app
from proxy.edge.keys import HEALTH, UPSTREAMS
from proxy.observe.accesslog import AccessLog

BOUND_S = 10.0  # deadlock guard for every wait: a failing test fails, it does not hang


async def until(predicate: Callable[[], bool], what: str, bound: float = BOUND_S) -> None:
    """Wait for a state change driven by the event loop (bounded; yields, does not sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.005)


@dataclass
class FakeReplica:
    """An OpenAI-ish engine that counts concurrency and blocks on ``gate`` when asked.

    Request JSON fields drive it: ``stream`` (SSE), ``events`` (how many), ``hold`` (wait
    for ``gate`` before answering / after the first event).
    """

    name: str
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    health_status: int = 200
    health_hits: int = 0
    #: When set, each probe of /health answers the next status put here (it waits for one).
    health_script: asyncio.Queue[int] | None = None
    #: When set, every request (not /health) is answered with this status: a replica that
    #: passes its probe and fails all work.
    answer_status: int | None = None
    #: ``step`` streams send each event after the first only once a token is put here.
    steps: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    #: (method, path, body) of every request that reached the catch-all route.
    seen: list[tuple[str, str, bytes]] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0
    arrivals: int = 0
    completed: int = 0
    aborted: int = 0
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    #: What GET /v1/models lists (default: the replica's name); a status instead, to fail it.
    model_ids: list[str] | None = None
    models_status: int = 200
    models_hits: int = 0
    models_headers: list[dict[str, str]] = field(default_factory=list)
    #: When set, GET /v1/models waits for it (a list not read yet).
    models_gate: asyncio.Event | None = None
    url: str = ""
    runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=128 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_route("*", "/{tail:.*}", self.generate)
        return app

    async def health(self, _request: web.Request) -> web.Response:
        self.health_hits += 1
        if self.health_script is not None:
            return web.Response(status=await self.health_script.get())
        return web.Response(status=self.health_status)

    async def models(self, request: web.Request) -> web.Response:
        self.models_hits += 1
        self.models_headers.append(dict(request.headers))
        if self.models_gate is not None:
            await self.models_gate.wait()
        if self.models_status != 200:
            return web.json_response({"error": "failing on purpose"}, status=self.models_status)
        ids = [self.name] if self.model_ids is None else self.model_ids
        return web.json_response({"object": "list", "data": [{"id": i} for i in ids]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.arrivals += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.seen_headers.append(dict(request.headers))
        try:
            raw = await request.read()
            self.seen.append((request.method, request.path_qs, raw))
            spec: dict[str, Any] = {}
            if raw[:1] == b"{":
                spec = json.loads(raw)
            if self.answer_status is not None:
                self.completed += 1
                return web.json_response({"error": "failing on purpose"},
                                         status=self.answer_status)
            if spec.get("stream"):
                return await self._stream(request, spec)
            if spec.get("hold"):
                await self.gate.wait()
            if spec.get("step"):  # answered once a token is put in `steps`: one at a time
                await self.steps.get()
            if spec.get("delay_ms"):  # the engine's own latency, not a test synchronisation
                await asyncio.sleep(float(spec["delay_ms"]) / 1000)
            self.completed += 1
            return web.json_response(
                {
                    "replica": self.name,
                    "path": request.path_qs,
                    "bytes": len(raw),
                    "sha256": hashlib.sha256(raw).hexdigest(),
                    "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
                },
                status=int(spec.get("status", 200)),
            )
        except (asyncio.CancelledError, ConnectionError):
            # Cancelled when its client leaves, or a write found the connection closed.
            self.aborted += 1
            raise
        finally:
            self.in_flight -= 1

    async def _stream(self, request: web.Request, spec: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        for i in range(int(spec.get("events", 3))):
            if i == 1 and spec.get("hold"):
                await self.gate.wait()
            if i >= 1 and spec.get("step"):
                await self.steps.get()
            if i == 1 and spec.get("die"):
                assert request.transport is not None
                request.transport.abort()  # the engine crashes mid-stream
                return response
            if spec.get("continuous_usage"):  # vLLM's cumulative usage in every chunk
                await response.write(sse_usage_event(i, usage={"prompt_tokens": 7,
                                                               "completion_tokens": i + 1}))
            elif spec.get("pad"):
                await response.write(b"data: " + b"x" * int(spec["pad"]) + b"\n\n")
            else:
                await response.write(sse_event(i))
        if spec.get("include_usage"):
            events = int(spec.get("events", 3))
            await response.write(
                b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":%d,'
                b'"total_tokens":%d}}\n\n' % (events, events + 7)
            )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self.completed += 1
        return response


def sse_event(i: int) -> bytes:
    return b'data: {"choices":[{"index":0,"text":" t%d"}]}\n\n' % i


def sse_usage_event(i: int, usage: dict[str, int]) -> bytes:
    body = {"choices": [{"index": 0, "text": f" t{i}"}], "usage": usage}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def start_app(app: web.Application) -> tuple[web.AppRunner, str]:
    # auto_decompress=False as proxy.server does: bodies pass through byte for byte.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1,
                           auto_decompress=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def replicas() -> AsyncIterator[Callable[[str], Any]]:
    """Factory of started fake replicas; all are stopped at the end of the test."""
    started: list[FakeReplica] = []

    async def make(name: str) -> FakeReplica:
        replica = FakeReplica(name)
        replica.runner, replica.url = await start_app(replica.app())
        started.append(replica)
        return replica

    yield make
    for replica in started:
        replica.gate.set()
        assert replica.runner is not None
        await replica.runner.cleanup()


@dataclass
class Proxy:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def scheduler(self) -> Scheduler:
        return self.app[SCHEDULER]

    @property
    def health(self) -> HealthChecker:
        return self.app[HEALTH]

    def metric(self, name: str, **labels: str) -> float:
        value = self.app[METRICS].registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def make_config(
    *replicas: tuple[str, str, int],
    max_queue: int = 1000,
    queue_timeout_s: float = 30.0,
    retries: int = 2,
    health_interval_s: float = 60.0,
    read_timeout_s: float = 30.0,
    health: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
    **server: Any,
) -> Config:
    """``health`` and ``upstream``: more keys of those sections (e.g. ``unhealthy_after``)."""
    return Config(
        replicas=tuple(ReplicaConfig(name=n, url=u, max_concurrency=c) for n, u, c in replicas),
        server=dataclasses.replace(ServerConfig(host="127.0.0.1", port=0), **server),
        queue=QueueConfig(max_size=max_queue, timeout_s=queue_timeout_s),
        health=HealthConfig(interval_s=health_interval_s, timeout_s=2.0, **(health or {})),
        upstream=UpstreamConfig(
            connect_timeout_s=2.0, read_timeout_s=read_timeout_s, retries=retries,
            **(upstream or {}),
        ),
    )


@pytest.fixture
async def proxy() -> AsyncIterator[Callable[[Config], Any]]:
    """Factory: the proxy app on a real socket. At the end: no slot, waiter, handler, checked-out
    connection, armed read timer or background task of the proxy left."""
    started: list[Proxy] = []

    async def make(
        config: Config, access_log: AccessLog | None = None, timing: Timing | None = None,
        **more: Any,
    ) -> Proxy:
        app = create_app(config, access_log=access_log, timing=timing, **more)
        runner, url = await start_app(app)
        handle = Proxy(url, app, runner)
        started.append(handle)
        return handle

    yield make
    for handle in started:
        assert await handle.app[LIFECYCLE].wait_idle(BOUND_S), "a handler never finished"
        assert handle.scheduler.idle(), f"leak: {handle.scheduler!r}"
        for pool in handle.app[UPSTREAMS].pools():
            assert pool.active == 0, f"leak: a connection still checked out of {pool!r}"
            assert pool.armed_timers() == 0, f"leak: a read timer still armed in {pool!r}"
        await handle.runner.cleanup()
    if started:
        await until(lambda: not proxy_tasks(), f"background tasks left: {proxy_tasks()}")


class FakeTime:
    """The health checker's clocks and sleep, advanced by the test (no waiting on real time).

    ``sleeps`` records every delay asked for; ``advance`` wakes every sleeper whose time has
    come. The monotonic clock starts at the real one, the wall clock at a round number.
    """

    def __init__(self, rng: Callable[[], float] = lambda: 0.5) -> None:
        self.mono = time.monotonic()
        self.wall = 1_700_000_000.0
        self.rng = rng
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def timing(self) -> Timing:
        return Timing(monotonic=lambda: self.mono, wall=lambda: self.wall, sleep=self.sleep,
                      rng=self.rng)

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        entry = (self.mono + delay, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds
        for due, future in self._sleepers:
            if due <= self.mono and not future.done():
                future.set_result(None)


def proxy_tasks() -> list[asyncio.Task[Any]]:
    """Tasks still running code of the proxy package (after its app was cleaned up)."""
    here = asyncio.current_task()
    return [
        task for task in asyncio.all_tasks()
        if task is not here and not task.done()
        and "/proxy/" in getattr(task.get_coro(), "cr_code", until.__code__).co_filename
    ]


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND_S * 3)) as s:
        yield s
