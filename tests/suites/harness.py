"""The proxy in-process on a real loopback socket, served as ``batchgate serve`` serves it
(:class:`proxy.edge.protocol.LimitedRunner`: the server limits in force), with the same
end-of-run checks as the integration fixture: no slot, waiter, handler, checked-out
connection, armed read timer or background task of the proxy is left when it stops.

A context manager rather than a fixture, so a hypothesis test or a long chaos run holds one
proxy across all of its cases and checks the state between them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from proxy.config import Config
from proxy.core.scheduler import Scheduler
from proxy.edge.app import LIFECYCLE, METRICS, SCHEDULER, create_app
from proxy.edge.keys import UPSTREAMS
from proxy.edge.light import LIGHT
from proxy.edge.protocol import LimitedRunner
from proxy.observe.accesslog import AccessLog
from tests.integration.conftest import BOUND_S, proxy_tasks, until


@dataclass
class RunningProxy:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def scheduler(self) -> Scheduler:
        return self.app[SCHEDULER]

    def metric(self, name: str, **labels: str) -> float:
        value = self.app[METRICS].registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def leftovers(self) -> list[str]:
        """What the proxy still holds; empty once every request is over."""
        held = []
        if not self.scheduler.idle():
            held.append(repr(self.scheduler))
        if self.app[LIFECYCLE].active:
            held.append(f"{self.app[LIFECYCLE].active} handlers active")
        if not self.app[LIGHT].slots.idle():
            held.append(repr(self.app[LIGHT].slots))
        for pool in self.app[UPSTREAMS].pools():
            if pool.active or pool.armed_timers():
                held.append(repr(pool))
        return held

    async def settled(self, what: str) -> None:
        """Wait (bounded) until nothing is held: every gauge of the proxy back at 0."""
        await until(lambda: not self.leftovers(), f"{what}: {self.leftovers()}")


@contextlib.asynccontextmanager
async def running_proxy(
    config: Config, access_log: AccessLog | None = None
) -> AsyncIterator[RunningProxy]:
    app = create_app(config, access_log=access_log)
    # As proxy.server serves it: through the runner that applies server.*'s limits.
    runner = LimitedRunner(app, config.server, handler_cancellation=True, access_log=None,
                           shutdown_timeout=1, auto_decompress=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    handle = RunningProxy(url, app, runner)
    try:
        yield handle
        assert await app[LIFECYCLE].wait_idle(BOUND_S), "a handler never finished"
        assert not handle.leftovers(), f"leak: {handle.leftovers()}"
    finally:
        await runner.cleanup()
    await until(lambda: not proxy_tasks(), f"background tasks left: {proxy_tasks()}")
