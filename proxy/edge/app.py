"""The HTTP edge: routes and the application's lifetime; requests run in :mod:`proxy.edge.frame`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from functools import partial
from ssl import SSLContext

from aiohttp import web
from aiohttp.web_urldispatcher import UrlMappingMatchInfo

from proxy.config import AUTO, Config, LiveConfig, TlsConfig, UpstreamConfig
from proxy.control.adaptive import ADAPTIVE, AdaptiveCaps
from proxy.control.discovery import Discovery, Lookup
from proxy.control.drain import Lifecycle
from proxy.control.health import HealthChecker, Timing
from proxy.control.loadpoll import LOAD_POLLER, LoadPoller
from proxy.control.models import replica_routing
from proxy.control.reload import Reloader
from proxy.core.load import LoadBoard
from proxy.core.replicas import Replica
from proxy.core.scheduler import Scheduler
from proxy.edge.admin import AdminHandlers, hide_admin_routes, public_guard
from proxy.edge.auth import AUTH, KeyRing
from proxy.edge.forward import Forwarder
from proxy.edge.frame import Frame
from proxy.edge.headers import origin_form
from proxy.edge.keys import (
    CONFIG,
    DISCOVERY,
    HEALTH,
    LIFECYCLE,
    METRICS,
    RELOADER,
    SCHEDULER,
    UPSTREAMS,
)
from proxy.edge.light import LIGHT, LIGHT_LIMIT_PER_REPLICA, LIGHT_METHODS, Light
from proxy.edge.route import ROUTING, Routing, tenant_policy
from proxy.observe.accesslog import AccessLog
from proxy.observe.metrics import Metrics
from proxy.upstream.client import Upstreams
from proxy.upstream.tls import context_for

__all__ = [
    "AUTH", "CONFIG", "DISCOVERY", "HEALTH", "LIFECYCLE", "METRICS", "RELOADER", "SCHEDULER",
    "UPSTREAMS", "create_app",
]


#: The POST targets nearly every request has (OpenAI's API): routed without the catch-all.
PLAIN_POSTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")


class Handlers:
    """Request handlers over the app's typed state (no module-level singletons)."""

    def __init__(self, app: web.Application, access_log: AccessLog | None) -> None:
        self.app = app
        self.frame = Frame(app, access_log)
        self.forwarder = Forwarder(app)
        self.light = app[LIGHT] = Light(app, self.forwarder)

    async def healthz(self, _request: web.Request) -> web.Response:
        answer = web.Response(text="ok\n")
        if self.app[LIFECYCLE].draining:
            answer.force_close()  # as every answer while draining
        return answer

    async def readyz(self, _request: web.Request) -> web.Response:
        if self.app[LIFECYCLE].draining:
            answer = web.Response(status=503, text="draining\n")
            answer.force_close()
            return answer
        if (not self.app[SCHEDULER].any_healthy()
                and not self.app[CONFIG].current.health.ready_without_replicas):
            return web.Response(status=503, text="no healthy replica\n")
        return web.Response(text="ready\n")

    async def load(self, _request: web.Request) -> web.Response:
        """This batchgate's load, for a gateway in front (proxy.core.load): public like
        /readyz (counts only, no API key), always on, whatever server.load_headers says."""
        return web.json_response(self.app[SCHEDULER].reading().json())

    async def wait_for_drain(self, _request: web.Request) -> web.Response:
        """Start the drain, as SIGTERM does, and answer once it has settled: nothing left in
        flight or queued after the quiet period, or the deadline passed (and the rest cut).

        The engine container's ``preStop`` hook calls it, so the engine is stopped only after
        batchgate has finished its streams; it carries no key (like ``/healthz``). Every
        caller gets the answer, at once if the drain is over; a caller that hangs up stops
        nothing. The process exits when the drain is over, as after SIGTERM.
        """
        lifecycle = self.app[LIFECYCLE]
        server = self.app[CONFIG].current.server
        lifecycle.start_drain(server.drain_quiet_s, server.drain_timeout_s,
                              "GET /wait-for-drain")
        await lifecycle.settled.wait()
        answer = web.json_response({"drained": lifecycle.cut_count == 0,
                                    "cut": lifecycle.cut_count})
        answer.force_close()
        return answer

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
    timing: Timing | None = None,
    load: Callable[[], Config] | None = None,
    lookup: Lookup | None = None,
    discovery_timing: Timing | None = None,
    clock: Callable[[], float] | None = None,
) -> web.Application:
    """The proxy application. Background work starts and stops with it (``cleanup_ctx``).

    ``access_log`` is owned by the caller (it outlives the app's connections); ``timing``
    is the health checker's and the drain's clocks and sleep (tests drive them by hand).
    ``load`` reads the config file again, for a reload (``app[RELOADER]``); None: nothing to
    reload. ``lookup`` and ``discovery_timing``: discovery's DNS lookup and clocks (tests).
    ``clock``: the scheduler's (deadlines, queue waits, service times; tests drive it).
    """
    app = web.Application(client_max_size=config.server.max_body_bytes)
    replicas = [
        Replica(r.name, r.url or "", r.max_concurrency, index=i,
                healthy=config.health.assume_healthy_at_start, **replica_routing(r))
        for i, r in enumerate(config.replicas)
    ]
    reloader: Reloader | None = None

    def retired(replica: Replica) -> None:
        assert reloader is not None
        reloader.retired(replica)

    # A reading older than two probe intervals is unknown (two polls missed, or no answer).
    board = LoadBoard(max_age_s=2 * config.health.interval_s,
                      clock=(timing if timing is not None else Timing()).monotonic)
    # Always present (off without `auth`), so a reload can turn auth on: KeyRing.replace.
    keys = app[AUTH] = KeyRing(config.auth, config.replicas)
    scheduler = Scheduler(replicas, config.queue.max_size, max_bytes=config.queue.max_bytes,
                          on_retired=retired, load=board,
                          clock=clock if clock is not None else time.monotonic,
                          classes=len(config.scheduling.classes),
                          tenants=tenant_policy(keys, config.scheduling))
    app[ROUTING] = Routing(config)
    live = app[CONFIG] = LiveConfig(config)
    app[SCHEDULER] = scheduler
    app[METRICS] = metrics if metrics is not None else Metrics()
    app[METRICS].watch(scheduler, config.scheduling.classes)
    timing = timing if timing is not None else Timing()
    app[LIFECYCLE] = Lifecycle(
        clock=timing.monotonic, sleep=timing.sleep,
        describe=lambda: f"{scheduler.queue_depth} queued, {scheduler.in_flight} in flight",
    )
    reloader = app[RELOADER] = Reloader(live, scheduler, app[METRICS], load=load)
    # Registered first: a keys file that no longer reads refuses the reload before anything
    # of it applies (KeyRing.replace raises ConfigError and keeps the keys in force).
    reloader.on_reload(lambda new: keys.replace(new.auth, new.replicas, new.scheduling.classes))

    def scheduling(new: Config) -> None:
        # Weights and bounds of the keys just put in force; what needs demand and costs.
        scheduler.set_tenant_policy(tenant_policy(keys, new.scheduling))
        app[ROUTING].configure(new)

    reloader.on_reload(scheduling)
    # Always there, with no loop when there is no entry: a reload may add one.
    discovery = app[DISCOVERY] = Discovery(config.discovery, reloader, app[METRICS],
                                           lookup=lookup, timing=discovery_timing)
    reloader.discovered = lambda: discovery.names
    reloader.on_reload(lambda new: discovery.reconfigure(new.discovery))

    def load_age(new: Config) -> None:
        board.max_age_s = 2 * new.health.interval_s

    reloader.on_reload(load_age)

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        # One TLS context for every https:// replica, pools and probes alike.
        tls = _tls_context(config.upstream, [r.url for r in scheduler.replicas])
        app[UPSTREAMS] = Upstreams(
            scheduler.replicas, config.upstream, light_limit=LIGHT_LIMIT_PER_REPLICA, ssl=tls,
            credentials=app[AUTH].upstream_headers,
        )
        app[HEALTH] = HealthChecker(scheduler, config.health, upstream=config.upstream, ssl=tls,
                                    timing=timing, metrics=app[METRICS],
                                    credentials=keys.upstream_headers)
        for r in config.replicas:
            app[HEALTH].watch_models(r.name, r.models == AUTO)
        app[HEALTH].start()
        poller = app[LOAD_POLLER] = LoadPoller(scheduler, lambda: live.current.health,
                                               ssl=tls, timing=timing)
        poller.start()
        reloader.attach(app[UPSTREAMS], app[HEALTH], app[LIGHT].slots)
        # Adaptive caps (replicas[].adaptive, discovery[].adaptive): a loop per such replica,
        # following reloads and discovery through the Reloader's hooks.
        adaptive = app[ADAPTIVE] = AdaptiveCaps(
            scheduler, lambda: live.current, app[METRICS], pools=app[UPSTREAMS], ssl=tls,
            credentials=app[AUTH].upstream_headers, timing=timing)
        reloader.on_add(adaptive.add)
        reloader.on_retire(adaptive.remove)
        reloader.on_reload(adaptive.reconfigure)
        adaptive.start()
        # After attach: what it finds gets pools and probes like any replica.
        discovery.start()
        try:
            yield
        finally:
            await app[LIFECYCLE].close()  # a drain still running (in-process use)
            await discovery.close()
            await adaptive.close()
            await poller.close()
            await app[HEALTH].close()
            await app[UPSTREAMS].close()

    app.cleanup_ctx.append(upstream_ctx)

    handlers = Handlers(app, access_log)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/load", handlers.load, allow_head=False)
    # On the public port whether or not the admin listener is set: the preStop hook of the
    # engine's container calls the port the manifest knows, the one the Service targets.
    app.router.add_get("/wait-for-drain", handlers.wait_for_drain, allow_head=False)
    if config.admin is None:
        # No admin listener: its endpoints are here, as /metrics always was (see public_guard).
        AdminHandlers(app, guard=public_guard).add_routes(app.router)
    else:
        hide_admin_routes(app.router)
    app.router.add_get("/v1/models", handlers.models, allow_head=False)  # HEAD: one replica
    # POST (nearly all work) goes straight to the frame: a partial is called in C, so the
    # request runs no coroutine of Handlers.proxy's around Frame.serve.
    post = partial(handlers.frame.serve, work=handlers.forwarder.proxied)
    # The API's own paths as plain routes too, to the same partial: the router finds them in
    # one dict lookup, not by walking up to "/" and matching the catch-all's regex. Their
    # other methods still reach the catch-all (a plain route answers only its own method).
    for path in PLAIN_POSTS:
        app.router.add_route("POST", path, post)
    app.router.add_route("POST", "/{tail:.*}", post)
    catch_all = app.router.add_route("*", "/{tail:.*}", handlers.proxy)
    _route_every_target(app.router, catch_all)
    return app


