"""Every Prometheus series batchgate exports, defined once.

The registry is injected (one per application), so tests and several apps in one process never
share counters. State that the scheduler already holds (queue depth, slots in use, health) is
read at scrape time by a collector rather than mirrored into gauges on the hot path: a scrape
can never disagree with the scheduler, and a request pays nothing for it.
"""

from __future__ import annotations

import contextlib
import time
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.values import MutexValue

from proxy import __version__
from proxy.config import NO_TENANT
from proxy.core.replicas import HEALTH_STATES
from proxy.core.scheduler import Scheduler
from proxy.observe.exchange import ExchangeView, Outcome

_M = TypeVar("_M", Counter, Histogram)

#: The `route` label: the OpenAI routes by name, everything else as "other" (bounded labels).
KNOWN_ROUTES = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models"}
)

#: Every ``reason`` of ``batchgate_rejected_requests_total`` (the ``reason`` of each
#: :class:`~proxy.core.errors.ProxyError`; a test checks none is missing). Exported at 0 from
#: startup, so ``increase()`` and alerts see the first one. Add a new reason here.
REJECTION_REASONS: tuple[str, ...] = (
    "queue_full", "queue_timeout", "deadline_unreachable", "no_healthy_replica", "draining",
    "overloaded", "model_not_found", "request_too_large",
    "body_too_large", "bad_request", "unauthorized",
    # Limits on callers (proxy.edge.limits): timeouts, connection count, head size, Host, method.
    "header_timeout", "body_timeout", "too_many_connections", "headers_too_large", "bad_host",
    "method_not_allowed",
)
#: Every ``kind`` of ``batchgate_upstream_errors_total``, exported at 0 for every replica.
UPSTREAM_ERROR_KINDS: tuple[str, ...] = ("connect", "timeout", "reset", "status_5xx",
                                          "rejected")
#: Every ``stage`` of ``batchgate_client_disconnects_total``.
DISCONNECT_STAGES: tuple[str, ...] = ("queued", "waiting_first_byte", "streaming")

#: Buckets sized for LLM work, where one request can take minutes (base unit: seconds).
QUEUE_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                      10.0, 30.0, 60.0, 120.0, 300.0)
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0,
                60.0, 120.0)
INTER_CHUNK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25,
                       0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
                    120.0, 300.0, 600.0, 1200.0, 1800.0)


#: The `where` label of `batchgate_internal_errors_total`: the observers, each guarded alone
#: (``health``: the outcome feed of passive outlier ejection; ``discovery``: a lookup loop;
#: ``adaptive``: an adaptive cap's loop).
INTERNAL_ERROR_SITES = ("usage", "metrics", "access_log", "health", "discovery", "adaptive")
#: The `result` label of `batchgate_config_reloads_total`.
RELOAD_RESULTS = ("success", "failure")


#: ``Outcome.X`` goes through EnumType.__getattr__'s slot (~200 ns, ten times a global): the
#: members record() compares with, read once.
_OK, _REJECTED, _CLIENT_DISCONNECT = Outcome.OK, Outcome.REJECTED, Outcome.CLIENT_DISCONNECT


def route_label(path: str) -> str:
    return path if path in KNOWN_ROUTES else "other"


#: At most this many values of the ``model`` label of ``batchgate_queue_depth`` (the models
#: replicas serve, configured or read by ``models: auto``); waiters for any other: "other".
MAX_MODEL_LABELS = 64
#: The ``model`` label of waiters for a model no replica names (yet), or past the cap.
OTHER_MODEL = "other"


