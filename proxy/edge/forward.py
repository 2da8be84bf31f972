"""The forward loop: wait for a slot, send to the replica, resend what never arrived, relay."""

from __future__ import annotations

import logging
import time
from functools import cached_property

import aiohttp
from aiohttp import web
from multidict import istr

from proxy.config import Config, LiveConfig
from proxy.control.drain import Lifecycle
from proxy.control.health import HealthChecker
from proxy.core.errors import BadRequest, BodyTooLarge, ProxyError, UpstreamError
from proxy.core.load import IN_FLIGHT_HEADER, parse_headers
from proxy.core.replicas import Replica
from proxy.core.retry import REJECTED_KIND, Decision, classify, is_idempotent
from proxy.core.scheduler import Scheduler
from proxy.edge.frame import REJECTED_HEADER
from proxy.edge.headers import upstream_request_headers
from proxy.edge.heartbeat import Heartbeat
from proxy.edge.keys import CONFIG, HEALTH, LIFECYCLE, METRICS, SCHEDULER, UPSTREAMS
from proxy.edge.relay import is_event_stream, pipe
from proxy.edge.route import ROUTING
from proxy.observe.exchange import Exchange, Outcome
from proxy.observe.metrics import Metrics
from proxy.upstream.client import Upstreams
from proxy.upstream.connection import Response

log = logging.getLogger("batchgate")

#: A rejection's body is a small JSON error: read whole (so its connection can be reused)
#: only up to this; anything larger is not what a batchgate sends, and its connection closes.
REJECTION_BODY_LIMIT = 64 * 1024

#: The caller's own deadline for a slot, in whole milliseconds: shortens ``queue.timeout_s``
#: (never lengthens it), and early refusal judges against it.
DEADLINE_HEADER = "X-Batchgate-Deadline-Ms"
# Folded once (istr): a plain str name is folded again on every lookup.
_DEADLINE_KEY, _IN_FLIGHT_KEY, _REJECTED_KEY = (
    istr(DEADLINE_HEADER), istr(IN_FLIGHT_HEADER), istr(REJECTED_HEADER))


def deadline_s(request: web.BaseRequest, timeout_s: float) -> float:
    """The request's longest wait for a slot: ``queue.timeout_s``, or the caller's shorter
    ``X-Batchgate-Deadline-Ms``. A value that is not a positive integer is a 400."""
    raw = request.headers.get(_DEADLINE_KEY)
    if raw is None:
        return timeout_s
    # At most 10 digits (about 115 days): int() of a huge string is slow, and no deadline
    # that long means anything next to queue.timeout_s.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or int(raw) == 0:
        raise BadRequest(
            f"{DEADLINE_HEADER} must be a positive integer of milliseconds, got {raw[:32]!r}"
        )
    return min(timeout_s, int(raw) / 1000)


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
    except (aiohttp.ClientPayloadError, web.RequestPayloadError, ValueError) as err:
        raise BadRequest(f"could not read the request body: {err}") from err


