"""What the edge decides about a request before it asks for a slot: its class, its tenant, and
(only when a feature needs it) its model, token cost and stream flag from one parse of the
body.

The order (README "Scheduling"): the frame checks the API key (401) -> :meth:`Routing.klass`
reads ``X-Batchgate-Class`` (400 on a name not in ``scheduling.classes``, the body still
unread) -> :meth:`Routing.tenant` (the key's name, else ``scheduling.tenant_header``) -> the
body is read -> :meth:`Routing.route` parses its demand once -> the scheduler refuses a model
nobody serves (404 ``model_not_found``) or a cost no replica can ever hold (400
``request_too_large``), both before any slot or wait, then queues or dispatches it.

The JSON hot path pays nothing for what is not configured: without a replica naming its models
or carrying a token budget (and without SSE heartbeats, which need ``stream``), the body is
never parsed here; the access log's model comes from the bounded byte scan as before.
"""

from __future__ import annotations

from aiohttp import web
from multidict import istr

from proxy.config import Config, DiscoveryConfig, ReplicaConfig, SchedulingConfig
from proxy.core.demand import Demand, TokenRatio, parse_demand
from proxy.core.errors import BadRequest
from proxy.core.scheduler import TenantPolicy
from proxy.edge.auth import KeyRing
from proxy.observe.exchange import Exchange
from proxy.observe.model import request_model

#: The caller's priority class, by name (one of ``scheduling.classes``).
CLASS_HEADER = "X-Batchgate-Class"
_CLASS_KEY = istr(CLASS_HEADER)  # folded once: a plain str is folded on every lookup
#: A tenant named by ``scheduling.tenant_header`` is at most this long (it keys the fair
#: share's state): a longer value is a 400, not silently cut (two tenants would merge).
TENANT_MAX_CHARS = 64
#: The tenant of a request with no key and no (or an empty) tenant header: all such share one.
NO_HEADER_TENANT = ""


#: What :meth:`Routing.route` says when nothing needs the body: any replica, no cost, not
#: known to stream.
NO_ROUTE: tuple[str | None, int, bool] = (None, 0, False)


class Routing:
    """Which per-request facts the config needs (recomputed on reload), the class names and
    the calibrated characters-per-token ratio behind token costs. One per application
    (``ROUTING``); its methods are the request path's, so they precompute what they can."""

    __slots__ = ("_default", "_ranks", "budgeted", "needs_demand", "ratio", "routed",
                 "scheduling")

    def __init__(self, config: Config) -> None:
        self.ratio = TokenRatio()
        self.configure(config)

    def configure(self, config: Config) -> None:
        """The config in force (at startup and on every reload)."""
        entries: tuple[ReplicaConfig | DiscoveryConfig, ...] = (*config.replicas,
                                                                  *config.discovery)
        #: Some replica names its models: the body's model routes the request.
        self.routed = any(e.models is not None for e in entries)
        #: Some replica has a token budget: requests carry a cost.
        self.budgeted = any(e.max_tokens_in_flight is not None for e in entries)
        self.needs_demand = self.routed or self.budgeted or config.queue.sse_heartbeat_s > 0
        self.scheduling = scheduling = config.scheduling
        self._ranks = {name: rank for rank, name in enumerate(scheduling.classes)}
        self._default = (self._ranks[scheduling.default_class], scheduling.default_class)

    def klass(self, request: web.BaseRequest, key_class: str | None) -> tuple[int, str]:
        """The request's class (rank, name): ``X-Batchgate-Class``, else its key's ``class``,
        else ``scheduling.default_class``. An unknown name in the header is a 400 naming the
        allowed ones."""
        name = request.headers.get(_CLASS_KEY)
        if name is None:
            if key_class is None:
                return self._default
            rank = self._ranks.get(key_class)
            # A key's class outside the list cannot load (check_keys); be safe anyway.
            return self._default if rank is None else (rank, key_class)
        rank = self._ranks.get(name)
        if rank is None:
            raise BadRequest(f"{CLASS_HEADER} must be one of "
                             f"{', '.join(self.scheduling.classes)}, got {name[:64]!r}")
        return rank, name

    def tenant(self, request: web.BaseRequest, exchange: Exchange) -> str:
        """The key's name whenever auth is on; else the ``scheduling.tenant_header`` value
        (absent or empty: :data:`NO_HEADER_TENANT`); else one tenant for all."""
        if exchange.tenant is not None:
            return exchange.tenant
        header = self.scheduling.tenant_header
        if header is None:
            return NO_HEADER_TENANT
        value = request.headers.get(header, NO_HEADER_TENANT).strip()
        if len(value) > TENANT_MAX_CHARS:
            raise BadRequest(f"{header} (the tenant, scheduling.tenant_header) must be at most "
                             f"{TENANT_MAX_CHARS} characters, got {len(value)}")
        return value

    def route(self, body: bytes, exchange: Exchange) -> tuple[str | None, int, bool]:
        """(model, cost) for the scheduler, and whether the request streams (an SSE heartbeat
        while it waits). The body is parsed once, and only when something needs it (else the
        log's model comes from the byte scan); the prompt's characters are kept for
        :meth:`learn`."""
        if not self.needs_demand:
            exchange.model = request_model(body)
            return NO_ROUTE
        demand = parse_demand(body)
        exchange.model = demand.model
        if demand.prompt_ids == 0 and demand.prompt_chars:
            exchange.prompt_chars = demand.prompt_chars  # text only: ids teach no ratio
        return self.ask(demand)

    def ask(self, demand: Demand) -> tuple[str | None, int, bool]:
        cost = demand.cost(self.scheduling.default_max_tokens, self.ratio.value) \
            if self.budgeted else 0
        return (demand.model if self.routed else None), cost, demand.stream

    def learn(self, exchange: Exchange) -> None:
        """A request is over: its prompt's characters against the tokens its replica reported
        in ``usage`` calibrate the ratio (only text prompts; see TokenRatio)."""
        if exchange.prompt_chars is not None and exchange.prompt_tokens is not None:
            self.ratio.record(exchange.prompt_chars, exchange.prompt_tokens)


ROUTING = web.AppKey("routing", Routing)


def tenant_policy(keys: KeyRing, scheduling: SchedulingConfig) -> TenantPolicy:
    """The fair share among tenants: each key's weight and bound (keys of one name agree,
    proxy.config.auth.check_keys), and ``scheduling.max_queued_per_tenant`` for the rest."""
    return TenantPolicy(
        weights={k.name: k.weight for k in keys.keys if k.weight != 1.0},
        max_queued={k.name: k.max_queued for k in keys.keys if k.max_queued is not None},
        default_max_queued=scheduling.max_queued_per_tenant,
    )
