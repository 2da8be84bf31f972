"""Running the proxy: embedded simulated replicas, the listener, and graceful shutdown.

aiohttp's ``run_app`` closes the listener first on SIGTERM. Kubernetes needs the opposite: keep
answering (readiness 503, new work 503) while endpoints are withdrawn and in-flight work
finishes. So the lifecycle is driven here, explicitly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

from aiohttp import web

from proxy.config import Config
from proxy.edge.app import LIFECYCLE, SCHEDULER, create_app
from proxy.edge.limits import LimitedRunner
from proxy.observe.accesslog import AccessLog

log = logging.getLogger("batchgate")

#: After cutting what the drain deadline left, how long handlers get to send their last words.
CUT_GRACE_S = 2.0


def _bound_port(runner: web.AppRunner) -> int:
    address = runner.addresses[0]
    return int(address[1])


@asynccontextmanager
async def embedded_replicas(config: Config) -> AsyncIterator[Config]:
    """Start an in-process simulated engine for every ``simulated:`` replica.

    Each listens on an ephemeral loopback port; the yielded config has their URLs filled in,
    so the rest of the proxy treats them exactly like remote engines.
    """
    async with AsyncExitStack() as stack:
        replicas = []
        for replica in config.replicas:
            if replica.simulated is None:
                replicas.append(replica)
                continue
            # Imported only here: a proxy of real engines never loads the simulator.
            from proxy.sim.server import create_sim_app

            runner = web.AppRunner(
                create_sim_app(replica.simulated, model=replica.name),
                handler_cancellation=True,
                access_log=None,
            )
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            url = f"http://127.0.0.1:{_bound_port(runner)}"
            log.info("replica %s: simulated engine at %s", replica.name, url)
            replicas.append(dataclasses.replace(replica, url=url))
        yield dataclasses.replace(config, replicas=tuple(replicas))


async def serve(
    config: Config,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str, int], None] | None = None,
    on_second_signal: Callable[[signal.Signals], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then drain and return.

    A second SIGTERM/SIGINT during the drain calls ``on_second_signal`` (the CLI exits the
    process there and then: an operator who asks twice does not want to wait for the drain).
    """
    loop = asyncio.get_running_loop()
    stop = stop if stop is not None else asyncio.Event()
    stop_requested = stop

    def on_signal(sig: signal.Signals) -> None:
        if stop_requested.is_set() and on_second_signal is not None:
            on_second_signal(sig)
            return
        stop_requested.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    access_log = (
        AccessLog(sys.stdout.buffer, config.logging.format)
        if config.logging.level in ("debug", "info") else None
    )
    async with AsyncExitStack() as stack:
        if access_log is not None:
            stack.callback(access_log.close)
        config = await stack.enter_async_context(embedded_replicas(config))
        app = create_app(config, access_log=access_log)
        # handler_cancellation: a caller that hangs up cancels its handler, which closes the
        # upstream connection, which makes the engine abort the generation.
        # auto_decompress=False (a keyword of aiohttp's request handler, through AppRunner's
        # kwargs): request bodies pass through byte for byte, Content-Encoding intact.
        # LimitedRunner: aiohttp's runner with server.*'s limits on callers (proxy.edge.limits).
        runner = LimitedRunner(
            app, config.server, handler_cancellation=True, access_log=None,
            shutdown_timeout=CUT_GRACE_S, auto_decompress=False,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.server.host, config.server.port, backlog=1024)
            await site.start()
            port = _bound_port(runner)
            log.info("batchgate listening on http://%s:%d", config.server.host, port)
            if on_ready is not None:
                on_ready(config.server.host, port)
            await stop.wait()
            await _drain(app, config.server.drain_timeout_s)
        finally:
            # 5. Close the listener and every connection, then the upstream pools and the
            #    health loops (the app's cleanup_ctx), then the embedded engines.
            await runner.cleanup()
    log.info("batchgate stopped")


async def _drain(app: web.Application, drain_timeout_s: float) -> None:
    """The shutdown checklist, in order. The listener stays open throughout."""
    lifecycle = app[LIFECYCLE]
    scheduler = app[SCHEDULER]
    # 1. Fail readiness and refuse new work (503 + Retry-After), so the load balancer takes
    #    this pod out of rotation while it still answers.
    lifecycle.begin_drain()
    log.info(
        "draining: %d queued, %d in flight, deadline %gs",
        scheduler.queue_depth, scheduler.in_flight, drain_timeout_s,
    )
    # 2. Serve what was already accepted, queued and in flight, streams to their end.
    if await lifecycle.wait_idle(drain_timeout_s):
        log.info("drained")
        return
    # 3. The deadline passed: cut what is left. Queued requests get 503; streams get a final
    #    SSE error event; each handler's finally releases its slot and closes its upstream.
    cut = lifecycle.cut()
    log.warning("drain deadline passed: cutting %d requests", cut)
    # 4. Give the cut handlers a moment to write their last words.
    await lifecycle.wait_idle(CUT_GRACE_S)
