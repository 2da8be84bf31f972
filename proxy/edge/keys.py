"""The application's typed state: one key per object the edge shares (no singletons)."""

from __future__ import annotations

from aiohttp import web

from proxy.config import LiveConfig
from proxy.control.discovery import Discovery
from proxy.control.drain import Lifecycle
from proxy.control.health import HealthChecker
from proxy.control.reload import Reloader
from proxy.core.scheduler import Scheduler
from proxy.observe.metrics import Metrics
from proxy.upstream.client import Upstreams

#: The config in force: read ``app[CONFIG].current`` per request (a reload swaps it).
CONFIG = web.AppKey("config", LiveConfig)
SCHEDULER = web.AppKey("scheduler", Scheduler)
METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
HEALTH = web.AppKey("health", HealthChecker)
RELOADER = web.AppKey("reloader", Reloader)
DISCOVERY = web.AppKey("discovery", Discovery)
