"""Fake engines for the chaos suite: real aiohttp servers on 127.0.0.1 that misbehave on cue.

Each replica records the id of every request it reads (from the JSON body, or ``?id=`` of a
GET) and its own peak of concurrent requests, so the test judges the proxy by what the
engines saw, not by what the proxy says. Misbehaviour is counted, not timed: the bursty
replica fails a fixed share of its requests in runs; the flaky one is killed (every
connection reset, the port closed) and restarted by the test.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

#: Every answer of a fake replica carries this header (a 5xx without it is batchgate's own).
MARK = "X-Chaos-Replica"


@dataclass
class ChaosReplica:
    """``burst``: answer 500 to ``burst[0]`` requests out of every ``burst[1]`` (in a run).
    ``latency_s``: the engine's own time per answer and between events (real time, as an
    engine takes it; nothing is synchronised on it)."""

    name: str
    latency_s: float = 0.002
    burst: tuple[int, int] | None = None
    seen: Counter[str] = field(default_factory=Counter)  # request id -> times read
    in_flight: int = 0  # generation requests (not GETs) being served
    peak: int = 0
    arrivals: int = 0
    port: int = 0
    runner: web.AppRunner | None = None
    _listener: socket.socket = field(init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/{tail:.*}", self._serve)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                               shutdown_timeout=0.1)
        await runner.setup()
        # The same port after a restart: the proxy's config names it. Our own listener, so
        # that kill() can stop accepting on it before the runner closes it.
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        site = web.SockSite(runner, self._listener)
        await site.start()
        self.port = self._listener.getsockname()[1]
        self.runner = runner

    async def kill(self) -> None:
        """Like a crashed engine: every connection reset at once, then the port closed."""
        runner, self.runner = self.runner, None
        assert runner is not None and runner.server is not None
        # Stop accepting first, and let the connections accepted already reach the server:
        # asyncio hands an accepted socket to a task that makes its transport a loop turn
        # later, and on Python 3.11 that task fails an assert if the listener was closed in
        # between, leaking the socket (an "unclosed socket" warning in a later test).
        asyncio.get_running_loop().remove_reader(self._listener.fileno())
        for _ in range(3):  # accept task, then connection_made: two turns, one to spare
            await asyncio.sleep(0)
        for handler in list(runner.server.connections):
            if handler.transport is not None:
                handler.transport.abort()
        await runner.cleanup()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.kill()

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        # Only work counts against the cap: GET, HEAD and OPTIONS take no generation slot
        # (they have a bound of their own, proxy.edge.light).
        work = request.method not in ("GET", "HEAD", "OPTIONS")
        self.in_flight += work
        self.peak = max(self.peak, self.in_flight)
        try:
            raw = await request.read()
            spec: dict[str, Any] = json.loads(raw) if raw else {}
            rid = spec.get("id") or request.query.get("id", "?")
            self.seen[rid] += 1
            self.arrivals += 1
            await asyncio.sleep(self.latency_s)
            if self.burst is not None and self.arrivals % self.burst[1] < self.burst[0]:
                return web.json_response({"error": {"message": "engine overloaded"}},
                                         status=500, headers={MARK: self.name})
            if spec.get("stream"):
                return await self._stream(request, int(spec.get("events", 5)))
            return web.json_response(
                {"id": rid, "replica": self.name, "choices": [{"text": "ok"}],
                 "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}},
                headers={MARK: self.name})
        finally:
            self.in_flight -= work

    async def _stream(self, request: web.Request, events: int) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", MARK: self.name})
        await response.prepare(request)
        for i in range(events):
            await response.write(b'data: {"choices":[{"text":" t%d"}]}\n\n' % i)
            await asyncio.sleep(self.latency_s)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
