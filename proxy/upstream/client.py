"""The upstream hop as the edge sees it: one pool per replica, failures named for the core."""

from __future__ import annotations

from ssl import SSLContext

from aiohttp import web

from proxy.config import UpstreamConfig
from proxy.core.errors import UpstreamError, UpstreamTimeout
from proxy.core.replicas import Replica
from proxy.upstream.connection import (
    ConnectionPool,
    NotDeliveredError,
    Response,
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamTimeoutError,
)
from proxy.upstream.tls import server_hostname


class NotDelivered(Exception):
    """The request never reached the replica, so it may be sent again elsewhere."""

    def __init__(self, kind: str, detail: str, *, replica_down: bool) -> None:
        super().__init__(detail)
        self.kind = kind
        self.replica_down = replica_down


class Upstreams:
    """One keep-alive connection pool per replica, sized to its concurrency.

    The pool is batchgate's own lean HTTP/1.1 client (:mod:`proxy.upstream.connection`): the
    proxy's upstream hop needs exactly one behaviour (send these bytes, stream those back)
    and aiohttp's general-purpose client cost more CPU per request than all of batchgate's
    own logic. A request whose pooled connection turned out to be closed by the replica goes
    out again with ``fresh=True``, on a connection of its own.
    """

    def __init__(
        self, replicas: tuple[Replica, ...], config: UpstreamConfig, *, light_limit: int,
        ssl: SSLContext | None = None,
    ) -> None:
        self._config = config
        self._ssl = ssl  # proxy.upstream.tls: for the https:// replicas, None if there are none
        # A slot per request, and a fresh connection may briefly overlap a pooled one the
        # replica is closing: twice the slots is the hard ceiling, never reached.
        self._pools = {r.name: self._pool(r, 2 * r.max_concurrency) for r in replicas}
        # Slot-free requests (GET, HEAD, OPTIONS: proxy.edge.light) have pools of their own,
        # so they never take, or wait for, a connection a generation could use.
        self._light_pools = {r.name: self._pool(r, 2 * light_limit) for r in replicas}

    def _pool(self, replica: Replica, limit: int) -> ConnectionPool:
        https = replica.url.startswith("https://")
        return ConnectionPool(
            replica.url,
            limit=limit,
            connect_timeout_s=self._config.connect_timeout_s,
            read_timeout_s=self._config.read_timeout_s,
            ssl=self._ssl if https else None,
            server_hostname=server_hostname(replica.url),
        )

    async def close(self) -> None:
        for pool in [*self._pools.values(), *self._light_pools.values()]:
            await pool.close()

    async def send(
        self,
        replica: Replica,
        request: web.BaseRequest,
        body: bytes,
        headers: list[tuple[str, str]],
        *,
        fresh: bool,
        light: bool = False,
    ) -> Response:
        """Send the request; return once the replica's status line and headers are in.

        Raises :class:`NotDelivered` when the request certainly never reached the replica
        (refused or timed-out connect; a pooled connection the replica had already closed),
        and :class:`UpstreamError` for failures after it may have. ``light``: a slot-free
        request, sent on the replica's pool for those.
        """
        pool = (self._light_pools if light else self._pools)[replica.name]
        try:
            return await pool.request(request.method, request.raw_path, headers, body,
                                      fresh=fresh)
        except NotDeliveredError as err:
            if err.kind == "connect":
                raise NotDelivered("connect", str(err), replica_down=True) from err
            # The replica had closed this idle keep-alive connection before our request got
            # there (llama.cpp's server does so after every stream): not the replica's fault.
            raise NotDelivered("reset", f"stale pooled connection: {err}",
                               replica_down=False) from err
        except UpstreamTimeoutError as err:
            raise UpstreamTimeout(
                f"replica {replica.name} sent no response within "
                f"{self._config.read_timeout_s:g}s",
                kind="timeout",
                replica=replica.name,
            ) from err
        except (UpstreamClosedError, UpstreamConnectError, OSError) as err:
            raise UpstreamError(
                f"replica {replica.name} closed the connection: {err}",
                kind="reset", replica=replica.name,
            ) from err