class Forwarder:
    """The work inside the frame for proxied requests, those that take a generation slot."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.routing = app[ROUTING]

    # The app's shared objects, looked up once (an Application lookup per use cost 3 k
    # instructions per request): each is made before the first request and never replaced;
    # a reload swaps what LiveConfig holds, not the LiveConfig.
    @cached_property
    def _scheduler(self) -> Scheduler:
        return self.app[SCHEDULER]

    @cached_property
    def _upstreams(self) -> Upstreams:
        return self.app[UPSTREAMS]

    @cached_property
    def _metrics(self) -> Metrics:
        return self.app[METRICS]

    @cached_property
    def _lifecycle(self) -> Lifecycle:
        return self.app[LIFECYCLE]

    @cached_property
    def _health(self) -> HealthChecker:
        return self.app[HEALTH]

    @cached_property
    def _live(self) -> LiveConfig:
        return self.app[CONFIG]

    @property
    def config(self) -> Config:
        return self._live.current  # swapped by a reload: read it per request

    async def proxied(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        config = self._live.current  # self.config, without a property call per read
        wait_s = deadline_s(request, config.queue.timeout_s)  # a bad header: 400, body unread
        # Class and tenant from the head (a bad header: 400, body unread); model and token
        # cost from the body, parsed only when configured (proxy.edge.route).
        routing = self.routing
        klass, exchange.klass = routing.klass(request, exchange.key_class)
        tenant = routing.tenant(request, exchange)
        body = await _read_body(request, config.server.max_body_bytes)
        model, cost, stream = routing.route(body, exchange)
        heartbeat_s = config.queue.sse_heartbeat_s
        if heartbeat_s > 0 and stream:
            lifecycle = self._lifecycle
            beat = Heartbeat(request, exchange, self._scheduler, heartbeat_s,
                             draining=lambda: lifecycle.draining,
                             cutting=lambda: lifecycle.cutting)
            return await beat.guard(self.forward(request, body, exchange, wait_s, model, klass,
                                                 tenant, cost, beat))
        return await self.forward(request, body, exchange, wait_s, model, klass, tenant, cost)

    async def forward(
        self, request: web.Request, body: bytes, exchange: Exchange, wait_s: float,
        model: str | None = None, klass: int = 0, tenant: str = "", cost: int = 0,
        beat: Heartbeat | None = None,
    ) -> web.StreamResponse:
        scheduler = self._scheduler
        upstreams = self._upstreams
        metrics = self._metrics
        retries = self._live.current.upstream.retries
        # Counted from joining the queue, on the scheduler's clock (which decides deadlines):
        # the body upload before it is the caller's time, not the queue's. A resend keeps it.
        joined = scheduler.now()
        deadline = joined + wait_s
        waited = 0.0  # seconds spent waiting for a slot, over every attempt
        # Built once a slot is leased, not while waiting: a queued request holds no copy of
        # its headers (~0.8 KiB each, of 16.6 KiB per queued request in P5).
        headers: list[tuple[str, str]] | None = None
        fresh = False
        avoid: Replica | None = None
        exchange.enqueued_at = time.monotonic()
        while True:
            asked = joined if exchange.attempts == 0 else scheduler.now()
            try:
                lease = await scheduler.acquire(
                    deadline, size=len(body), front=exchange.attempts > 0, avoid=avoid,
                    model=model, klass=klass, tenant=tenant, cost=cost,
                    on_queued=beat.queued if beat is not None else None,
                )
            except ProxyError as err:
                exchange.queue_ms = _ms(waited + scheduler.now() - asked)
                if not err.waited:
                    exchange.enqueued_at = None  # refused at the door: it never waited
                raise
            waited += scheduler.now() - asked
            exchange.queue_ms = _ms(waited)
            try:
                if beat is not None:
                    await beat.granted()  # inside the try: the slot is released on any path
                replica = lease.replica
                exchange.dispatched_at = time.monotonic()
                exchange.replica = replica.name
                exchange.stage = "waiting_first_byte"
                exchange.attempts += 1
                if headers is None:
                    headers = upstream_request_headers(request, exchange.request_id)
                try:
                    upstream = await upstreams.send(replica, request, body, headers, fresh=fresh)
                except UpstreamError as err:
                    metrics.upstream_error(replica.name, err.kind)
                    decision = classify(
                        err, idempotent=is_idempotent(request.method, request.headers))
                    if decision is Decision.FAIL:
                        raise
                    if decision is Decision.MARK_DOWN_AND_RESEND:
                        self._mark_down(scheduler, replica, str(err))
                    if exchange.attempts > retries:
                        raise UpstreamError(
                            f"no replica answered after {exchange.attempts} attempts: {err}",
                            kind=err.kind,
                            replica=replica.name,
                        ) from err
                    metrics.retries.labels(replica.name).inc()
                    fresh = True
                    exchange.stage = "queued"
                    continue
                answer = upstream.headers
                if _IN_FLIGHT_KEY in answer:
                    # The replica is a batchgate reporting its load: the freshest reading.
                    reading = parse_headers(answer)
                    if reading is not None:
                        scheduler.load.record(replica, reading)
                if _REJECTED_KEY in answer:
                    # The replica is a batchgate that refused it before its engine saw it:
                    # never delivered, so it goes back to the head of the queue, for another
                    # replica if one has room (proxy.core.retry: "rejected").
                    metrics.upstream_error(replica.name, REJECTED_KIND)
                    scheduler.load.seen(replica.name)  # a batchgate: poll its /load
                    if exchange.attempts <= retries:
                        await _discard(upstream)
                        metrics.retries.labels(replica.name).inc()
                        avoid = replica
                        exchange.stage = "queued"
                        continue
                    # Out of resends: its answer is relayed as is (status, Retry-After, the
                    # header itself, so a tier in front may resend it too), and says nothing
                    # against the replica (no outlier ejection: it is full, not failing).
                    response = await self.relay(request, upstream, exchange, replica, beat)
                    if exchange.outcome is Outcome.OK:
                        exchange.end(Outcome.UPSTREAM_ERROR, REJECTED_KIND)
                    return response
                return await self.relay(request, upstream, exchange, replica, beat)
            finally:
                lease.release()

    async def relay(
        self,
        request: web.Request,
        upstream: Response,
        exchange: Exchange,
        replica: Replica,
        beat: Heartbeat | None = None,
    ) -> web.StreamResponse:
        """Relay the answer; shared with the slot-free path (proxy.edge.light). With ``beat``
        open (its headers sent while the request waited), into that stream."""
        metrics = self._metrics
        name = replica.name
        config = self._live.current
        if config.server.load_headers:
            # Our own load, as of now, replaces any a batchgate behind us sent (its reading
            # was recorded already; the caller is told about this tier).
            headers = upstream.headers
            for key, value in self._scheduler.reading().headers().items():
                headers[key] = value
        exchange.status = upstream.status
        exchange.stream = is_event_stream(upstream.headers)
        # Counted now, before the body: a caller that hangs up cannot make it go missing.
        metrics.answered(name, exchange.route, upstream.status, exchange.tenant)
        opened = beat.response if beat is not None else None
        if opened is not None and beat is not None and not beat.takes(upstream):
            try:
                return await beat.refused(upstream)  # the replica's error, as an SSE event
            finally:
                if exchange.stage == "done":
                    upstream.release()
                else:
                    upstream.close()
        completed = False
        lifecycle = self._lifecycle
        # Event streams are watched for a wedged engine (proxy.control.stall), which cuts
        # them by cancelling this task; nothing is done per chunk.
        stalls = self._health.stalls if exchange.stream else None
        stream = stalls.enter(replica, exchange) if stalls is not None else None
        try:
            response = await pipe(
                request, upstream, exchange,
                lifecycle=lifecycle,
                # Gaps are observed between an event stream's chunks only: no label lookup
                # for any other answer.
                on_gap=metrics.inter_chunk_observer(exchange.route) if exchange.stream
                else _no_gap,
                stall_limit_s=config.server.send_timeout_s,
                opened=opened,
            )
            completed = exchange.stage == "done"
            if exchange.upstream_error is not None:
                metrics.upstream_error(name, exchange.upstream_error)
                exchange.end(Outcome.UPSTREAM_ERROR, exchange.upstream_error)
            if exchange.client_gone:
                exchange.end(Outcome.CLIENT_DISCONNECT)
            return response
        except UpstreamError as err:
            # Failed before its first body byte: nothing was sent, the frame answers 502/504.
            metrics.upstream_error(name, err.kind)
            raise
        finally:
            if stream is not None and stalls is not None:
                stalls.leave(stream)
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


def _no_gap(_seconds: float) -> None:
    pass


def _ms(seconds: float) -> int:
    # Whole milliseconds, rounded down: a request served at once says 0, never 1.
    return max(0, int(seconds * 1000))


async def _discard(upstream: Response) -> None:
    """Read a rejection's small body to its end, so its connection can be reused; close it
    instead if it is large or fails (it is never relayed: the request goes elsewhere)."""
    read = 0
    try:
        while not upstream.complete and read <= REJECTION_BODY_LIMIT:
            chunk = await upstream.readany()
            if not chunk:
                break
            read += len(chunk)
    except (UpstreamError, OSError):
        upstream.close()
        return
    if upstream.complete:
        upstream.release()  # a draining sidecar says Connection: close: the pool closes it
    else:
        upstream.close()
