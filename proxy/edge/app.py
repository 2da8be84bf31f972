"""The HTTP edge: routes and the application's lifetime; requests run in :mod:`proxy.edge.frame`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from ssl import SSLContext

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.config import Config, LiveConfig, TlsConfig, UpstreamConfig
from proxy.control.drain import Lifecycle
from proxy.control.health import HealthChecker
from proxy.control.reload import Reloader
from proxy.core.replicas import Replica
from proxy.core.scheduler import Scheduler
from proxy.edge.admin import AdminHandlers, hide_admin_routes, public_guard
from proxy.edge.forward import Forwarder
from proxy.edge.frame import Frame
from proxy.edge.headers import origin_form
from proxy.edge.keys import CONFIG, HEALTH, LIFECYCLE, METRICS, RELOADER, SCHEDULER, UPSTREAMS
from proxy.edge.light import LIGHT, LIGHT_LIMIT_PER_REPLICA, LIGHT_METHODS, Light
from proxy.observe.accesslog import AccessLog
from proxy.observe.metrics import Metrics
from proxy.upstream.client import Upstreams
from proxy.upstream.tls import context_for

__all__ = [
    "CONFIG", "HEALTH", "LIFECYCLE", "METRICS", "RELOADER", "SCHEDULER", "UPSTREAMS",
    "create_app",
]


class Handlers:
    """Request handlers over the app's typed state (no module-level singletons)."""

    def __init__(self, app: web.Application, access_log: AccessLog | None) -> None:
        self.app = app
        self.frame = Frame(app, access_log)
        self.forwarder = Forwarder(app)
        self.light = app[LIGHT] = Light(app, self.forwarder)

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, _request: web.Request) -> web.Response:
        if self.app[LIFECYCLE].draining:
            return web.Response(status=503, text="draining\n")
        if not self.app[SCHEDULER].any_healthy():
            return web.Response(status=503, text="no healthy replica\n")
        return web.Response(text="ready\n")

    async def models(self, request: web.Request) -> web.StreamResponse:
        """The union of the healthy replicas' models, without a slot (proxy.edge.light)."""
        return await self.frame.serve(request, self.light.models)

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and origin_form(request) == "/v1/models":
            # aiohttp's router does not resolve dot-segments; the replica would ("/x/../").
            return await self.models(request)
        # Only work takes a slot: GET, HEAD and OPTIONS (probes, /version, /v1/models) go to
        # a healthy replica at once, bounded per replica by proxy.edge.light.
        if request.method in LIGHT_METHODS:
            return await self.frame.serve(request, self.light.forwarded)
        return await self.frame.serve(request, self.forwarder.proxied)


def _tls_context(config: UpstreamConfig, urls: Iterable[str]) -> SSLContext | None:
    if config.tls != TlsConfig():
        # Set on purpose even with no https:// replica yet: for those a reload may add.
        urls = [*urls, "https://"]
    return context_for(config.tls, urls)


def create_app(
    config: Config,
    *,
    metrics: Metrics | None = None,
    access_log: AccessLog | None = None,
    load: Callable[[], Config] | None = None,
) -> web.Application:
    """The proxy application. Background work starts and stops with it (``cleanup_ctx``).

    ``access_log`` is owned by the caller (it outlives the app's connections). ``load``
    reads the config file again, for a reload (``app[RELOADER]``); None: nothing to reload.
    """
    handlers: Handlers | None = None

    @web.middleware
    async def unrouted(request: web.Request, handler: Handler) -> web.StreamResponse:
        # aiohttp's router matches only targets that start with "/": an absolute-form target
        # with an empty path ("GET http://host:8000", which is "/") and OPTIONS * would get
        # its plain-text 404. Every target is proxied; the catch-all route never raises this.
        try:
            return await handler(request)
        except web.HTTPNotFound:
            assert handlers is not None
            return await handlers.proxy(request)

    app = web.Application(client_max_size=config.server.max_body_bytes, middlewares=[unrouted])
    replicas = [
        Replica(r.name, r.url or "", r.max_concurrency, index=i)
        for i, r in enumerate(config.replicas)
    ]
    reloader: Reloader | None = None

    def retired(replica: Replica) -> None:
        assert reloader is not None
        reloader.retired(replica)

    scheduler = Scheduler(replicas, config.queue.max_size, max_bytes=config.queue.max_bytes,
                          on_retired=retired)
    live = app[CONFIG] = LiveConfig(config)
    app[SCHEDULER] = scheduler
    app[METRICS] = metrics if metrics is not None else Metrics()
    app[METRICS].watch(scheduler)
    app[LIFECYCLE] = Lifecycle()
    reloader = app[RELOADER] = Reloader(live, scheduler, app[METRICS], load=load)

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        # One TLS context for every https:// replica, pools and probes alike.
        tls = _tls_context(config.upstream, [r.url for r in scheduler.replicas])
        app[UPSTREAMS] = Upstreams(
            scheduler.replicas, config.upstream, light_limit=LIGHT_LIMIT_PER_REPLICA, ssl=tls
        )
        app[HEALTH] = HealthChecker(scheduler, config.health, ssl=tls)
        app[HEALTH].start()
        reloader.attach(app[UPSTREAMS], app[HEALTH], app[LIGHT].slots)
        try:
            yield
        finally:
            await app[HEALTH].close()
            await app[UPSTREAMS].close()

    app.cleanup_ctx.append(upstream_ctx)

    handlers = Handlers(app, access_log)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    if config.admin is None:
        # No admin listener: its endpoints are here, as /metrics always was (see public_guard).
        AdminHandlers(app, guard=public_guard).add_routes(app.router)
    else:
        hide_admin_routes(app.router)
    app.router.add_get("/v1/models", handlers.models, allow_head=False)  # HEAD: one replica
    app.router.add_route("*", "/{tail:.*}", handlers.proxy)
    return app