class SchedulerCollector(Collector):
    """Queue and slot gauges, read from the scheduler when Prometheus scrapes.

    ``classes``: the names of the priority classes, highest first (``scheduling.classes``;
    fixed for the process): each has a ``batchgate_queue_depth`` series from startup.
    """

    def __init__(self, scheduler: Scheduler, classes: tuple[str, ...] = ("",)) -> None:
        self._scheduler = scheduler
        self._classes = classes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._scheduler
        depth = GaugeMetricFamily(
            "batchgate_queue_depth",
            "Requests waiting for a slot, by class and model (model \"\" when model-blind); "
            "sum without (class, model) for the whole queue.",
            labels=["class", "model"],
        )
        for (klass, model), count in queue_depths(s.depths(), self._classes, s.models()):
            depth.add_metric([klass, model], count)
        yield depth
        yield GaugeMetricFamily(
            "batchgate_queue_capacity", "Most requests that may wait (queue.max_size).",
            value=s.max_queue,
        )
        in_flight = GaugeMetricFamily(
            "batchgate_replica_in_flight", "Requests in flight on the replica.", labels=["replica"]
        )
        capacity = GaugeMetricFamily(
            "batchgate_replica_max_concurrency",
            "Concurrency cap of the replica: max_concurrency, or where adaptive moved it.",
            labels=["replica"],
        )
        healthy = GaugeMetricFamily(
            "batchgate_replica_healthy", "1 if the replica takes requests, else 0.",
            labels=["replica"],
        )
        state = GaugeMetricFamily(
            "batchgate_replica_state",
            "1 for the replica's health state (healthy, unhealthy, ejected), 0 for the others.",
            labels=["replica", "state"],
        )
        for r in s.replicas:
            in_flight.add_metric([r.name], r.in_flight)
            capacity.add_metric([r.name], r.max_concurrency)
            healthy.add_metric([r.name], 1 if r.healthy else 0)
            for name in HEALTH_STATES:
                state.add_metric([r.name, name], 1 if r.health == name else 0)
        yield in_flight
        yield capacity
        yield healthy
        yield state


def queue_depths(
    depths: Mapping[tuple[int, str | None], int], classes: tuple[str, ...], served: list[str]
) -> list[tuple[tuple[str, str], int]]:
    """The depth series: every class with model "" (0 when none wait), then each (class,
    model) with waiters, a model outside the first :data:`MAX_MODEL_LABELS` served as
    :data:`OTHER_MODEL` (a request may name any model while a list is being read)."""
    named = set(served[:MAX_MODEL_LABELS])
    out: dict[tuple[str, str], int] = {(name, ""): 0 for name in classes}
    for (rank, model), count in depths.items():
        klass = classes[rank] if rank < len(classes) else str(rank)
        label = "" if model is None else model if model in named else OTHER_MODEL
        out[klass, label] = out.get((klass, label), 0) + count
    return list(out.items())


