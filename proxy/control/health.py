"""Active health checks: GET ``health.path`` on every replica, at startup and each interval.

State changes go through the scheduler only, so a replica that comes back is given waiting
requests at that very moment.
"""

from __future__ import annotations

import asyncio
import errno
import logging

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.config import HealthConfig, UpstreamConfig
from proxy.core.errors import UpstreamError
from proxy.core.replicas import Replica
from proxy.core.scheduler import Scheduler
from proxy.edge.headers import (
    SKIP_AUTO_HEADERS,
    downstream_response_headers,
    upstream_request_headers,
)

log = logging.getLogger("batchgate.health")


class HealthChecker:
    """One probe loop per replica, owned here and cancelled in :meth:`close`.

    Its session also serves ``GET /v1/models``, which must not take a generation slot or
    wait behind the replica's pooled connections.
    """

    def __init__(
        self, scheduler: Scheduler, config: HealthConfig, upstream: UpstreamConfig
    ) -> None:
        self._scheduler = scheduler
        self._config = config
        self._probe_timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self._forward_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=upstream.connect_timeout_s, sock_read=upstream.read_timeout_s
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        )
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for replica in self._scheduler.replicas:
            self._tasks.append(
                asyncio.create_task(self._loop(replica), name=f"health:{replica.name}")
            )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._session.close()

    async def probe(self, replica: Replica) -> bool | None:
        """True or False: the replica's verdict; None: we could not ask (out of descriptors)."""
        try:
            async with self._session.get(
                replica.url + self._config.path, timeout=self._probe_timeout
            ) as response:
                await response.read()
                return 200 <= response.status < 300
        except aiohttp.ClientConnectorError as err:
            if err.os_error.errno in (errno.EMFILE, errno.ENFILE):
                return None  # our own exhaustion says nothing about the replica
            return False
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _loop(self, replica: Replica) -> None:
        while True:
            healthy = await self.probe(replica)
            if healthy is None:
                log.warning("replica %s not probed: batchgate is out of file descriptors",
                            replica.name)
            elif healthy != replica.healthy:
                log.warning("replica %s is now %s", replica.name,
                            "healthy" if healthy else "unhealthy")
            if healthy is not None:
                self._scheduler.set_healthy(replica, healthy)
            await asyncio.sleep(self._config.interval_s)

    async def forward_get(
        self, replica: Replica, request: web.Request, request_id: str
    ) -> web.Response:
        """A small GET answered in full (``/v1/models``): relayed with status and headers."""
        url = URL(replica.url + request.raw_path, encoded=True)
        try:
            async with self._session.get(
                url,
                timeout=self._forward_timeout,
                headers=upstream_request_headers(request, request_id),
                skip_auto_headers=SKIP_AUTO_HEADERS,
            ) as upstream:
                body = await upstream.read()
                headers = downstream_response_headers(upstream.headers, request_id)
                headers.popall("Content-Length", None)
                return web.Response(status=upstream.status, body=body, headers=headers)
        except (aiohttp.ClientError, TimeoutError) as err:
            raise UpstreamError(f"replica {replica.name}: {err}", kind="connect",
                                replica=replica.name) from err
