"""Live reload: re-read the config file, work out what changed, apply it without dropping work.

Two steps, kept apart so each can be tested alone:

* :func:`plan` compares the config in force with the new one and returns a :class:`Plan`:
  replicas added, removed and re-capped, the sections that changed, and the keys that changed
  but cannot change live. Pure, no I/O.
* :class:`Reloader` loads the file (SIGHUP, ``POST /admin/reload``), refuses what cannot be
  applied, and applies the rest to the components, in one synchronous step: no request can run
  between the first change and the last.

What always holds: a refused reload (invalid file, or a key that cannot change live) applies
nothing; no request in flight or queued is dropped by a reload (a removed replica takes no new
work and finishes what it holds; a lowered cap or queue bound cuts nothing, it only stops new
dispatch or admission until the work is under it); every reload is counted and logged.

Keys that cannot change live (each needs a restart, and a reload that changes one is refused,
naming it): ``server.*`` except ``drain_timeout_s``, ``drain_quiet_s`` and ``load_headers``
(the listener and its per-connection settings are fixed once bound; ``max_body_bytes`` is
aiohttp's per-app ``client_max_size``);
``admin`` (the admin listener is bound at startup, and moving ``/metrics`` between ports under
a running Prometheus is not a reload's job); ``upstream.*`` except ``retries`` (timeouts and
TLS are built into each replica's pool); ``scheduling.classes`` (waiters hold their class's
rank, and the queue series are per class); and the ``url`` (or ``simulated`` settings) of a
replica that stays: the name is the replica's identity in metrics and pools, so a replica that
moves is removed and added under a new name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, fields
from typing import NamedTuple, Protocol

from proxy.config import (
    Config,
    ConfigError,
    DiscoveryConfig,
    HealthConfig,
    LiveConfig,
    ReplicaConfig,
    UpstreamConfig,
)
from proxy.control.models import ReplicaRouting, replica_routing
from proxy.core.replicas import DRAINING, Replica
from proxy.core.scheduler import Scheduler
from proxy.observe.metrics import Metrics

log = logging.getLogger("batchgate.reload")

#: Keys of these sections that a reload may change; any other key of them is fixed.
LIVE_KEYS: dict[str, frozenset[str]] = {
    # drain_quiet_s: read when a drain begins. load_headers: read per answer
    # (proxy.edge.forward).
    "server": frozenset({"drain_timeout_s", "drain_quiet_s", "load_headers"}),
    # retries: read per request. The passive outlier keys (proxy.control.health, where they
    # exist): applied by HealthControl.reconfigure.
    "upstream": frozenset({"retries", "eject_after", "eject_s", "max_ejected_percent"}),
    # Read per request (proxy.edge.forward, proxy.edge.route). Not `classes`: a waiter holds
    # its class's rank, and the queue series are per class, so the list needs a restart.
    "scheduling": frozenset({"default_class", "tenant_header", "default_max_tokens",
                             "max_queued_per_tenant"}),
}
#: Sections that cannot change live at all.
FIXED_SECTIONS = frozenset({"admin"})


@dataclass(frozen=True, slots=True)
class Plan:
    """What a reload from ``old`` to ``new`` changes (see :func:`plan`)."""

    added: tuple[ReplicaConfig, ...] = ()
    removed: tuple[str, ...] = ()
    limits: tuple[tuple[str, int, int], ...] = ()  # (name, old cap, new cap)
    #: Replicas that stay with another ``models`` or ``max_tokens_in_flight`` (the new one).
    routes: tuple[ReplicaConfig, ...] = ()
    changed: frozenset[str] = frozenset()  # top-level sections whose value changed
    fixed: tuple[str, ...] = ()  # dotted keys that changed but cannot change live
    blocked: tuple[str, ...] = ()  # other reasons the reload cannot be applied now

    @property
    def refused(self) -> bool:
        return bool(self.fixed or self.blocked)

    def refusal(self) -> str:
        reasons = []
        if self.fixed:
            keys = ", ".join(self.fixed)
            reasons.append(f"{keys} cannot change without a restart")
        reasons.extend(self.blocked)
        return "reload refused, nothing applied: " + "; ".join(reasons)

    def summary(self) -> str:
        parts = [f"+{r.name}" for r in self.added] + [f"-{name}" for name in self.removed]
        parts += [f"{name} max_concurrency {a}->{b}" for name, a, b in self.limits]
        parts += [f"{r.name} models/max_tokens_in_flight" for r in self.routes]
        sections = sorted(self.changed - {"replicas"})
        if sections:
            parts.append("changed: " + ", ".join(sections))
        return "; ".join(parts) or "no changes"


def _same_engine(old: ReplicaConfig, new: ReplicaConfig) -> str | None:
    """None if both name the same engine, else the key that differs."""
    if old.simulated is not None or new.simulated is not None:
        # The config in force has a simulated replica's url filled in; the file has none.
        return None if old.simulated == new.simulated else "simulated"
    return None if old.url == new.url else "url"


def plan(
    old: Config, new: Config, *, draining: Collection[str] = (), taken: Collection[str] = ()
) -> Plan:
    """Compare the config in force with a new one. ``draining``: names of replicas removed by
    an earlier reload that still hold work (their names cannot be reused until they are gone).
    ``taken``: names of replicas found by discovery (never in ``replicas``, so never
    "removed" here; a file replica cannot take one of their names).
    """
    fixed: list[str] = []
    blocked: list[str] = []
    changed: set[str] = set()
    for section in fields(Config):
        name = section.name
        before, after = getattr(old, name), getattr(new, name)
        if name == "replicas" or before == after:
            continue
        changed.add(name)
        if name in FIXED_SECTIONS:
            if before is None or after is None:
                fixed.append(name)
            else:
                fixed += [f"{name}.{f.name}" for f in fields(before)
                          if getattr(before, f.name) != getattr(after, f.name)]
        elif name in LIVE_KEYS:
            fixed += [f"{name}.{f.name}" for f in fields(before)
                      if f.name not in LIVE_KEYS[name]
                      and getattr(before, f.name) != getattr(after, f.name)]

    current = {r.name: r for r in old.replicas}
    added: list[ReplicaConfig] = []
    limits: list[tuple[str, int, int]] = []
    routes: list[ReplicaConfig] = []
    for i, replica in enumerate(new.replicas):
        was = current.get(replica.name)
        if was is None:
            if replica.name in taken:
                blocked.append(
                    f"replicas[{i}] ({replica.name}) has the name of a replica found by "
                    "discovery; give it another name")
            elif replica.name in draining:
                blocked.append(
                    f"replicas[{i}] ({replica.name}) is still finishing its work after an "
                    "earlier reload removed it; reload again once it is gone")
            added.append(replica)
            continue
        key = _same_engine(was, replica)
        if key is not None:
            fixed.append(f"replicas[{i}].{key} (of {replica.name}; to move a replica, give "
                         "it a new name)")
        if was.max_concurrency != replica.max_concurrency:
            limits.append((replica.name, was.max_concurrency, replica.max_concurrency))
        if (was.models, was.max_tokens_in_flight) != (replica.models,
                                                      replica.max_tokens_in_flight):
            routes.append(replica)
    names = {r.name for r in new.replicas}
    removed = tuple(r.name for r in old.replicas if r.name not in names)
    if added or removed or old.replicas != new.replicas:
        changed.add("replicas")
    return Plan(tuple(added), removed, tuple(limits), tuple(routes), frozenset(changed),
                tuple(fixed), tuple(blocked))


class Pools(Protocol):
    """What a reload needs of the upstream pools (:class:`proxy.upstream.client.Upstreams`)."""

    def add(self, replica: Replica) -> None: ...
    def set_limit(self, replica: str, max_concurrency: int) -> None: ...
    def retire(self, replica: str) -> None: ...


class HealthControl(Protocol):
    """What a reload needs of the probes (:class:`proxy.control.health.HealthChecker`)."""

    def add(self, replica: Replica) -> None: ...
    def remove(self, replica: Replica) -> None: ...
    def reconfigure(self, config: HealthConfig, upstream: UpstreamConfig | None = None
                    ) -> None: ...
    def watch_models(self, name: str, auto: bool) -> None: ...


class SlotFree(Protocol):
    """The slot-free requests (:class:`proxy.edge.light.LightSlots`): a removed replica goes
    only once the last of those is done too."""

    def when_idle(self, name: str, callback: Callable[[], None]) -> None: ...


#: The results of a reload, and how ``POST /admin/reload`` answers each (proxy.edge.admin).
SUCCESS = "success"
INVALID = "invalid"  # the file does not load: the same one-line error as at startup
REFUSED = "refused"  # valid, but it changes a key that cannot change live
FAILED = "failed"  # applied, but a component failed to take it (a bug: see the log)


class ReloadResult(NamedTuple):
    result: str
    message: str

    @property
    def ok(self) -> bool:
        return self.result == SUCCESS


#: Fills in what the file cannot say (the URLs of embedded simulated engines, started on
#: demand) given the new config and the one in force.
Resolve = Callable[[Config, Config], Awaitable[Config]]


class Reloader:
    """Applies new configs to the running proxy; the one writer of :class:`LiveConfig`.

    Components that change with the config register a callback: :meth:`on_reload` (called
    with each new config that validated and changes no fixed key, in registration order,
    before the replicas, queue and probes change; raising ConfigError refuses the reload
    there, anything else is a bug, logged and reported, and the rest still applies) and
    :meth:`on_retire` (a removed replica's last request is done). Reloads run one at a time.
    """

    def __init__(
        self,
        live: LiveConfig,
        scheduler: Scheduler,
        metrics: Metrics,
        *,
        load: Callable[[], Config] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._live = live
        self._scheduler = scheduler
        self._metrics = metrics
        #: Reads the config file again (None: nothing to reload from).
        self.load = load
        self._clock = clock
        self._lock = asyncio.Lock()
        self._callbacks: list[Callable[[Config], None]] = []
        self._retire_callbacks: list[Callable[[str], None]] = []
        self._add_callbacks: list[Callable[[Replica], None]] = []
        self._pools: Pools | None = None
        self._health: HealthControl | None = None
        self._slot_free: SlotFree | None = None
        self.resolve: Resolve | None = None
        #: Names of the replicas found by discovery (proxy.control.discovery sets it).
        self.discovered: Callable[[], Collection[str]] = tuple
        # Dropped by the scheduler, not yet retired (pools, probes, series): the name is not
        # free for a new replica until then.
        self._retiring: set[str] = set()
        # As Prometheus does: the config loaded at startup is the first successful load.
        metrics.config_loaded(clock())

    def attach(
        self, pools: Pools, health: HealthControl, slot_free: SlotFree | None = None
    ) -> None:
        """The components built at startup (the app's cleanup_ctx), before any traffic."""
        self._pools = pools
        self._health = health
        self._slot_free = slot_free

    def on_reload(self, callback: Callable[[Config], None]) -> None:
        self._callbacks.append(callback)

    def on_retire(self, callback: Callable[[str], None]) -> None:
        self._retire_callbacks.append(callback)

    def on_add(self, callback: Callable[[Replica], None]) -> None:
        """``callback(replica)`` after each replica is added (by a reload or discovery),
        once its pools and probes exist (the adaptive caps start their loop there)."""
        self._add_callbacks.append(callback)

    async def reload(self, trigger: str) -> ReloadResult:
        """Re-read the config file and apply it (``trigger``: what asked, for the log)."""
        async with self._lock:
            result = await self._reload()
        self._metrics.reload_result(result.ok)
        if result.ok:
            self._metrics.config_loaded(self._clock())
            log.info("config reloaded (%s): %s", trigger, result.message)
        else:
            log.error("config reload (%s) failed: %s", trigger, result.message)
        return result

    async def _reload(self) -> ReloadResult:
        if self.load is None:
            return ReloadResult(INVALID, "no config file to reload (started without one)")
        try:
            new = self.load()
        except ConfigError as err:
            return ReloadResult(INVALID, str(err))
        old = self._live.current
        draining = {r.name for r in self._scheduler.replicas if r.state == DRAINING}
        changes = plan(old, new, draining=draining | self._retiring,
                       taken=set(self.discovered()))
        if changes.refused:
            return ReloadResult(REFUSED, changes.refusal())
        if self.resolve is not None:
            try:
                new = await self.resolve(new, old)
            except (OSError, ValueError) as err:  # an embedded engine could not start
                return ReloadResult(FAILED, f"reload not applied: {err}")
        failures = []
        for callback in self._callbacks:
            try:
                callback(new)
            except ConfigError as err:
                # What only the component can check (a keys file re-read): refused before
                # the replicas, queue and probes change (callbacks that can refuse are
                # registered first: create_app's before serve's logging ones).
                return ReloadResult(INVALID, str(err))
            except Exception as err:
                log.exception("a component failed to apply the reloaded config")
                failures.append(f"{type(err).__name__}: {err}")
        self._apply(new, changes)
        if failures:
            return ReloadResult(FAILED, "reload applied except: " + "; ".join(failures))
        return ReloadResult(SUCCESS, changes.summary())

    def _apply(self, new: Config, changes: Plan) -> None:
        """Synchronous on purpose: no request runs between the first change and the last."""
        scheduler = self._scheduler
        health = self._health
        # 1. Per-request reads (queue.timeout_s, upstream.retries, ...) see the new config.
        self._live.current = new
        # 2. Queue bounds: lowered below what waits now drops nobody; new arrivals are
        #    refused until the queue is under it.
        scheduler.max_queue = new.queue.max_size
        scheduler.max_bytes = new.queue.max_bytes
        # 3. Added replicas: waiters are granted their slots at once, and their tasks run
        #    after this synchronous step, when the pools, counters and probes exist.
        by_name = {r.name: r for r in new.replicas}
        for added in changes.added:
            self.add_replica(added.name, by_name[added.name].url or "", added.max_concurrency,
                             healthy=new.health.assume_healthy_at_start, entry=added)
        # 3b. Models and token budgets of replicas that stay: waiters they now serve (or now
        #     fit) are granted at once; those nobody can serve any more are told so.
        for routed in changes.routes:
            self.set_routing(routed.name, routed)
        # 4. Caps: raised, waiters are granted at once; lowered, nothing new is dispatched to
        #    the replica until its work in flight is under the new cap.
        for name, _, cap in changes.limits:
            self.set_limit(name, cap)
        # 5. Removed replicas take no new work from now; each leaves (retired) when its last
        #    request is done, at once if it holds none.
        for name in changes.removed:
            self.remove_replica(name, "removed from the config")
        # 6. Probes (and passive ejection) follow the new settings.
        if changes.changed & {"health", "upstream"} and health is not None:
            health.reconfigure(new.health, new.upstream)

    # -- the replica set's changes, shared with discovery (proxy.control.discovery) ---------
    # Each is synchronous: a caller that makes several changes makes them in one step.

    def add_replica(self, name: str, url: str, max_concurrency: int, *, healthy: bool,
                    entry: ReplicaConfig | DiscoveryConfig | None = None) -> None:
        """A new replica with its counters, slots, pools and probes (``healthy=False``: it
        takes work after its first passing probe). The name must be free (:meth:`name_free`).
        ``entry``: its config (or its discovery entry's), for its models and token budget.
        """
        scheduler = self._scheduler
        self._metrics.add_replica(name)
        routing = replica_routing(entry) if entry is not None else ReplicaRouting(
            models=None, models_pending=False, max_tokens=None)
        scheduler.add_replica(name, url, max_concurrency, healthy=healthy, **routing)
        replica = scheduler.replica(name)
        assert replica is not None
        if self._pools is not None:
            self._pools.add(replica)
        if self._health is not None:
            # Before its first probe, which reads an `auto` list at once.
            self._health.watch_models(name, routing["models_pending"])
            self._health.add(replica)
        for callback in self._add_callbacks:
            callback(replica)

    def set_routing(self, name: str, entry: ReplicaConfig | DiscoveryConfig) -> None:
        """New ``models`` or ``max_tokens_in_flight`` for a replica that stays. A list (or
        none) applies at once; ``auto`` keeps what it serves until its next probe reads it."""
        replica = self._scheduler.replica(name)
        if replica is None:
            return
        routing = replica_routing(entry)
        if not routing["models_pending"] and replica.models != routing["models"]:
            self._scheduler.set_models(replica, routing["models"])
        if replica.max_tokens != routing["max_tokens"]:
            self._scheduler.set_token_limit(replica, routing["max_tokens"])
        if self._health is not None:
            self._health.watch_models(name, routing["models_pending"])

    def set_limit(self, name: str, max_concurrency: int) -> None:
        replica = self._scheduler.replica(name)
        if replica is None:
            return
        if self._pools is not None:
            self._pools.set_limit(name, max_concurrency)
        self._scheduler.set_limit(replica, max_concurrency)

    def remove_replica(self, name: str, why: str) -> None:
        """No new work for the replica from now; it is retired once its last request is done
        (at once if it holds none). ``why``: for the log."""
        replica = self._scheduler.replica(name)
        if replica is not None and not self._scheduler.remove_replica(replica):
            log.info("replica %s %s: finishing its %d requests", name, why, replica.in_flight)

    def name_free(self, name: str) -> bool:
        """No replica has this name, nor is one of that name still being retired."""
        return self._scheduler.replica(name) is None and name not in self._retiring

    def retired(self, replica: Replica) -> None:
        """The scheduler's ``on_retired``: a removed replica's last slot came back. It goes
        once its last slot-free request (GET, HEAD, OPTIONS) is done too.

        Each is called from a release inside that request's ``finally``: the request's own
        bookkeeping (its counters, with this replica's label) runs right after, in the same
        step of its task, so what follows waits for the next turn of the loop.
        """
        loop = asyncio.get_running_loop()
        slot_free = self._slot_free
        self._retiring.add(replica.name)

        def when_slot_free_idle() -> None:
            loop.call_soon(self._retire, replica)

        if slot_free is None:
            when_slot_free_idle()
        else:
            slot_free.when_idle(replica.name, when_slot_free_idle)

    def _retire(self, replica: Replica) -> None:
        """Never raises: it runs as a loop callback."""
        try:
            if self._pools is not None:
                self._pools.retire(replica.name)
            if self._health is not None:
                self._health.remove(replica)
            self._metrics.remove_replica(replica.name)
            for callback in self._retire_callbacks:
                callback(replica.name)
        except Exception:
            log.exception("retiring replica %s failed", replica.name)
        finally:
            self._retiring.discard(replica.name)
        log.info("replica %s is gone (removed, its last request done)", replica.name)
