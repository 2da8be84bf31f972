"""A fake engine for the scale-out test, run as its own process on 127.0.0.1.

It counts its own concurrency and records every change of it with a timestamp on the
system-wide monotonic clock (``time.monotonic`` is ``CLOCK_MONOTONIC``, the same in every
process), so the test can measure how much of a window the engine spent at its cap.

``POST /v1/completions`` with JSON: ``service_ms`` (work for that long, the engine's own
latency), ``hold`` (wait for ``POST /release``), ``stream`` + ``events`` + ``gap_ms`` (an
SSE stream; a client that leaves is counted as an abort, as vLLM aborts the generation).
``GET /stats`` tells everything; ``POST /reset`` starts a new record (nothing may be in
flight). Usage: ``python -m tests.integration.scale_engine`` prints ``engine on <port>``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from aiohttp import web


class Engine:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.reset()

    def reset(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.arrivals = 0
        self.completed = 0
        self.aborted = 0
        self.timeline: list[tuple[float, int]] = [(time.monotonic(), 0)]
        self.gate = asyncio.Event()

    def _change(self, delta: int) -> None:
        self.in_flight += delta
        self.peak = max(self.peak, self.in_flight)
        self.timeline.append((time.monotonic(), self.in_flight))

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.arrivals += 1
        self._change(+1)
        try:
            spec: dict[str, Any] = json.loads(await request.read() or b"{}")
            if spec.get("stream"):
                return await self._stream(request, spec)
            if spec.get("hold"):
                await self.gate.wait()
            if spec.get("service_ms"):
                await asyncio.sleep(float(spec["service_ms"]) / 1000)
            self.completed += 1
            return web.json_response({"text": "ok"})
        except (asyncio.CancelledError, ConnectionError):
            self.aborted += 1  # the client left: a real engine aborts the generation
            raise
        finally:
            self._change(-1)

    async def _stream(self, request: web.Request, spec: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(int(spec.get("events", 3))):
            await response.write(b'data: {"choices":[{"text":" t%d"}]}\n\n' % i)
            await asyncio.sleep(float(spec.get("gap_ms", 10)) / 1000)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self.completed += 1
        return response

    async def stats(self, _request: web.Request) -> web.Response:
        return web.json_response({
            "in_flight": self.in_flight, "peak": self.peak, "arrivals": self.arrivals,
            "completed": self.completed, "aborted": self.aborted, "timeline": self.timeline,
        })

    async def do_reset(self, _request: web.Request) -> web.Response:
        if self.in_flight:
            return web.json_response({"error": "requests in flight"}, status=409)
        self.reset()
        return web.json_response({})

    async def release(self, _request: web.Request) -> web.Response:
        self.gate.set()
        return web.json_response({})

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")


async def main() -> None:
    engine = Engine()
    app = web.Application()
    app.router.add_post("/v1/completions", engine.generate)
    app.router.add_get("/stats", engine.stats)
    app.router.add_post("/reset", engine.do_reset)
    app.router.add_post("/release", engine.release)
    app.router.add_get("/health", engine.health)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"engine on {runner.addresses[0][1]}", flush=True)
    try:
        await asyncio.Event().wait()  # until the test terminates the process
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
