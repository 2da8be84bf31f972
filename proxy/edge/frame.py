"""The frame around every relayed request: draining, the one error -> status mapping, and the
bookkeeping every observer sees, whatever path the request took."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from functools import cached_property

import aiohttp
from aiohttp import web
from multidict import istr

from proxy.control.drain import Lifecycle
from proxy.control.health import HealthChecker
from proxy.core.errors import (
    UNDELIVERED_REASONS,
    Draining,
    InternalError,
    ProxyError,
    Unauthorized,
    UpstreamError,
    error_body,
)
from proxy.edge.auth import AUTH
from proxy.edge.headers import QUEUE_MS_HEADER, with_origin_form
from proxy.edge.keys import HEALTH, LIFECYCLE, METRICS
from proxy.edge.route import ROUTING, Routing
from proxy.observe.accesslog import AccessLog
from proxy.observe.exchange import Exchange, Outcome
from proxy.observe.metrics import Metrics, route_label

log = logging.getLogger("batchgate")

#: A caller's X-Request-Id is kept only if it matches this (else a new one is generated).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_REQUEST_ID_KEY = istr("X-Request-Id")  # folded once: a plain str is folded per lookup

Work = Callable[[web.Request, Exchange], Awaitable[web.StreamResponse]]


#: Seeded from the OS once and private: code that seeds the global ``random`` (a test
#: framework, a library) must not make request ids repeat.
_IDS = random.Random()


def new_request_id() -> str:
    # 128 random bits as hex, like a uuid4 but without a getrandom syscall per request:
    # unique enough to correlate logs, never used as a secret.
    return f"{_IDS.getrandbits(128):032x}"


#: On batchgate's own answer to a request that never reached an engine; its value is the
#: reason (``queue_full``, ``queue_timeout``, ``no_healthy_replica``, ``draining``). A
#: batchgate in front resends such a request elsewhere (proxy.edge.forward).
REJECTED_HEADER = "X-Batchgate-Rejected"


def mark_rejected(headers: MutableMapping[str, str], reason: str) -> None:
    """Say on an answer that its request never reached an engine (the one place that does)."""
    headers[REJECTED_HEADER] = reason


def json_error(
    err: ProxyError, request_id: str | None = None, *, undelivered: bool = False
) -> web.Response:
    """The OpenAI-style answer for ``err``. ``undelivered``: the request certainly never
    reached an engine, so one of :data:`UNDELIVERED_REASONS` is marked as such."""
    headers: dict[str, str] = {}
    if undelivered and err.reason in UNDELIVERED_REASONS:
        mark_rejected(headers, err.reason)
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(err.retry_after_s)
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    if isinstance(err, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"  # RFC 6750 3: the scheme a caller must use
    return web.Response(
        status=err.status,
        body=json.dumps(error_body(err)).encode(),
        content_type="application/json",
        headers=headers,
    )


def end_with(exchange: Exchange, err: ProxyError) -> None:
    """The outcome ``err`` gives an exchange: what metrics and the access log record."""
    if isinstance(err, UpstreamError):
        exchange.end(Outcome.UPSTREAM_ERROR, err.kind)
    else:
        exchange.end(Outcome.REJECTED, err.reason or err.type)


class Frame:
    """Runs one request's work inside the frame; owned by the app (typed state, no globals)."""

    def __init__(self, app: web.Application, access_log: AccessLog | None) -> None:
        self.app = app
        self.access_log = access_log
        self.auth = app[AUTH]
        if access_log is not None:
            access_log.on_drop(app[METRICS].access_log_dropped.inc)
        self._loop: asyncio.AbstractEventLoop | None = None
        app.on_startup.append(self._bind_loop)

    async def _bind_loop(self, _app: web.Application) -> None:
        # The loop serving the app, once: on Python 3.11 every asyncio.get_running_loop()
        # (and current_task() without a loop) makes a getpid(2) system call.
        self._loop = asyncio.get_running_loop()

    # The app's shared objects, looked up once (as the Forwarder does): each ``app[KEY]`` is
    # a Python call, four per request here. Lazily, as some are set after the Frame is made.
    @cached_property
    def lifecycle(self) -> Lifecycle:
        return self.app[LIFECYCLE]

    @cached_property
    def metrics(self) -> Metrics:
        return self.app[METRICS]

    @cached_property
    def routing(self) -> Routing:
        return self.app[ROUTING]

    @cached_property
    def health(self) -> HealthChecker:
        return self.app[HEALTH]

    async def serve(self, request: web.Request, work: Work) -> web.StreamResponse:
        """The frame around every relayed request: draining, error mapping, bookkeeping."""
        lifecycle = self.lifecycle
        loop = self._loop
        assert loop is not None, "bound when the app starts"
        request = with_origin_form(request)
        request_id = request.headers.get(_REQUEST_ID_KEY)
        if request_id is None or not _REQUEST_ID.fullmatch(request_id):
            # A caller's id goes into logs, headers and the replica's logs: only a plain
            # token, so it can neither forge log fields nor carry bytes that break a writer.
            request_id = new_request_id()
        path = request.path
        exchange = Exchange.begin(request_id, request.method, path, route_label(path),
                                  loop.time(), time.monotonic(), request.remote)
        task = lifecycle.enter(loop)
        try:
            if self.auth.enabled:
                # Before anything else: a caller without a key learns nothing, not even
                # that the proxy is draining, and its body is never read.
                key = self.auth.identify(request.headers)
                if key is not None:
                    exchange.tenant, exchange.key_class = key.name, key.klass
            if lifecycle.refusing:
                raise Draining("batchgate is shutting down", retry_after_s=1)
            response = await work(request, exchange)
            if not exchange.bytes_out and isinstance(response, web.Response):
                # Answers built whole (/v1/models, a relayed 4xx); the relay counts the rest.
                exchange.bytes_out = response.content_length or 0
            if lifecycle.draining and not response.prepared:
                # Its head is still to go out: Connection: close, and the connection closes
                # after it (the relay does the same for the answers it sends itself).
                response.force_close()
            return response
        except ProxyError as err:
            exchange.status = err.status
            end_with(exchange, err)
            # "queued": never sent anywhere, or only to replicas that never got it (a
            # refused connection, a rejection); a request that may have reached one is not.
            answer = json_error(err, request_id, undelivered=exchange.stage == "queued")
            if exchange.queue_ms is not None:
                answer.headers[QUEUE_MS_HEADER] = str(exchange.queue_ms)
            if lifecycle.draining:
                answer.force_close()
            exchange.bytes_out = answer.content_length or 0
            return answer
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            # The caller's transport closed under a write outside the relay loop.
            exchange.end(Outcome.CLIENT_DISCONNECT)
            raise
        except Exception as err:  # a bug of ours: answer like an API, and say it in the log
            log.exception("request %s failed inside batchgate", request_id)
            exchange.status = 500
            exchange.end(Outcome.INTERNAL_ERROR)
            if exchange.prepared:
                raise
            return json_error(InternalError(f"batchgate failed: {type(err).__name__}"),
                              request_id)
        except asyncio.CancelledError:
            if exchange.cut_reason is not None:
                # A stream of a wedged replica, cut by the health checker: it got its SSE
                # error event; the replica's failure, not the caller's hang-up.
                exchange.end(Outcome.UPSTREAM_ERROR, "timeout")
                raise
            if not lifecycle.cutting:
                # aiohttp cancels a handler when its caller disconnects.
                exchange.end(Outcome.CLIENT_DISCONNECT)
                raise
            if exchange.prepared:
                # The stream got its SSE error event; the connection just closes.
                exchange.end(Outcome.DRAIN_CUT)
                raise
            exchange.end(Outcome.REJECTED, Draining.reason)
            exchange.status = Draining.status
            answer = json_error(
                Draining("batchgate is shutting down; request cut at the drain deadline",
                         retry_after_s=1),
                request_id, undelivered=exchange.stage == "queued",
            )
            answer.force_close()
            return answer
        finally:
            # Drain accounting first: nothing an observer does may make shutdown wait.
            lifecycle.leave(task)
            exchange.bytes_in = request.content.total_bytes
            # Synchronous, so no cancellation can skip it: a caller that closes its
            # connection the instant its answer is complete still gets counted.
            self._observe(exchange)

    def _observe(self, exchange: Exchange) -> None:
        """Usage, metrics, access log: each guarded on its own, so one bug skips no other."""
        metrics = self.metrics
        if exchange.usage is not None:
            try:
                usage = exchange.usage.usage()
            except Exception:
                self._observer_failed(metrics, "usage", exchange)
            else:
                if usage is not None:
                    exchange.prompt_tokens = usage.prompt_tokens
                    exchange.completion_tokens = usage.completion_tokens
        if exchange.prompt_chars is not None:
            try:  # the chars-per-token ratio of token costs learns from the usage reported
                self.routing.learn(exchange)
            except Exception:
                self._observer_failed(metrics, "usage", exchange)
        try:
            metrics.record(exchange)
        except Exception:
            self._observer_failed(metrics, "metrics", exchange)
        if exchange.replica is not None:
            # Passive outlier ejection: each real request's result, as it ends.
            try:
                self.health.observe(exchange)
            except Exception:
                self._observer_failed(metrics, "health", exchange)
        if self.access_log is not None:
            try:
                self.access_log.record(exchange)
            except Exception:
                self._observer_failed(metrics, "access_log", exchange)

    @staticmethod
    def _observer_failed(metrics: Metrics, where: str, exchange: Exchange) -> None:
        log.exception("observer %s failed for request %s", where, exchange.request_id)
        metrics.internal_error(where)
