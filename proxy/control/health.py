"""Active health checks: GET ``health.path`` on every replica, at startup and each interval.

State changes go through the scheduler only, so a replica that comes back is given waiting
requests at that very moment.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from ssl import SSLContext

import aiohttp

from proxy.config import HealthConfig, UpstreamConfig
from proxy.core.replicas import Replica
from proxy.core.scheduler import Scheduler

log = logging.getLogger("batchgate.health")


class HealthChecker:
    """One probe loop per replica, owned here and cancelled in :meth:`close`.

    Probes use aiohttp's client: they run once per ``interval_s``, off the hot path, and need
    none of the lean pool's streaming. Requests that callers send (slot-free GETs included)
    always go through :mod:`proxy.upstream`, so they are relayed byte for byte.
    """

    def __init__(
        self, scheduler: Scheduler, config: HealthConfig, *, ssl: SSLContext | None = None
    ) -> None:
        self._scheduler = scheduler
        self._config = config
        self._probe_timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self._session = aiohttp.ClientSession(
            # The same TLS context as the pools (proxy.upstream.tls); aiohttp sends the URL's
            # host as SNI and checks the certificate against it.
            connector=aiohttp.TCPConnector(limit=0, force_close=True,
                                           ssl=ssl if ssl is not None else True),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        )
        self._tasks: dict[str, asyncio.Task[None]] = {}  # a probe loop per replica name
        self._stopped: set[asyncio.Task[None]] = set()  # cancelled by a reload; close() waits
        #: Why each replica's last probe failed, for the log line when its state changes
        #: (a certificate the CA does not know, a refused connection, a status code).
        self.why: dict[str, str] = {}

    def start(self) -> None:
        for replica in self._scheduler.replicas:
            self.add(replica)

    async def close(self) -> None:
        tasks = [*self._tasks.values(), *self._stopped]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._stopped.clear()
        await self._session.close()

    # -- live reload (proxy.control.reload) -----------------------------------------------

    def add(self, replica: Replica) -> None:
        """Probe a replica (at startup, or added by a reload): the first probe runs now."""
        self._tasks[replica.name] = asyncio.create_task(
            self._loop(replica), name=f"health:{replica.name}")

    def remove(self, replica: Replica) -> None:
        """Stop probing a replica that left the config (called once its last request is done,
        so a draining replica stays watched)."""
        task = self._tasks.pop(replica.name, None)
        if task is not None:
            self._stop(task)
        self.why.pop(replica.name, None)

    def reconfigure(self, config: HealthConfig, upstream: UpstreamConfig | None = None) -> None:
        """New ``health`` settings: every replica is probed with them at once. (``upstream``:
        for passive ejection's settings, which live there; unused here.)"""
        self._config = config
        self._probe_timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        for name, task in list(self._tasks.items()):
            replica = self._scheduler.replica(name)
            self._stop(task)
            if replica is not None:
                self.add(replica)

    def _stop(self, task: asyncio.Task[None]) -> None:
        task.cancel()
        self._stopped.add(task)
        task.add_done_callback(self._stopped.discard)

    async def probe(self, replica: Replica) -> bool | None:
        """True or False: the replica's verdict; None: we could not ask (out of descriptors)."""
        try:
            async with self._session.get(
                replica.url + self._config.path, timeout=self._probe_timeout
            ) as response:
                await response.read()
                self.why[replica.name] = f"{self._config.path} answered {response.status}"
                return 200 <= response.status < 300
        except aiohttp.ClientConnectorError as err:
            if err.os_error.errno in (errno.EMFILE, errno.ENFILE):
                return None  # our own exhaustion says nothing about the replica
            self.why[replica.name] = str(err)
            return False
        except (aiohttp.ClientError, TimeoutError) as err:
            self.why[replica.name] = str(err) or type(err).__name__
            return False

    async def _loop(self, replica: Replica) -> None:
        while True:
            healthy = await self.probe(replica)
            if healthy is None:
                log.warning("replica %s not probed: batchgate is out of file descriptors",
                            replica.name)
            elif healthy != replica.healthy:
                log.warning("replica %s is now %s%s", replica.name,
                            "healthy" if healthy else "unhealthy",
                            "" if healthy else f": {self.why.get(replica.name, '')}")
            if healthy is not None:
                self._scheduler.set_healthy(replica, healthy)
            await asyncio.sleep(self._config.interval_s)
