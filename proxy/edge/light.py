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

import asyncio
import json
import logging
import time
from collections.abc import Callable
from functools import cached_property
from typing import Any

from aiohttp import web

from proxy.core.errors import (
    NoHealthyReplica,
    Overloaded,
    ProxyError,
    QueueFull,
    UpstreamError,
)
from proxy.core.replicas import Replica
from proxy.core.retry import Decision, classify
from proxy.core.scheduler import Scheduler
from proxy.edge.forward import Forwarder, _read_body
from proxy.edge.headers import downstream_response_headers, upstream_request_headers
from proxy.edge.keys import METRICS, SCHEDULER, UPSTREAMS
from proxy.edge.route import ROUTING, Routing
from proxy.observe.exchange import Exchange
from proxy.observe.metrics import Metrics
from proxy.upstream.client import Upstreams
from proxy.upstream.connection import Response

log = logging.getLogger("batchgate")

#: Slot-free requests in flight per replica. Probes and listings are answered in milliseconds
#: and a prober sends one at a time, so 8 is far above honest use, yet small enough that GETs
#: cannot crowd the engine's HTTP server (or our file descriptors) while it generates.
LIGHT_LIMIT_PER_REPLICA = 8
#: The methods that never take a slot: they carry no work for the engine (RFC 9110 safe).
LIGHT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: A replica's model list larger than this is not read into memory (a list with thousands of
#: LoRA adapters is well under 1 MiB).
MODELS_MAX_BYTES = 8 * 1024 * 1024


def _listing(model: str) -> dict[str, Any]:
    """An OpenAI model object for a configured name no replica listed."""
    return {"id": model, "object": "model", "created": 0, "owned_by": "batchgate"}


class _Answer:
    """One replica's answer to ``GET /v1/models``, read in full."""

    __slots__ = ("body", "headers", "replica", "status")

    def __init__(self, replica: Replica, upstream: Response, body: bytes) -> None:
        self.replica = replica
        self.status = upstream.status
        self.headers = upstream.headers
        self.body = body

    def models(self) -> list[dict[str, Any]] | None:
        """The ``data`` of an OpenAI model list, or None if this is not one."""
        if not 200 <= self.status < 300:
            return None
        try:
            listing = json.loads(self.body)
        except ValueError:
            return None
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            return None
        return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


