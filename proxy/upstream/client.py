"""The upstream hop as the edge sees it: one pool per replica, failures named for the core."""

from __future__ import annotations

from aiohttp import web

from proxy.config import UpstreamConfig
from proxy.core.replicas import Replica
from proxy.upstream.connection import Response
from proxy.upstream.pool import ConnectionPool


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

    def __init__(self, replicas: tuple[Replica, ...], config: UpstreamConfig) -> None:
        self._config = config
        self._pools = {
            replica.name: ConnectionPool(
                replica.url,
                name=replica.name,
                limit=pool_limit(replica.max_concurrency),
                connect_timeout_s=config.connect_timeout_s,
                read_timeout_s=config.read_timeout_s,
            )
            for replica in replicas
        }

    def set_limit(self, replica: str, max_concurrency: int) -> None:
        """The replica's cap changed: its pool follows (see :meth:`ConnectionPool.set_limit`)."""
        self._pools[replica].set_limit(pool_limit(max_concurrency))

    def pools(self) -> list[ConnectionPool]:
        return list(self._pools.values())

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()

    async def send(
        self,
        replica: Replica,
        request: web.BaseRequest,
        body: bytes,
        headers: list[tuple[str, str]],
        *,
        fresh: bool,
    ) -> Response:
        """Send the request; return once the replica's status line and headers are in.

        Raises :class:`proxy.core.errors.UpstreamError` (or its ``UpstreamTimeout``).
        """
        return await self._pools[replica.name].request(
            request.method, request.raw_path, headers, body, fresh=fresh)
