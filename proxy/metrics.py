"""Every Prometheus series batchgate exports, defined once.

The registry is injected (one per application), so tests and several apps in one process never
share counters. State that the scheduler already holds (queue depth, slots in use, health) is
read at scrape time by a collector rather than mirrored into gauges on the hot path: a scrape
can never disagree with the scheduler, and a request pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.scheduler import Scheduler

#: The `route` label: the OpenAI routes by name, everything else as "other" (bounded labels).
KNOWN_ROUTES = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models"}
)


def route_label(path: str) -> str:
    return path if path in KNOWN_ROUTES else "other"


class SchedulerCollector(Collector):
    """Queue and slot gauges, read from the scheduler when Prometheus scrapes."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._scheduler
        yield GaugeMetricFamily(
            "batchgate_queue_depth", "Requests waiting for a slot, all replicas together.",
            value=s.queue_depth,
        )
        yield GaugeMetricFamily(
            "batchgate_queue_capacity", "Most requests that may wait (queue.max_size).",
            value=s.max_queue,
        )
        in_flight = GaugeMetricFamily(
            "batchgate_replica_in_flight", "Requests in flight on the replica.", labels=["replica"]
        )
        capacity = GaugeMetricFamily(
            "batchgate_replica_max_concurrency",
            "Configured concurrency of the replica (max_concurrency).",
            labels=["replica"],
        )
        healthy = GaugeMetricFamily(
            "batchgate_replica_healthy", "1 if the replica takes requests, else 0.",
            labels=["replica"],
        )
        for r in s.replicas:
            in_flight.add_metric([r.name], r.in_flight)
            capacity.add_metric([r.name], r.max_concurrency)
            healthy.add_metric([r.name], 1 if r.healthy else 0)
        yield in_flight
        yield capacity
        yield healthy


class Metrics:
    """The counters the request path increments, plus the scheduler's gauges."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "batchgate_requests", "Requests answered by a replica, by the replica's status code.",
            ["replica", "route", "code"], registry=r,
        )
        self.rejected = Counter(
            "batchgate_rejected_requests",
            "Requests batchgate answered itself without a replica, by reason.",
            ["reason"], registry=r,
        )
        self.upstream_errors = Counter(
            "batchgate_upstream_errors",
            "Failures talking to a replica, by kind (connect, timeout, reset, status_5xx).",
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
        build = Gauge("batchgate_build_info", "batchgate version.", ["version"], registry=r)
        build.labels(__version__).set(1)

    def watch(self, scheduler: Scheduler) -> None:
        self.registry.register(SchedulerCollector(scheduler))