class LightSlots:
    """How many slot-free requests each replica is serving; owned by :class:`Light`.

    Invariant: ``0 <= in_flight[name] <= limit``; every :meth:`take` is paired with a
    :meth:`give` in a ``finally``.
    """

    __slots__ = ("_idle_waiters", "_next", "in_flight", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight: dict[str, int] = {}
        self._next = 0  # round-robin start among equally loaded replicas
        # Replicas removed by a reload, waiting for their last slot-free request.
        self._idle_waiters: dict[str, Callable[[], None]] = {}

    def pick(self, replicas: tuple[Replica, ...], tried: set[str]) -> Replica | None:
        """The untried replica taking work (healthy, not draining) with the fewest slot-free
        requests, under the limit."""
        best: Replica | None = None
        best_load = self.limit
        n = len(replicas)
        start = self._next
        for i in range(n):
            replica = replicas[(start + i) % n]
            load = self.in_flight.get(replica.name, 0)
            if replica.takes_work and replica.name not in tried and load < best_load:
                best, best_load = replica, load
        if best is not None:
            self._next = (best.index + 1) % n
        return best

    def take(self, replica: Replica) -> None:
        self.in_flight[replica.name] = self.in_flight.get(replica.name, 0) + 1

    def give(self, replica: Replica) -> None:
        left = self.in_flight[replica.name] = self.in_flight[replica.name] - 1
        if not left and self._idle_waiters:
            callback = self._idle_waiters.pop(replica.name, None)
            if callback is not None:
                del self.in_flight[replica.name]
                callback()

    def when_idle(self, name: str, callback: Callable[[], None]) -> None:
        """Call ``callback`` once no slot-free request is in flight on replica ``name`` (at
        once if none is), and forget the replica: it was removed (proxy.control.reload)."""
        if self.in_flight.get(name):
            self._idle_waiters[name] = callback
            return
        self.in_flight.pop(name, None)
        callback()

    def idle(self) -> bool:
        return not any(self.in_flight.values())

    def __repr__(self) -> str:
        busy = ", ".join(f"{k} {v}/{self.limit}" for k, v in self.in_flight.items() if v)
        return f"<LightSlots {busy or 'idle'}>"


class Light:
    """The work inside the frame for slot-free requests (the app holds it under ``LIGHT``)."""

    def __init__(
        self, app: web.Application, forwarder: Forwarder, limit: int = LIGHT_LIMIT_PER_REPLICA
    ) -> None:
        self.app = app
        self.forwarder = forwarder  # its relay: answers go out exactly as proxied ones do
        self.slots = LightSlots(limit)

    # The app's shared objects, looked up once (as the Forwarder and the Frame do): each
    # ``app[KEY]`` is a Python call. Lazily: the app may not hold them all yet.
    @cached_property
    def _scheduler(self) -> Scheduler:
        return self.app[SCHEDULER]

    @cached_property
    def _metrics(self) -> Metrics:
        return self.app[METRICS]

    @cached_property
    def _upstreams(self) -> Upstreams:
        return self.app[UPSTREAMS]

    @cached_property
    def _routing(self) -> Routing:
        return self.app[ROUTING]

    async def forwarded(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        """Forward to one healthy replica; resend elsewhere only what never reached one."""
        config = self.forwarder.config
        body = await _read_body(request, config.server.max_body_bytes)
        scheduler = self._scheduler
        metrics = self._metrics
        headers = upstream_request_headers(request, exchange.request_id)
        tried: set[str] = set()
        while True:
            replica = self.slots.pick(scheduler.replicas, tried)
            if replica is None:
                if tried or not scheduler.any_healthy():
                    raise NoHealthyReplica("no healthy replica answered", retry_after_s=1)
                raise self._at_limit()
            tried.add(replica.name)
            exchange.replica = replica.name
            exchange.dispatched_at = time.monotonic()
            exchange.stage = "waiting_first_byte"
            exchange.attempts += 1
            self.slots.take(replica)
            try:
                try:
                    upstream = await self._upstreams.send(
                        replica, request, body, headers, fresh=exchange.attempts > 1, light=True
                    )
                except UpstreamError as err:
                    metrics.upstream_error(replica.name, err.kind)
                    # GET, HEAD and OPTIONS are idempotent: resent by the same rule as proxied
                    # requests (proxy.core.retry), to another replica.
                    decision = classify(err, idempotent=True)
                    if decision is Decision.FAIL:
                        raise
                    if decision is Decision.MARK_DOWN_AND_RESEND:
                        self._mark_down(replica, err)
                    if exchange.attempts > config.upstream.retries:
                        raise UpstreamError(
                            f"no replica answered after {exchange.attempts} attempts: {err}",
                            kind=err.kind, replica=replica.name,
                        ) from err
                    metrics.retries.labels(replica.name).inc()
                    continue
                return await self.forwarder.relay(request, upstream, exchange, replica)
            finally:
                self.slots.give(replica)

    def _at_limit(self) -> QueueFull:
        return QueueFull(
            f"every healthy replica is serving {self.slots.limit} requests that take "
            f"no slot (GET, HEAD, OPTIONS), the limit per replica",
            retry_after_s=1,
        )

    def _mark_down(self, replica: Replica, err: UpstreamError) -> None:
        if replica.healthy:
            log.warning("replica %s marked unhealthy: %s", replica.name, err)
        self._scheduler.set_healthy(replica, False)

    async def models(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        """``GET /v1/models``: the union of what the healthy replicas serve, each id once.

        Replicas are asked at once, each on a slot-free place, and the whole listing waits at
        most ``upstream.read_timeout_s``: a replica that fails, is silent or is at its
        slot-free bound is left out. The first replica (in config order) that lists an id
        speaks for it. When no replica gives a list but one answers without failing (a 4xx,
        e.g. a wrong API key, or a 2xx that is not an OpenAI list), the first such answer is
        relayed as is: it is the caller's to see. A 5xx is a failure. No answer at all: 503.
        """
        config = self.forwarder.config
        scheduler = self._scheduler
        headers = upstream_request_headers(request, exchange.request_id)
        asked = []
        for replica in scheduler.replicas:
            if replica.takes_work and self.slots.in_flight.get(replica.name, 0) < self.slots.limit:
                asked.append(asyncio.create_task(self._ask(replica, request, headers, exchange)))
        if not asked:
            if any(r.takes_work for r in scheduler.replicas):
                raise self._at_limit()
            raise NoHealthyReplica("no healthy replica to list models", retry_after_s=1)
        exchange.dispatched_at = time.monotonic()
        exchange.stage = "waiting_first_byte"
        exchange.attempts = 1
        try:
            await asyncio.wait(asked, timeout=config.upstream.read_timeout_s)
        finally:
            # Late ones are cancelled (their connections closed), and every task is awaited,
            # on cancellation too, so no slot-free place outlives this request.
            for task in asked:
                task.cancel()
            results = await asyncio.gather(*asked, return_exceptions=True)
        answers = []
        overloaded: Overloaded | None = None
        for replica_result in results:
            if isinstance(replica_result, _Answer):
                answers.append(replica_result)
            elif isinstance(replica_result, Overloaded):
                overloaded = replica_result  # our own exhaustion, not the replicas'
            elif not isinstance(replica_result, ProxyError | asyncio.CancelledError):
                log.error("asking a replica for /v1/models failed inside batchgate",
                          exc_info=replica_result)
        merged: list[dict[str, Any]] = []
        seen: set[str] = set()
        listed: list[str] = []
        routed = self._routing.routed
        for answer in answers:
            models = answer.models()
            if models is None:
                continue
            listed.append(answer.replica.name)
            for item in models:
                # With model routing, only what batchgate would route to this replica: a
                # listed model it is not configured for would be a 404 (model_not_found).
                if item["id"] not in seen and (not routed or answer.replica.serves(item["id"])):
                    seen.add(item["id"])
                    merged.append(item)
        if routed:
            # Configured names no replica listed (an alias, or a replica that did not answer)
            # are served all the same: each once, like what `auto` read.
            merged += [_listing(name) for name in scheduler.models() if name not in seen]
        exchange.first_byte_at = exchange.last_byte_at = time.monotonic()
        if not listed:
            refused = [a for a in answers if a.status < 500]
            if not refused:
                exchange.replica = None
                if overloaded is not None:
                    raise overloaded
                raise NoHealthyReplica("no healthy replica answered", retry_after_s=1)
            first = refused[0]
            exchange.replica, exchange.status, exchange.stage = (
                first.replica.name, first.status, "done")
            out = downstream_response_headers(first.headers, exchange.request_id)
            out.popall("Content-Length", None)
            return web.Response(status=first.status, body=first.body, headers=out)
        exchange.replica = ",".join(listed)  # names never contain a comma
        exchange.status, exchange.stage = 200, "done"
        body = json.dumps({"object": "list", "data": merged}).encode()
        return web.Response(body=body, content_type="application/json",
                            headers={"X-Request-Id": exchange.request_id})

    async def _ask(
        self, replica: Replica, request: web.Request, headers: list[tuple[str, str]],
        exchange: Exchange,
    ) -> _Answer:
        metrics = self._metrics
        self.slots.take(replica)
        try:
            fresh = False
            while True:
                try:
                    upstream = await self._upstreams.send(
                        replica, request, b"", headers, fresh=fresh, light=True
                    )
                    break
                except UpstreamError as err:
                    metrics.upstream_error(replica.name, err.kind)
                    decision = classify(err, idempotent=True)
                    if decision is Decision.MARK_DOWN_AND_RESEND:
                        self._mark_down(replica, err)
                    if decision is not Decision.RESEND or fresh:
                        raise
                    fresh = True  # once more, on a connection of its own
            metrics.answered(replica.name, exchange.route, upstream.status, exchange.tenant)
            try:
                chunks: list[bytes] = []
                size = 0
                while chunk := await upstream.readany():
                    size += len(chunk)
                    if size > MODELS_MAX_BYTES:
                        raise UpstreamError(
                            f"replica {replica.name}: model list over {MODELS_MAX_BYTES} bytes",
                            kind="reset", replica=replica.name,
                        )
                    chunks.append(chunk)
            except BaseException:
                upstream.close()
                raise
            upstream.release()
            return _Answer(replica, upstream, b"".join(chunks))
        finally:
            self.slots.give(replica)


LIGHT = web.AppKey("light", Light)
