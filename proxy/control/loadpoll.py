"""Polls ``GET /load`` of replicas that are batchgates, when their answers have not said it.

A gateway learns a sidecar's load from the ``X-Batchgate-*`` headers on each answer
(``server.load_headers`` on the sidecar; recorded by :mod:`proxy.edge.forward`). A sidecar
that sent no answer for ``health.interval_s`` (idle, or its headers are off) is asked here
instead, every ``health.interval_s`` (jittered as the probes are), so the pick
(:mod:`proxy.core.load`) has a reading younger than ``2 x health.interval_s`` for it.

Only replicas known to be batchgates are asked (a reading or an ``X-Batchgate-Rejected``
answer came from them: ``LoadBoard.batchgates``): a plain engine never gets a request it
did not ask for, and the loop does not even start before the first batchgate is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from ssl import SSLContext

import aiohttp
from aiohttp import web

from proxy.config import HealthConfig
from proxy.control.health import Timing, probe_delay
from proxy.core.load import parse_json
from proxy.core.replicas import Replica
from proxy.core.scheduler import Scheduler

log = logging.getLogger("batchgate.load")

LOAD_PATH = "/load"


class LoadPoller:
    """One background loop over every replica that takes work; owned by the app (started
    and closed in its ``cleanup_ctx``). Reads the health settings per round (a reload)."""

    def __init__(
        self,
        scheduler: Scheduler,
        health: Callable[[], HealthConfig],
        *,
        ssl: SSLContext | None = None,
        timing: Timing | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._health = health
        self._timing = timing if timing is not None else Timing()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True,
                                           ssl=ssl if ssl is not None else True),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._task: asyncio.Task[None] | None = None
        self._known = asyncio.Event()  # a batchgate replica is known: there is work
        scheduler.load.on_batchgate = self._known.set
        if scheduler.load.batchgates:
            self._known.set()
        self.rounds = 0  # completed rounds, for tests

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="load:poll")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._session.close()

    async def _loop(self) -> None:
        await self._known.wait()
        while True:
            await self.poll_once()
            await self._timing.sleep(probe_delay(self._health().interval_s, self._timing.rng))

    async def poll_once(self) -> None:
        """Ask every batchgate replica that takes work and has no reading younger than an
        interval."""
        interval = self._health().interval_s
        board = self._scheduler.load
        due = []
        if board.batchgates:
            for replica in self._scheduler.replicas:
                age = board.age(replica.name)
                if (replica.name in board.batchgates and replica.takes_work
                        and (age is None or age >= interval)):
                    due.append(replica)
        if due:
            await asyncio.gather(*(self._ask(r) for r in due))
        self.rounds += 1

    async def _ask(self, replica: Replica) -> None:
        config = self._health()
        try:
            async with self._session.get(
                replica.url + LOAD_PATH, timeout=aiohttp.ClientTimeout(total=config.timeout_s)
            ) as response:
                raw = await response.read()
                reading = parse_json(json.loads(raw)) if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            # Down or not answering: the health probes judge that; no reading is no reading.
            return
        if reading is not None and replica.state != "removed":
            self._scheduler.load.record(replica, reading)


#: The app's poller (typed state, set by proxy.edge.app), for tests and introspection.
LOAD_POLLER = web.AppKey("load_poller", LoadPoller)
