"""Adaptive caps: one loop per replica with ``adaptive``, moving its cap with its engine's load.

Every ``adaptive.interval_s`` (±10 %, as the health probes: replicas are not read in
lock-step) the loop has read the replica's ``/metrics`` :data:`SAMPLES` times, evenly over the
interval (:mod:`proxy.control.enginemetrics` reads each; :func:`~proxy.core.adaptive.merge`
keeps the smallest queue), asks the rule (:func:`proxy.core.adaptive.next_cap`) for the next
cap and applies it through the scheduler: a raised cap grants waiters their slots in that very
step; a lowered one cuts nothing, the replica gets no new work until it is under it.

What always holds:

* the cap stays within ``[adaptive.min, adaptive.max]``;
* a metrics endpoint that fails (refused, timeout, an answer other than 200, a body that
  does not parse, none of the known series) freezes the cap where it is, never drops it:
  counted in ``batchgate_adaptive_scrape_errors_total{replica}``, logged once when it starts
  failing (warning) and once when it reads again (info);
* a replica that takes no work (unhealthy, ejected, draining) keeps its cap: what its
  engine says then is about a state the cap does not cause;
* a cap set by someone else (a reload that changes ``max_concurrency``) is taken as the new
  start: the rule forgets what it learned.

Which replicas have a loop follows the config in force: :meth:`AdaptiveCaps.add` (a replica
added, by the Reloader or discovery), :meth:`AdaptiveCaps.reconfigure` (a reload: loops of
staying replicas start, stop or take new settings), :meth:`AdaptiveCaps.remove` (retired).
Time is injected (:class:`~proxy.control.health.Timing`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from ssl import SSLContext
from typing import Protocol

import aiohttp
from aiohttp import web

from proxy.config import AdaptiveConfig, Config
from proxy.control.enginemetrics import MAX_BODY_BYTES, parse
from proxy.control.health import Timing, probe_delay
from proxy.core.adaptive import CapState, EngineReading, merge, next_cap
from proxy.core.replicas import Replica
from proxy.core.scheduler import Scheduler
from proxy.observe.metrics import Metrics

log = logging.getLogger("batchgate.adaptive")

METRICS_PATH = "/metrics"
#: Scrapes per reading, spread over the interval: the rule sees their smallest queue. A
#: request that arrives while the engine is mid-step waits for the next step (tens of ms),
#: so one scrape in three shows a "queue" on an engine with room; a standing queue is in
#: every sample.
SAMPLES = 4
#: The longest one scrape may take: the interval, within these bounds (a slow scrape only
#: delays the next one; the loop never runs two at once).
SCRAPE_TIMEOUT_S = 5.0
MIN_TIMEOUT_S = 2.0  # an engine's API server under load can be slow to render its /metrics

#: The credential headers a replica gets (proxy.edge.auth.KeyRing.upstream_headers).
Credentials = Callable[[str, list[tuple[str, str]]], list[tuple[str, str]]]


class Pools(Protocol):
    """The replica pools (:class:`proxy.upstream.client.Upstreams`): sized for the top cap."""

    def set_limit(self, replica: str, max_concurrency: int) -> None: ...


def adaptive_of(config: Config, name: str) -> AdaptiveConfig | None:
    """The ``adaptive`` settings of replica ``name`` in ``config``: its own, or its discovery
    entry's (a found replica is ``<name_prefix>-<address>``; prefixes may prefix each other,
    the address part decides)."""
    for replica in config.replicas:
        if replica.name == name:
            return replica.adaptive
    for entry in config.discovery:
        prefix = entry.name_prefix + "-"
        if entry.adaptive is not None and name.startswith(prefix):
            try:
                ipaddress.ip_address(name[len(prefix):])
            except ValueError:
                continue
            return entry.adaptive
    return None


def waiters_for(scheduler: Scheduler, replica: Replica) -> int:
    """Batchgate's waiters that ``replica`` could take: those of the models it serves (and
    those naming none). Waiters for a model it does not serve say nothing about its cap."""
    return sum(count for (_, model), count in scheduler.depths().items()
               if model is None or replica.serves(model))


class ScrapeError(Exception):
    """The engine's metrics could not be read; ``str()`` says why (for the log)."""


@dataclass(slots=True)
class _Track:
    replica: Replica
    settings: AdaptiveConfig
    state: CapState
    task: asyncio.Task[None] | None = None
    failing: bool = False
    readings: int = 0  # readings applied, for tests


