"""The operator's endpoints: ``/metrics``, ``POST /admin/reload``, ``GET /admin/replicas``.

With ``admin:`` in the config they are served by a listener of their own
(:func:`create_admin_app`, bound by :mod:`proxy.server`), and the public port answers 404 for
them: what scrapes and steers the proxy can sit on a loopback or management address that
callers cannot reach. Without ``admin:`` they are on the public port, as ``/metrics`` always
was, behind :func:`public_guard`. ``/healthz`` and ``/readyz`` always stay public.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.control.adaptive import ADAPTIVE
from proxy.control.reload import FAILED, INVALID, REFUSED, SUCCESS
from proxy.core.replicas import DRAINING, Replica
from proxy.edge.auth import denied
from proxy.edge.keys import METRICS, RELOADER, SCHEDULER

#: The admin paths; on the public port they are never proxied to a replica.
ADMIN_PATHS = ("/metrics", "/admin/reload", "/admin/replicas")

#: ``POST /admin/reload``: the status and error code of each result of a reload.
RELOAD_STATUS: dict[str, tuple[int, str | None]] = {
    SUCCESS: (200, None),
    INVALID: (400, "invalid_config"),  # the file does not load; the old config stays
    REFUSED: (409, "cannot_change_live"),  # valid, but needs a restart; nothing applied
    FAILED: (500, "reload_failed"),  # a component failed to take it (see the log)
}

Guard = Callable[[web.Request], web.StreamResponse | None]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def public_guard(request: web.Request) -> web.StreamResponse | None:
    """Who may use the admin endpoints on the public port (no ``admin:`` listener): with
    ``auth`` on, only callers with a valid key (their 401 otherwise, counted as
    ``unauthorized``); without it, anyone who reaches the port, as ``/metrics`` always
    allowed. A response returned here is sent instead of the endpoint's; None lets it in.
    """
    return denied(request)


def _error(status: int, message: str, code: str, **extra: object) -> web.Response:
    kind = "internal_error" if status >= 500 else "invalid_request_error"
    body = {**extra, "error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.Response(status=status, body=json.dumps(body).encode(),
                        content_type="application/json",
                        headers={"Allow": "POST"} if status == 405 else None)


async def not_here(_request: web.Request) -> web.StreamResponse:
    """The public port's answer for an admin path while the admin listener serves it."""
    return _error(404, "not found on this port (served by the admin listener)", "not_found")


def replica_entry(replica: Replica) -> dict[str, object]:
    """One replica as ``/admin/replicas`` shows it.

    ``state`` is the health of the replica: ``healthy``, ``unhealthy`` or ``ejected`` (passive
    outlier ejection: ``Replica.health``); ``ejected_until`` the Unix time its ejection ends.
    ``draining``: removed by a reload or by discovery, finishing its requests. ``models``,
    ``models_pending``, ``max_tokens_in_flight``, ``tokens_in_flight``: model routing and the
    token budget (README "Scheduling").
    """
    return {
        "name": replica.name,
        "url": replica.url,
        "state": replica.health,
        "in_flight": replica.in_flight,
        "max_concurrency": replica.max_concurrency,
        "ejected_until": replica.ejected_until,
        "draining": replica.state == DRAINING,
        # What it serves (null: model-blind; models_pending: `auto`, not read yet) and its
        # token budget (null: none) with the estimated tokens of its requests in flight.
        "models": None if replica.models is None else sorted(replica.models),
        "models_pending": replica.models_pending,
        "max_tokens_in_flight": replica.max_tokens,
        "tokens_in_flight": replica.tokens_in_flight,
    }


class AdminHandlers:
    """The endpoints over the main application's state (served by either listener)."""

    def __init__(self, app: web.Application, guard: Guard | None = None) -> None:
        self.app = app  # the proxy application, whichever listener serves these
        self.guard = guard

    def _guarded(self, handler: Handler) -> Handler:
        guard = self.guard
        if guard is None:
            return handler

        async def guarded(request: web.Request) -> web.StreamResponse:
            refusal = guard(request)
            return refusal if refusal is not None else await handler(request)

        return guarded

    async def metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.app[METRICS].registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def reload(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return _error(405, f"{request.method} is not allowed here: POST to reload",
                          "method_not_allowed")
        # Shielded: a caller that hangs up (which cancels its handler on the public port)
        # must not stop a reload half-way; it runs to its end and is counted and logged.
        result = await asyncio.shield(self.app[RELOADER].reload("POST /admin/reload"))
        status, code = RELOAD_STATUS[result.result]
        if code is None:
            return web.json_response({"result": "success", "changes": result.message})
        return _error(status, result.message, code, result="failure")

    async def replicas(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            return _error(405, f"{request.method} is not allowed here", "method_not_allowed")
        entries = [replica_entry(r) for r in self.app[SCHEDULER].replicas]
        adaptive = self.app.get(ADAPTIVE)
        for entry in entries:
            name = entry["name"]
            assert isinstance(name, str)
            entry["adaptive"] = None if adaptive is None else adaptive.describe(name)
        return web.json_response(entries)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        # /metrics stays as open as it always was on the public port; the guard is for
        # /admin/*, which can change what the proxy does or show where replicas are. Every
        # method is routed to those (405 where wrong), so none falls through to the public
        # port's catch-all and reaches a replica.
        router.add_get("/metrics", self.metrics)
        router.add_route("*", "/admin/reload", self._guarded(self.reload))
        router.add_route("*", "/admin/replicas", self._guarded(self.replicas))


def hide_admin_routes(router: web.UrlDispatcher) -> None:
    """On the public port while an admin listener serves them: 404, never proxied."""
    for path in ADMIN_PATHS:
        router.add_route("*", path, not_here)


def create_admin_app(app: web.Application) -> web.Application:
    """The admin listener's application, over the state of the proxy application ``app``.

    It has no lifetime of its own: ``app`` must be started first and cleaned up last.
    """
    admin = web.Application()
    AdminHandlers(app).add_routes(admin.router)
    return admin
