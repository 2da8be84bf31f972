"""The application's typed state: one key per object the edge shares (no singletons)."""

from __future__ import annotations

from aiohttp import web

from proxy.config import Config
from proxy.control.drain import Lifecycle
from proxy.control.health import HealthChecker
from proxy.core.scheduler import Scheduler
from proxy.observe.metrics import Metrics
from proxy.upstream.client import Upstreams

CONFIG = web.AppKey("config", Config)
SCHEDULER = web.AppKey("scheduler", Scheduler)
METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
HEALTH = web.AppKey("health", HealthChecker)