class AdaptiveCaps:
    """The loops, owned here (:meth:`close` cancels them). ``config``: the config in force
    (read when a replica is added); ``pools``: sized to ``adaptive.max`` while a loop runs."""

    def __init__(
        self,
        scheduler: Scheduler,
        config: Callable[[], Config],
        metrics: Metrics,
        *,
        pools: Pools | None = None,
        ssl: SSLContext | None = None,
        credentials: Credentials | None = None,
        timing: Timing | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._config = config
        self._metrics = metrics
        self._pools = pools
        self._credentials = credentials
        self._timing = timing if timing is not None else Timing()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True,
                                           ssl=ssl if ssl is not None else True),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._tracks: dict[str, _Track] = {}
        self._started = False

    def start(self) -> None:
        self._started = True
        for replica in self._scheduler.replicas:
            self.add(replica)

    def add(self, replica: Replica) -> None:
        """Start the loop of ``replica`` if the config in force makes it adaptive."""
        settings = adaptive_of(self._config(), replica.name)
        if settings is not None and self._started:
            self._run(replica, settings)

    def remove(self, name: str) -> None:
        """Stop the loop of a replica that is gone; its series go with it."""
        track = self._tracks.pop(name, None)
        if track is not None and track.task is not None:
            track.task.cancel()
        self._metrics.adaptive_forget(name)

    def reconfigure(self, new: Config) -> None:
        """A reload: the replicas that stay follow their new ``adaptive`` (a loop starts,
        stops, or goes on with the new range and interval)."""
        if not self._started:
            return
        for replica in self._scheduler.replicas:
            settings = adaptive_of(new, replica.name)
            track = self._tracks.get(replica.name)
            if settings is None:
                if track is not None:
                    self._stop(track)
            elif track is None:
                self._run(replica, settings)
            else:
                track.settings = settings

    def _run(self, replica: Replica, settings: AdaptiveConfig) -> None:
        old = self._tracks.get(replica.name)
        if old is not None:
            if old.replica is replica:
                old.settings = settings
                return
            self._stop(old)
        track = self._tracks[replica.name] = _Track(
            replica, settings, CapState(replica.max_concurrency))
        self._metrics.adaptive_watch(replica.name)
        if self._pools is not None:
            # Connections open on demand: a limit at the top cap costs nothing until used,
            # and a cap that comes down and up again finds its idle connections still there.
            self._pools.set_limit(replica.name, settings.max)
        track.task = asyncio.get_running_loop().create_task(
            self._loop(track), name=f"adaptive:{replica.name}")

    def _stop(self, track: _Track) -> None:
        """``adaptive`` was taken off a replica (or it is being removed): its cap stays."""
        del self._tracks[track.replica.name]
        if track.task is not None:
            track.task.cancel()
        self._metrics.adaptive_forget(track.replica.name)
        if self._pools is not None:
            self._pools.set_limit(track.replica.name, track.replica.max_concurrency)
        log.info("replica %s: adaptive cap stopped (adaptive off, or the replica left the "
                 "config); its cap stays at %d", track.replica.name,
                 track.replica.max_concurrency)

    async def close(self) -> None:
        tasks = [t.task for t in self._tracks.values() if t.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tracks.clear()
        await self._session.close()

    def state(self, name: str) -> CapState | None:
        """The rule's state for replica ``name`` (None: not adaptive), for tests and logs."""
        track = self._tracks.get(name)
        return None if track is None else track.state

    def describe(self, name: str) -> dict[str, object] | None:
        """What ``/admin/replicas`` shows of replica ``name``'s loop (None: not adaptive)."""
        track = self._tracks.get(name)
        if track is None:
            return None
        settings, state = track.settings, track.state
        return {"min": settings.min, "max": settings.max, "interval_s": settings.interval_s,
                "last": state.why, "reading": not track.failing}

    def readings(self, name: str) -> int:
        track = self._tracks.get(name)
        return 0 if track is None else track.readings

    # -- one reading ---------------------------------------------------------------------

    async def _loop(self, track: _Track) -> None:
        while True:
            try:
                await self.step(track.replica.name)
            except Exception:
                # A bug here must not end the loop for good: the cap stays, the next reading
                # tries again, and the fault is counted.
                log.exception("adaptive cap of %s failed (a bug)", track.replica.name)
                self._metrics.internal_error("adaptive")
            await self._pause(track)

    async def _pause(self, track: _Track) -> None:
        """The wait before the next sample: the interval over SAMPLES, jittered."""
        spacing = track.settings.interval_s / SAMPLES
        await self._timing.sleep(probe_delay(spacing, self._timing.rng))

    async def read(self, track: _Track) -> EngineReading:
        """One reading: SAMPLES scrapes, spaced over the interval, merged."""
        samples = [await self.scrape(track.replica, track.settings)]
        for _ in range(SAMPLES - 1):
            await self._pause(track)
            samples.append(await self.scrape(track.replica, track.settings))
        return merge(samples)

    async def step(self, name: str) -> CapState | None:
        """Read the engine of replica ``name`` once and apply the rule; the new state."""
        track = self._tracks.get(name)
        if track is None:
            return None
        try:
            engine = await self.read(track)
        except ScrapeError as err:
            self._metrics.adaptive_scrape_error(name)
            if not track.failing:
                track.failing = True
                log.warning("replica %s: cannot read its engine's metrics, its cap stays at "
                            "%d: %s", name, track.replica.max_concurrency, err)
            # A queue must be seen in two readings in a row, not across a gap.
            track.state = replace(track.state, waiting=None, why="frozen: no reading")
            return track.state
        if self._tracks.get(name) is not track:
            return None  # removed or replaced while the scrape was out
        if track.failing:
            track.failing = False
            log.info("replica %s: its engine's metrics read again", name)
        return self.apply(track, engine)

    def apply(self, track: _Track, engine: EngineReading) -> CapState:
        replica, settings = track.replica, track.settings
        if engine.waiting is not None:
            self._metrics.adaptive_reading(replica.name, engine.waiting)
        track.readings += 1
        state = track.state
        if state.cap != replica.max_concurrency:
            # Set from outside (a reload's max_concurrency): a new start; its pool was resized
            # to that cap, give it back the room of the top one.
            state = CapState(replica.max_concurrency)
            if self._pools is not None:
                self._pools.set_limit(replica.name, max(settings.max, state.cap))
        if not replica.takes_work:
            track.state = CapState(replica.max_concurrency, why="hold: takes no work")
            return track.state
        state = next_cap(state, low=settings.min, high=settings.max,
                         waiters=waiters_for(self._scheduler, replica),
                         in_flight=replica.in_flight, engine=engine)
        track.state = state
        if state.cap != replica.max_concurrency:
            log.debug("replica %s: cap %d -> %d (%s; engine waiting %s, running %s, kv %s)",
                      replica.name, replica.max_concurrency, state.cap, state.why,
                      engine.waiting, engine.running, engine.kv_usage)
            if self._pools is not None:
                self._pools.set_limit(replica.name, max(settings.max, state.cap))
            # The grants are delivered by the scheduler itself (each waiter's notify).
            self._scheduler.set_limit(replica, state.cap)
        return state

    async def scrape(self, replica: Replica, settings: AdaptiveConfig) -> EngineReading:
        """GET the replica's ``/metrics`` and read it; :class:`ScrapeError` if that fails."""
        headers: list[tuple[str, str]] = []
        if self._credentials is not None:
            headers = self._credentials(replica.name, headers)
        timeout = aiohttp.ClientTimeout(
            total=min(SCRAPE_TIMEOUT_S, max(MIN_TIMEOUT_S, settings.interval_s)))
        try:
            async with self._session.get(replica.url + METRICS_PATH, headers=headers,
                                         timeout=timeout) as response:
                if response.status != 200:
                    raise ScrapeError(f"{METRICS_PATH} answered {response.status}")
                chunks, size = [], 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise ScrapeError(
                            f"{METRICS_PATH} is larger than {MAX_BODY_BYTES} bytes")
                    chunks.append(chunk)
                body = b"".join(chunks)
        except (aiohttp.ClientError, TimeoutError) as err:
            raise ScrapeError(str(err) or type(err).__name__) from None
        try:
            return parse(body.decode("utf-8", "replace"))
        except ValueError as err:
            raise ScrapeError(f"{METRICS_PATH} does not read as Prometheus text: {err}"
                              ) from None


#: The app's adaptive caps (typed state, set by proxy.edge.app), for tests and introspection.
ADAPTIVE = web.AppKey("adaptive", AdaptiveCaps)
