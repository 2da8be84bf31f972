"""The HTTP edge: routes, the request path, and the one place errors become status codes."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.config import Config
from proxy.control.drain import Lifecycle
from proxy.control.health import HealthChecker
from proxy.core.errors import (
    BadRequest,
    BodyTooLarge,
    Draining,
    InternalError,
    NoHealthyReplica,
    ProxyError,
    UpstreamError,
    error_body,
)
from proxy.core.replicas import Replica
from proxy.core.scheduler import Lease, Scheduler
from proxy.edge.relay import NotDelivered, Upstreams, pipe, upstream_request_headers
from proxy.observe.accesslog import AccessLog
from proxy.observe.exchange import Exchange
from proxy.observe.metrics import Metrics, route_label
from proxy.upstream.connection import Response

log = logging.getLogger("batchgate")

CONFIG = web.AppKey("config", Config)
SCHEDULER = web.AppKey("scheduler", Scheduler)
METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
HEALTH = web.AppKey("health", HealthChecker)


def new_request_id() -> str:
    # 128 random bits as hex, like a uuid4 but without a getrandom syscall per request:
    # unique enough to correlate logs, never used as a secret.
    return f"{random.getrandbits(128):032x}"


def json_error(err: ProxyError, request_id: str | None = None) -> web.Response:
    headers = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(err.retry_after_s)
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return web.Response(
        status=err.status,
        body=json.dumps(error_body(err)).encode(),
        content_type="application/json",
        headers=headers,
    )


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(
            f"request body of {request.content_length} bytes exceeds server.max_body_bytes "
            f"({limit})"
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as err:
        raise BodyTooLarge(f"request body exceeds server.max_body_bytes ({limit})") from err
    except (aiohttp.ClientPayloadError, ValueError) as err:
        raise BadRequest(f"could not read the request body: {err}") from err


def _outcome_of(err: ProxyError) -> str:
    if isinstance(err, UpstreamError):
        return f"upstream_error:{err.kind}"
    return f"rejected:{err.reason or err.type}"


class Handlers:
    """Request handlers over the app's typed state (no module-level singletons)."""

    def __init__(self, app: web.Application, access_log: AccessLog | None) -> None:
        self.app = app
        self.access_log = access_log

    @property
    def config(self) -> Config:
        return self.app[CONFIG]

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, _request: web.Request) -> web.Response:
        if self.app[LIFECYCLE].draining:
            return web.Response(status=503, text="draining\n")
        if not self.app[SCHEDULER].any_healthy():
            return web.Response(status=503, text="no healthy replica\n")
        return web.Response(text="ready\n")

    async def metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.app[METRICS].registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.StreamResponse:
        """Answered by any healthy replica, without taking a slot: it costs the engine nothing."""
        return await self._serve(request, self._models)

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._proxied)

    async def _serve(
        self,
        request: web.Request,
        work: Callable[[web.Request, Exchange], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """The frame around every relayed request: draining, error mapping, bookkeeping."""
        lifecycle = self.app[LIFECYCLE]
        request_id = request.headers.get("X-Request-Id") or new_request_id()
        exchange = Exchange(
            request_id=request_id,
            method=request.method,
            path=request.path,
            route=route_label(request.path),
            arrival=asyncio.get_running_loop().time(),
            started=time.monotonic(),
        )
        task = lifecycle.enter()
        try:
            if lifecycle.draining:
                raise Draining("batchgate is shutting down", retry_after_s=1)
            return await work(request, exchange)
        except ProxyError as err:
            exchange.status = err.status
            exchange.outcome = _outcome_of(err)
            return json_error(err, request_id)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            # The caller's transport closed under a write outside the relay loop.
            exchange.outcome = "client_disconnect"
            raise
        except Exception as err:  # a bug of ours: answer like an API, and say it in the log
            log.exception("request %s failed inside batchgate", request_id)
            exchange.status = 500
            exchange.outcome = "error:internal"
            if exchange.prepared:
                raise
            return json_error(InternalError(f"batchgate failed: {type(err).__name__}"),
                              request_id)
        except asyncio.CancelledError:
            if not lifecycle.cutting:
                # aiohttp cancels a handler when its caller disconnects.
                exchange.outcome = "client_disconnect"
                raise
            if exchange.prepared:
                # The stream got its SSE error event; the connection just closes.
                exchange.outcome = "drain_cut"
                raise
            exchange.outcome = "rejected:draining"
            exchange.status = Draining.status
            return json_error(
                Draining("batchgate is shutting down; request cut at the drain deadline",
                         retry_after_s=1),
                request_id,
            )
        finally:
            # Synchronous, so no cancellation can skip it: a caller that closes its
            # connection the instant its answer is complete still gets counted.
            self.app[METRICS].record(exchange)
            if self.access_log is not None:
                self.access_log.record(exchange)
            lifecycle.leave(task)

    async def _models(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        metrics = self.app[METRICS]
        for replica in [r for r in self.app[SCHEDULER].replicas if r.healthy]:
            exchange.replica = replica.name
            exchange.dispatched_at = time.monotonic()
            exchange.stage = "waiting_first_byte"
            try:
                response = await self.app[HEALTH].forward_get(
                    replica, request, exchange.request_id
                )
            except UpstreamError as err:
                metrics.upstream_error(replica.name, err.kind)
                continue
            exchange.first_byte_at = exchange.last_byte_at = time.monotonic()
            exchange.status = response.status
            exchange.stage = "done"
            metrics.answered(replica.name, exchange.route, response.status)
            return response
        exchange.replica = None
        raise NoHealthyReplica("no healthy replica answered", retry_after_s=1)

    async def _proxied(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        body = await _read_body(request, self.config.server.max_body_bytes)
        return await self._forward(request, body, exchange)

    async def _forward(
        self, request: web.Request, body: bytes, exchange: Exchange
    ) -> web.StreamResponse:
        scheduler = self.app[SCHEDULER]
        upstreams = self.app[UPSTREAMS]
        metrics = self.app[METRICS]
        retries = self.config.upstream.retries
        deadline = exchange.arrival + self.config.queue.timeout_s
        headers = upstream_request_headers(request, exchange.request_id)
        fresh = False
        exchange.enqueued_at = time.monotonic()
        while True:
            try:
                lease = await scheduler.acquire(deadline, front=exchange.attempts > 0)
            except ProxyError as err:
                if not err.waited:
                    exchange.enqueued_at = None  # refused at the door: it never waited
                raise
            try:
                replica = lease.replica
                exchange.dispatched_at = time.monotonic()
                exchange.replica = replica.name
                exchange.stage = "waiting_first_byte"
                exchange.attempts += 1
                try:
                    upstream = await upstreams.send(replica, request, body, headers, fresh=fresh)
                except NotDelivered as err:
                    metrics.upstream_error(replica.name, err.kind)
                    if err.replica_down:
                        self._mark_down(scheduler, replica, str(err))
                    if exchange.attempts > retries:
                        raise UpstreamError(
                            f"no replica could be reached after {exchange.attempts} attempts: "
                            f"{err}",
                            kind=err.kind,
                            replica=replica.name,
                        ) from err
                    metrics.retries.labels(replica.name).inc()
                    fresh = True
                    exchange.stage = "queued"
                    continue
                except UpstreamError as err:
                    metrics.upstream_error(replica.name, err.kind)
                    raise
                return await self._relay(request, upstream, exchange, lease)
            finally:
                lease.release()

    async def _relay(
        self,
        request: web.Request,
        upstream: Response,
        exchange: Exchange,
        lease: Lease,
    ) -> web.StreamResponse:
        metrics = self.app[METRICS]
        replica = lease.replica.name
        exchange.status = upstream.status
        # Counted now, before the body: a caller that hangs up cannot make it go missing.
        metrics.answered(replica, exchange.route, upstream.status)
        completed = False
        lifecycle = self.app[LIFECYCLE]
        try:
            response = await pipe(
                request, upstream, exchange,
                is_cut=lambda: lifecycle.cutting,
                on_gap=metrics.inter_chunk_observer(exchange.route),
                stall_limit_s=self.config.upstream.read_timeout_s,
            )
            completed = exchange.stage == "done"
            if exchange.upstream_error is not None:
                metrics.upstream_error(replica, exchange.upstream_error)
                exchange.outcome = f"upstream_error:{exchange.upstream_error}"
            if exchange.client_gone:
                exchange.outcome = "client_disconnect"
            return response
        finally:
            if completed:
                upstream.release()  # back to the pool for the next request
            else:
                # Caller gone or replica failed: drop the connection, so the engine sees its
                # client leave and aborts the generation.
                upstream.close()

    @staticmethod
    def _mark_down(scheduler: Scheduler, replica: Replica, why: str) -> None:
        if replica.healthy:
            log.warning("replica %s marked unhealthy: %s", replica.name, why)
        scheduler.set_healthy(replica, False)


def create_app(
    config: Config, *, metrics: Metrics | None = None, access_log: AccessLog | None = None
) -> web.Application:
    """The proxy application. Background work starts and stops with it (``cleanup_ctx``).

    ``access_log`` is owned by the caller (it outlives the app's connections).
    """
    app = web.Application(client_max_size=config.server.max_body_bytes)
    replicas = [
        Replica(r.name, r.url or "", r.max_concurrency, index=i)
        for i, r in enumerate(config.replicas)
    ]
    scheduler = Scheduler(replicas, config.queue.max_size)
    app[CONFIG] = config
    app[SCHEDULER] = scheduler
    app[METRICS] = metrics if metrics is not None else Metrics()
    app[METRICS].watch(scheduler)
    app[LIFECYCLE] = Lifecycle()

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        app[UPSTREAMS] = Upstreams(scheduler.replicas, config.upstream)
        app[HEALTH] = HealthChecker(scheduler, config.health, config.upstream)
        app[HEALTH].start()
        try:
            yield
        finally:
            await app[HEALTH].close()
            await app[UPSTREAMS].close()

    app.cleanup_ctx.append(upstream_ctx)

    handlers = Handlers(app, access_log)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_route("*", "/{tail:.*}", handlers.proxy)
    return app