def _fast_inc(child: Counter) -> Callable[[float], None]:
    """``child.inc`` for the request path: the same value and the same refusal of a negative
    amount, without what else ``inc`` checks on every call (that the child has its labels, an
    exemplar) and without its lock (the event loop's thread is the only writer; a scrape reads
    the float under the lock, and a float store is never seen half done). Any other value
    class than prometheus_client's plain one (its multiprocess mode): ``child.inc`` itself."""
    value = getattr(child, "_value", None)
    if type(value) is not MutexValue:
        return child.inc

    def inc(amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        value._value += amount

    return inc


def _fast_observe(child: Histogram) -> Callable[[float], None]:
    """``child.observe`` for the request path, as :func:`_fast_inc`: the bucket found by one
    bisection (prometheus_client walks the buckets in Python), the same sum and counts."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if (type(total) is not MutexValue or not isinstance(bounds, list)
            or not isinstance(buckets, list) or len(bounds) != len(buckets)
            or not all(type(b) is MutexValue for b in buckets)):
        return child.observe
    values: list[MutexValue] = buckets

    def observe(amount: float) -> None:
        total._value += amount
        if amount == amount:  # NaN is in no bucket (its sum is NaN), as prometheus_client does
            values[bisect_left(bounds, amount)]._value += 1  # the first bound >= amount

    return observe


class _Children(Generic[_M]):
    """Label children kept in a plain dict.

    ``labels()`` validates, takes a lock and builds a key on every call; the request path
    asks for half a dozen children per request, always from the same bounded label sets.
    :meth:`fast` goes further: each child's ``inc`` or ``observe`` as one plain function
    (:func:`_fast_inc`, :func:`_fast_observe`), by whatever key the caller has at hand; the
    hottest callers read :attr:`updates` first (a dict lookup, no method call):
    ``(children.updates.get(key) or children.fast(key, *values))(amount)``.
    """

    __slots__ = ("_cache", "_keys", "_metric", "updates")

    def __init__(self, metric: _M) -> None:
        self._metric: _M = metric
        self._cache: dict[tuple[str, ...], _M] = {}
        #: key -> the update function of :meth:`fast`; ``_keys``: key -> its label values.
        self.updates: dict[Hashable, Callable[[float], None]] = {}
        self._keys: dict[Hashable, tuple[str, ...]] = {}

    def __call__(self, *values: str) -> _M:
        child = self._cache.get(values)
        if child is None:
            child = self._cache[values] = self._metric.labels(*values)
        return child

    def fast(self, key: Hashable, *values: str) -> Callable[[float], None]:
        """The ``inc`` (counter) or ``observe`` (histogram) of the child of ``values``, cached
        by ``key`` (one per label set, any hashable: a tuple needs no str() per request)."""
        update = self.updates.get(key)
        if update is None:
            child = self(*values)
            update = (_fast_observe(child) if isinstance(child, Histogram)
                      else _fast_inc(child))
            self.updates[key] = update
            self._keys[key] = values
        return update

    def remove_first(self, value: str) -> None:
        """Remove every child whose first label value is ``value``."""
        for key in [k for k, values in self._keys.items() if values[0] == value]:
            del self.updates[key], self._keys[key]
        for values in [v for v in self._cache if v[0] == value]:
            del self._cache[values]
            with contextlib.suppress(KeyError):
                self._metric.remove(*values)


class Metrics:
    """The counters the request path increments, plus the scheduler's gauges."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "batchgate_requests",
            "Requests answered by a replica, by the replica's status code and the caller's "
            "tenant (the name of its API key; \"none\" without auth).",
            ["replica", "route", "code", "tenant"], registry=r,
        )
        self.rejected = Counter(
            "batchgate_rejected_requests",
            "Requests batchgate answered itself without a replica, by reason.",
            ["reason"], registry=r,
        )
        self.upstream_errors = Counter(
            "batchgate_upstream_errors",
            "Failures talking to a replica, by kind (connect, timeout, reset, status_5xx, "
            "rejected: a batchgate replica refused it before its engine saw it).",
            ["replica", "kind"], registry=r,
        )
        self.client_disconnects = Counter(
            "batchgate_client_disconnects",
            "Callers that hung up before their answer was complete, by stage.",
            ["stage"], registry=r,
        )
        self.retries = Counter(
            "batchgate_upstream_retries",
            "Requests sent again because they never reached a replica.",
            ["replica"], registry=r,
        )
        self.tokens = Counter(
            "batchgate_tokens",
            "Tokens reported by replicas in `usage` (prompt, completion); the last usage of a "
            "stream counts, never the sum.",
            ["replica", "kind"], registry=r,
        )
        self.queue_wait = Histogram(
            "batchgate_queue_wait_seconds",
            "Time from joining the queue to getting a slot (or giving up waiting), by the "
            "request's scheduling class.",
            ["class"], buckets=QUEUE_WAIT_BUCKETS, registry=r,
        )
        self.ttfb = Histogram(
            "batchgate_time_to_first_byte_seconds",
            "Time from dispatch to a replica to the first body byte; stream=\"true\" (the "
            "answer is an event stream) is time to first token, stream=\"false\" the whole "
            "generation.",
            ["route", "stream"], buckets=TTFB_BUCKETS, registry=r,
        )
        self.inter_chunk = Histogram(
            "batchgate_inter_chunk_seconds",
            "Gap between successive chunks of an event stream (inter-token latency).",
            ["route"], buckets=INTER_CHUNK_BUCKETS, registry=r,
        )
        self.duration = Histogram(
            "batchgate_request_duration_seconds",
            "Time from arrival to the last byte of an answer a replica completed.",
            ["route"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.internal_errors = Counter(
            "batchgate_internal_errors",
            "Failures inside batchgate's own observers (the request was still answered), by "
            "where they happened.",
            ["where"], registry=r,
        )
        self.ejections = Counter(
            "batchgate_replica_ejections",
            "Passive outlier ejections of the replica (upstream.eject_after real requests in a "
            "row failed).",
            ["replica"], registry=r,
        )
        self.access_log_dropped = Counter(
            "batchgate_access_log_dropped",
            "Access-log lines dropped: the log's queue was full (stdout slower than the "
            "traffic), or a line could not be formatted.",
            registry=r,
        )
        for where in INTERNAL_ERROR_SITES:
            self.internal_errors.labels(where)  # exported at 0 from startup
        # Named as Prometheus names its own (prometheus_config_last_reload_*).
        self.reloads = Counter(
            "batchgate_config_reloads",
            "Config reloads (SIGHUP, POST /admin/reload), by result (success, failure).",
            ["result"], registry=r,
        )
        for result in RELOAD_RESULTS:
            self.reloads.labels(result)
        self.discovery_errors = Counter(
            "batchgate_discovery_errors",
            "Failed DNS lookups of a discovery entry (timeout, SERVFAIL, refused), by its dns "
            "name; the replicas found before stay. NXDOMAIN or no record is an answer (no "
            "replica), not an error.",
            ["dns"], registry=r,
        )
        self.last_reload = Gauge(
            "batchgate_config_last_reload_success_timestamp_seconds",
            "Unix time the config in force was loaded (at startup, then each successful "
            "reload).",
            registry=r,
        )
        # Adaptive caps (proxy.control.adaptive): only for replicas with `adaptive`, from the
        # moment their loop starts, at 0.
        self.engine_waiting = Gauge(
            "batchgate_replica_engine_waiting",
            "Requests queued inside the replica's engine, as its /metrics last said (replicas "
            "with adaptive only; 0 until the first reading, kept while readings fail).",
            ["replica"], registry=r,
        )
        self.adaptive_scrape_errors = Counter(
            "batchgate_adaptive_scrape_errors",
            "Failed reads of an adaptive replica's /metrics (refused, timeout, not 200, not "
            "Prometheus text, no known series); its cap stays where it was.",
            ["replica"], registry=r,
        )
        # process_* (CPU, resident memory, open and max file descriptors, start time): not in
        # a custom registry unless registered there.
        ProcessCollector(registry=r)
        build = Gauge("batchgate_build_info", "batchgate version.", ["version"], registry=r)
        build.labels(__version__).set(1)
        self._requests = _Children(self.requests)
        self._rejected = _Children(self.rejected)
        self._client_disconnects = _Children(self.client_disconnects)
        self._upstream_errors = _Children(self.upstream_errors)
        self._tokens = _Children(self.tokens)
        self._ttfb = _Children(self.ttfb)
        self._inter_chunk = _Children(self.inter_chunk)
        self._duration = _Children(self.duration)
        self._queue_wait = _Children(self.queue_wait)
        # Every known label set exists from the start, at 0 (see REJECTION_REASONS).
        for reason in REJECTION_REASONS:
            self._rejected(reason)
        for stage in DISCONNECT_STAGES:
            self._client_disconnects(stage)

    def watch(self, scheduler: Scheduler, classes: tuple[str, ...] = ("",)) -> None:
        """Export the scheduler's gauges; ``classes``: ``scheduling.classes`` (their queue
        depth and wait series exist from now, at 0)."""
        self.registry.register(SchedulerCollector(scheduler, classes))
        for name in classes:
            self._queue_wait.fast(name, name)
        for replica in scheduler.replicas:
            self.add_replica(replica.name)

    def add_replica(self, name: str) -> None:
        """Export the replica's error, retry and ejection counters at 0 (at startup, or when
        added)."""
        for kind in UPSTREAM_ERROR_KINDS:
            self._upstream_errors(name, kind)
        self.retries.labels(name)
        self.ejections.labels(name)

    def ejected(self, replica: str) -> None:
        self.ejections.labels(replica).inc()

    def remove_replica(self, name: str) -> None:
        """Drop every series of a replica that left the config (its last request is done).

        The gauges follow the scheduler by themselves; the counters' children are known from
        the caches (the ``replica`` label is always the first).
        """
        for children in (self._requests, self._upstream_errors, self._tokens):
            children.remove_first(name)
        for counter in (self.retries, self.ejections):
            with contextlib.suppress(KeyError):
                counter.remove(name)

    def discovery_watch(self, dns: str) -> None:
        """A discovery entry looks ``dns`` up: its error counter exists from now, at 0."""
        self.discovery_errors.labels(dns)

    def discovery_error(self, dns: str) -> None:
        self.discovery_errors.labels(dns).inc()

    def discovery_forget(self, dns: str) -> None:
        """No entry looks ``dns`` up any more (a reload removed it): its series goes."""
        with contextlib.suppress(KeyError):
            self.discovery_errors.remove(dns)

    def adaptive_watch(self, replica: str) -> None:
        """An adaptive loop starts for ``replica``: its series exist from now, at 0."""
        self.engine_waiting.labels(replica)
        self.adaptive_scrape_errors.labels(replica)

    def adaptive_reading(self, replica: str, waiting: float) -> None:
        self.engine_waiting.labels(replica).set(waiting)

    def adaptive_scrape_error(self, replica: str) -> None:
        self.adaptive_scrape_errors.labels(replica).inc()

    def adaptive_forget(self, replica: str) -> None:
        """The loop stopped (the replica went, or its `adaptive` did): its series go."""
        for metric in (self.engine_waiting, self.adaptive_scrape_errors):
            with contextlib.suppress(KeyError):
                metric.remove(replica)

    def config_loaded(self, when: float) -> None:
        """The config in force was loaded at ``when`` (Unix time): at startup, or reloaded."""
        self.last_reload.set(when)

    def reload_result(self, ok: bool) -> None:
        self.reloads.labels("success" if ok else "failure").inc()

    def inter_chunk_observer(self, route: str) -> Callable[[float], None]:
        """The bound ``observe`` of one route's child: a label lookup per request, not per chunk."""
        inter_chunk = self._inter_chunk
        return inter_chunk.updates.get(route) or inter_chunk.fast(route, route)

    def answered(self, replica: str, route: str, status: int, tenant: str | None) -> None:
        """A replica's status line arrived: counted now, before any body byte.

        ``tenant`` is bounded: a key's name from the config, or None (auth off) as "none".
        """
        key = (replica, route, status, tenant)
        requests = self._requests
        (requests.updates.get(key)
         or requests.fast(key, replica, route, str(status), tenant or NO_TENANT))(1)
        if status >= 500:
            self._upstream_errors.fast((replica, "status_5xx"), replica, "status_5xx")(1)

    def rejected_request(self, reason: str) -> None:
        """A rejection answered outside the frame (a guarded admin handler)."""
        self._rejected.fast(reason, reason)(1)

    def internal_error(self, where: str) -> None:
        self.internal_errors.labels(where).inc()

    def upstream_error(self, replica: str, kind: str) -> None:
        self._upstream_errors.fast((replica, kind), replica, kind)(1)

    def record(self, exchange: ExchangeView) -> None:
        """Everything known once a request is over. Synchronous: no cancellation can skip it.

        ``requests_total`` and upstream errors are counted as they happen (in the relay);
        rejections, client disconnects, waits, latencies and tokens (read from the answer's
        usage by the frame, before any observer runs) here.
        """
        outcome = exchange.outcome
        if outcome is _REJECTED:
            # Cached children: under overload this path runs for most requests.
            reason = exchange.detail or "unknown"
            self._rejected.fast(reason, reason)(1)
        elif outcome is _CLIENT_DISCONNECT:
            self._client_disconnects.fast(exchange.stage, exchange.stage)(1)
        if exchange.enqueued_at is not None:
            granted = exchange.dispatched_at
            waited_until = granted if granted is not None else time.monotonic()
            klass = exchange.klass
            (self._queue_wait.updates.get(klass) or self._queue_wait.fast(klass, klass))(
                waited_until - exchange.enqueued_at)
        route = exchange.route
        if exchange.first_byte_at is not None and exchange.dispatched_at is not None:
            key = (route, exchange.stream)
            (self._ttfb.updates.get(key)
             or self._ttfb.fast(key, route, "true" if exchange.stream else "false"))(
                exchange.first_byte_at - exchange.dispatched_at)
        if exchange.stage == "done" and outcome is _OK:
            end = exchange.last_byte_at if exchange.last_byte_at is not None else time.monotonic()
            (self._duration.updates.get(route) or self._duration.fast(route, route))(
                end - exchange.started)
        replica = exchange.replica
        if replica is not None and exchange.prompt_tokens is not None:
            tokens = self._tokens
            kind = (replica, "prompt")
            (tokens.updates.get(kind) or tokens.fast(kind, replica, "prompt"))(
                exchange.prompt_tokens)
            kind = (replica, "completion")
            (tokens.updates.get(kind) or tokens.fast(kind, replica, "completion"))(
                exchange.completion_tokens or 0)
