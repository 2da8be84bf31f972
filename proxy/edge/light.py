"""Requests that take no generation slot: GET, HEAD and OPTIONS go straight to a healthy replica.

Only work takes a slot. A health probe copied from a vLLM manifest (``GET /health``), a
``/version`` or ``/ping``, a model listing: none of them costs the engine a batch place, and
queueing them behind generations made probes fail exactly when the replica was busiest.

They are bounded instead by :data:`LIGHT_LIMIT_PER_REPLICA` requests in flight per replica, on
a pool of their own (:meth:`proxy.upstream.client.Upstreams.send` with ``light=True``), so a
flood of GETs can neither take generation slots nor open unbounded connections to a replica.
A request that finds every healthy replica at that bound gets ``429 queue_full`` at once: there
is no queue for slot-free requests (they are quick, and a prober retries on its own period).
The answer is relayed by the same byte-for-byte pipe as proxied answers.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from proxy.core.errors import NoHealthyReplica, QueueFull, UpstreamError
from proxy.core.replicas import Replica
from proxy.edge.forward import _read_body
from proxy.edge.headers import upstream_request_headers
from proxy.edge.keys import CONFIG, LIFECYCLE, METRICS, SCHEDULER, UPSTREAMS
from proxy.edge.relay import pipe
from proxy.observe.exchange import Exchange
from proxy.upstream.client import NotDelivered
from proxy.upstream.connection import Response

log = logging.getLogger("batchgate")

#: Slot-free requests in flight per replica. Probes and listings are answered in milliseconds
#: and a prober sends one at a time, so 8 is far above honest use, yet small enough that GETs
#: cannot crowd the engine's HTTP server (or our file descriptors) while it generates.
LIGHT_LIMIT_PER_REPLICA = 8
#: The methods that never take a slot: they carry no work for the engine (RFC 9110 safe).
LIGHT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class LightSlots:
    """How many slot-free requests each replica is serving; owned by :class:`Light`.

    Invariant: ``0 <= in_flight[name] <= limit``; every :meth:`take` is paired with a
    :meth:`give` in a ``finally``.
    """

    __slots__ = ("_next", "in_flight", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight: dict[str, int] = {}
        self._next = 0  # round-robin start among equally loaded replicas

    def pick(self, replicas: tuple[Replica, ...], tried: set[str]) -> Replica | None:
        """The healthy, untried replica with the fewest slot-free requests under the limit."""
        best: Replica | None = None
        best_load = self.limit
        n = len(replicas)
        start = self._next
        for i in range(n):
            replica = replicas[(start + i) % n]
            load = self.in_flight.get(replica.name, 0)
            if replica.healthy and replica.name not in tried and load < best_load:
                best, best_load = replica, load
        if best is not None:
            self._next = (best.index + 1) % n
        return best

    def take(self, replica: Replica) -> None:
        self.in_flight[replica.name] = self.in_flight.get(replica.name, 0) + 1

    def give(self, replica: Replica) -> None:
        self.in_flight[replica.name] -= 1

    def idle(self) -> bool:
        return not any(self.in_flight.values())

    def __repr__(self) -> str:
        busy = ", ".join(f"{k} {v}/{self.limit}" for k, v in self.in_flight.items() if v)
        return f"<LightSlots {busy or 'idle'}>"


class Light:
    """The work inside the frame for slot-free requests (the app holds it under ``LIGHT``)."""

    def __init__(self, app: web.Application, limit: int = LIGHT_LIMIT_PER_REPLICA) -> None:
        self.app = app
        self.slots = LightSlots(limit)

    async def forwarded(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        """Forward to one healthy replica; resend elsewhere only what never reached one."""
        config = self.app[CONFIG]
        body = await _read_body(request, config.server.max_body_bytes)
        scheduler = self.app[SCHEDULER]
        metrics = self.app[METRICS]
        headers = upstream_request_headers(request, exchange.request_id)
        tried: set[str] = set()
        while True:
            replica = self.slots.pick(scheduler.replicas, tried)
            if replica is None:
                if tried or not scheduler.any_healthy():
                    raise NoHealthyReplica("no healthy replica answered", retry_after_s=1)
                raise QueueFull(
                    f"every healthy replica is serving {self.slots.limit} requests that take "
                    f"no slot (GET, HEAD, OPTIONS), the limit per replica",
                    retry_after_s=1,
                )
            tried.add(replica.name)
            exchange.replica = replica.name
            exchange.dispatched_at = time.monotonic()
            exchange.stage = "waiting_first_byte"
            exchange.attempts += 1
            self.slots.take(replica)
            try:
                try:
                    upstream = await self.app[UPSTREAMS].send(
                        replica, request, body, headers, fresh=exchange.attempts > 1, light=True
                    )
                except NotDelivered as err:
                    metrics.upstream_error(replica.name, err.kind)
                    if err.replica_down:
                        if replica.healthy:
                            log.warning("replica %s marked unhealthy: %s", replica.name, err)
                        scheduler.set_healthy(replica, False)
                    if exchange.attempts > config.upstream.retries:
                        raise UpstreamError(
                            f"no replica could be reached after {exchange.attempts} attempts: "
                            f"{err}",
                            kind=err.kind, replica=replica.name,
                        ) from err
                    metrics.retries.labels(replica.name).inc()
                    continue
                except UpstreamError as err:
                    metrics.upstream_error(replica.name, err.kind)
                    raise
                return await self._relay(request, upstream, exchange, replica)
            finally:
                self.slots.give(replica)

    async def _relay(
        self, request: web.Request, upstream: Response, exchange: Exchange, replica: Replica
    ) -> web.StreamResponse:
        metrics = self.app[METRICS]
        exchange.status = upstream.status
        metrics.answered(replica.name, exchange.route, upstream.status)
        lifecycle = self.app[LIFECYCLE]
        completed = False
        try:
            response = await pipe(
                request, upstream, exchange,
                is_cut=lambda: lifecycle.cutting,
                on_gap=metrics.inter_chunk_observer(exchange.route),
                stall_limit_s=self.app[CONFIG].upstream.read_timeout_s,
            )
            completed = exchange.stage == "done"
            if exchange.upstream_error is not None:
                metrics.upstream_error(replica.name, exchange.upstream_error)
                exchange.outcome = f"upstream_error:{exchange.upstream_error}"
            if exchange.client_gone:
                exchange.outcome = "client_disconnect"
            return response
        finally:
            if completed:
                upstream.release()
            else:
                upstream.close()


LIGHT = web.AppKey("light", Light)