def _route_every_target(router: web.UrlDispatcher, catch_all: web.AbstractRoute) -> None:
    """Send the targets aiohttp's router cannot match to the catch-all route.

    The router matches only targets that start with "/": an absolute-form target with an
    empty path ("GET http://host:8000", which is "/") and ``OPTIONS *`` would get its
    plain-text 404. Every target is proxied. Done on the router rather than in a
    middleware, which would cost every request an extra handler call (2.5 % of a small
    request's instructions, measured with callgrind).
    """
    resolve = router.resolve

    async def resolve_or_catch_all(request: web.Request) -> UrlMappingMatchInfo:
        match = await resolve(request)
        # No isinstance: match infos are ABCs, whose instance check costs a Python call.
        error = match.http_exception
        if error is not None and error.status == 404:
            return UrlMappingMatchInfo({"tail": ""}, catch_all)
        return match

    def resolve_every_target(request: web.Request) -> Awaitable[UrlMappingMatchInfo]:
        # A plain function returning the router's own coroutine: nearly every target is a
        # path that "/{tail:.*}" matches (it starts with "/"; "." matches all but a
        # newline), so it needs no coroutine of ours around the router's (one fewer per
        # request). The others, and any 404, go through the wrapper.
        path = request.rel_url.path_safe
        if path[:1] == "/" and "\n" not in path:
            return resolve(request)
        return resolve_or_catch_all(request)

    router.resolve = resolve_every_target  # type: ignore[method-assign,assignment]
