"""The upstream hop as the edge sees it: one pool per replica, failures named for the core."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from ssl import SSLContext
from typing import Any

from aiohttp import web

from proxy.config import UpstreamConfig
from proxy.core.errors import UpstreamError
from proxy.core.replicas import Replica
from proxy.upstream.pool import ConnectionPool
from proxy.upstream.response import Response
from proxy.upstream.tls import server_hostname

#: ``(replica name, headers) -> headers`` as that replica gets them: the edge's credential
#: policy (proxy.edge.auth.KeyRing.upstream_headers), applied per attempt, since a resend
#: may go to a replica with another key.
Credentials = Callable[[str, list[tuple[str, str]]], list[tuple[str, str]]]


def pool_limit(max_concurrency: int) -> int:
    # A slot per request, and a fresh connection may briefly overlap a pooled one the
    # replica is closing: twice the slots is the hard ceiling, never reached.
    return 2 * max_concurrency


class Upstreams:
    """One keep-alive connection pool per replica, sized to its concurrency.

    The pool is batchgate's own lean HTTP/1.1 client (:mod:`proxy.upstream.pool`): the
    proxy's upstream hop needs exactly one behaviour (send these bytes, stream those back).
    Failures are :class:`proxy.core.errors.UpstreamError`; which of them may go out again
    is decided by :mod:`proxy.core.retry`.
    """

    def __init__(
        self, replicas: tuple[Replica, ...], config: UpstreamConfig, *, light_limit: int,
        ssl: SSLContext | None = None, credentials: Credentials | None = None,
    ) -> None:
        self._config = config
        self._credentials = credentials
        self._ssl = ssl  # proxy.upstream.tls: for the https:// replicas, None if there are none
        self._light_limit = light_limit
        self._closing: set[asyncio.Task[None]] = set()  # pools of retired replicas
        self._pools = {r.name: self._pool(r, pool_limit(r.max_concurrency)) for r in replicas}
        # Slot-free requests (GET, HEAD, OPTIONS: proxy.edge.light) have pools of their own,
        # so they never take, or wait for, a connection a generation could use.
        self._light_pools = {r.name: self._pool(r, 2 * light_limit) for r in replicas}

    def _pool(self, replica: Replica, limit: int) -> ConnectionPool:
        https = replica.url.startswith("https://")
        return ConnectionPool(
            replica.url,
            name=replica.name,
            limit=limit,
            connect_timeout_s=self._config.connect_timeout_s,
            read_timeout_s=self._config.read_timeout_s,
            ssl=self._ssl if https else None,
            server_hostname=server_hostname(replica.url),
        )

    def set_limit(self, replica: str, max_concurrency: int) -> None:
        """The replica's cap changed: its pool follows (see :meth:`ConnectionPool.set_limit`)."""
        self._pools[replica].set_limit(pool_limit(max_concurrency))

    def add(self, replica: Replica) -> None:
        """Pools for a replica added by a reload; call before it can be granted a slot."""
        self._pools[replica.name] = self._pool(replica, pool_limit(replica.max_concurrency))
        self._light_pools[replica.name] = self._pool(replica, 2 * self._light_limit)

    def retire(self, replica: str) -> None:
        """A removed replica's last request is done: close its pools (synchronously callable
        from the slot's release; the closing runs as a task :meth:`close` waits for).

        A slot-free request still in flight on it finishes; its connection is then closed
        instead of pooled (a closed pool keeps nothing).
        """
        pools = [p for p in (self._pools.pop(replica, None),
                             self._light_pools.pop(replica, None)) if p is not None]
        if pools:
            task = asyncio.get_running_loop().create_task(
                _close_all(pools), name=f"retire-pools:{replica}")
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def pools(self) -> list[ConnectionPool]:
        return [*self._pools.values(), *self._light_pools.values()]

    async def close(self) -> None:
        for pool in self.pools():
            await pool.close()
        await asyncio.gather(*self._closing)

    def send(
        self,
        replica: Replica,
        request: web.BaseRequest,
        body: bytes,
        headers: list[tuple[str, str]],
        *,
        fresh: bool,
        light: bool = False,
    ) -> Coroutine[Any, Any, Response]:
        """Send the request; awaited, it returns once the replica's status line and headers
        are in. The pool's own coroutine: no second frame per request.

        Raises :class:`proxy.core.errors.UpstreamError` (or its ``UpstreamTimeout``): when
        called (the replica is gone) or when awaited.
        ``light``: a slot-free request, sent on the replica's pool for those.
        """
        pool = (self._light_pools if light else self._pools).get(replica.name)
        if pool is None:  # retired by a reload since it was picked: never written to
            raise UpstreamError(f"replica {replica.name} was removed by a reload",
                                kind="connect", replica=replica.name, unsent=True)
        if self._credentials is not None:
            headers = self._credentials(replica.name, headers)
        return pool.request(request.method, request.raw_path, headers, body, fresh=fresh)


async def _close_all(pools: list[ConnectionPool]) -> None:
    for pool in pools:
        await pool.close()
