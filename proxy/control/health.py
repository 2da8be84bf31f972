"""Health: active probes, passive outlier ejection and the wedged-engine cut, per replica.

* **Probes:** ``health.method`` ``health.path`` (with ``health.body`` as JSON) on every replica,
  at startup and then every ``health.interval_s`` jittered by ±10 % (replicas are not probed
  in lock-step). ``health.unhealthy_after`` failed probes in a row take a replica out,
  ``health.healthy_after`` passes in a row bring it back (a replica that starts unhealthy,
  ``assume_healthy_at_start: false``, comes in on its first pass).
* **Outliers:** every real request's end is fed to :meth:`HealthChecker.observe`; the policy
  (:mod:`proxy.core.outlier`) decides ejections. An ejected replica is probed the moment its
  ejection is over and comes back on the first pass.
* **Stalls:** a replica whose event streams have all been silent for ``health.stall_s`` is
  marked unhealthy and those streams are cut (:mod:`proxy.control.stall`).

Every state change goes through the scheduler, so a replica that comes back is given waiting
requests at that very moment. Time is injected (:class:`Timing`): tests drive it by hand.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any

import aiohttp

from proxy.config import HealthConfig, UpstreamConfig
from proxy.control.models import Credentials, read_models
from proxy.control.stall import StallWatch
from proxy.core.outlier import OutlierDetector
from proxy.core.replicas import EJECTED, Replica
from proxy.core.scheduler import Scheduler
from proxy.observe.exchange import ExchangeView, Outcome
from proxy.observe.metrics import Metrics

log = logging.getLogger("batchgate.health")

#: Upstream error kinds that count as a replica's failure for outlier ejection (with a 5xx
#: answer). A caller's hang-up or batchgate's own rejection says nothing about the replica.
FAILURE_KINDS = frozenset({"connect", "timeout", "reset"})

#: Each probe interval is the configured one times a factor in [1 - JITTER, 1 + JITTER).
JITTER = 0.1


@dataclass(frozen=True, slots=True)
class Timing:
    """Where the health checker gets its time: real by default, a fake in tests."""

    monotonic: Callable[[], float] = time.monotonic  # decisions (ejections, stalls)
    wall: Callable[[], float] = time.time  # only what is shown: ``Replica.ejected_until``
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rng: Callable[[], float] = random.random  # [0, 1): the jitter


def probe_delay(interval_s: float, rng: Callable[[], float]) -> float:
    """The wait before the next probe: ``interval_s`` ±10 %."""
    return interval_s * (1.0 - JITTER + 2.0 * JITTER * rng())


# Read once: ``Outcome.X`` goes through EnumType.__getattr__'s slot (~200 ns each).
_OK, _UPSTREAM_ERROR, _CLIENT_DISCONNECT = (
    Outcome.OK, Outcome.UPSTREAM_ERROR, Outcome.CLIENT_DISCONNECT)


def request_failed(exchange: ExchangeView) -> bool | None:
    """What one finished request says about its replica: True failed, False fine, None
    nothing (no replica answered it, the caller left before it did, batchgate refused it)."""
    outcome = exchange.outcome
    if outcome is _UPSTREAM_ERROR:
        return True if exchange.detail in FAILURE_KINDS else None
    if outcome is _OK or outcome is _CLIENT_DISCONNECT:
        status = exchange.status
        return None if status is None else status >= 500
    return None


class _Track:
    """One replica's probe streak and the tasks that probe it."""

    __slots__ = ("due", "fails", "first", "passes", "probed", "replica", "seen_up", "tasks")

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.passes = 0
        self.fails = 0
        self.probed = 0  # verdicts applied, for tests and logs
        self.seen_up = replica.up
        self.first = not replica.up  # started unhealthy: the first pass brings it in
        self.due = False  # its ejection's time is up (set by the timer that probes then)
        self.tasks: set[asyncio.Task[None]] = set()


class HealthChecker:
    """Probe loops, the outlier policy and the stall watch; tasks owned here and cancelled in
    :meth:`close` (or :meth:`remove` for one replica).

    Probes use aiohttp's client: they run once per ``interval_s``, off the hot path, and need
    none of the lean pool's streaming. Requests that callers send (slot-free GETs included)
    always go through :mod:`proxy.upstream`, so they are relayed byte for byte.

    For live reload: :meth:`add` and :meth:`remove` a replica (after the scheduler did), and
    :meth:`reconfigure` with a new ``health`` (and ``upstream``, for the ejection limits).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        config: HealthConfig,
        *,
        upstream: UpstreamConfig | None = None,
        ssl: SSLContext | None = None,
        timing: Timing | None = None,
        metrics: Metrics | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self._scheduler = scheduler
        #: Replicas with ``models: auto``: their /v1/models is read after each probe, with
        #: the credential a request to them carries (proxy.control.models).
        self.auto_models: set[str] = set()
        self._credentials = credentials
        self.model_reads = 0  # lists read and applied, for tests
        self.model_read_failures = 0  # reads that failed (the last list stayed)
        self._timing = timing if timing is not None else Timing()
        self._metrics = metrics
        upstream = upstream if upstream is not None else UpstreamConfig()
        self.outliers = OutlierDetector(
            upstream.eject_after, upstream.eject_s, upstream.max_ejected_percent
        )
        self.stalls = StallWatch(self._timing.monotonic)
        self._session = aiohttp.ClientSession(
            # The same TLS context as the pools (proxy.upstream.tls); aiohttp sends the URL's
            # host as SNI and checks the certificate against it.
            connector=aiohttp.TCPConnector(limit=0, force_close=True,
                                           ssl=ssl if ssl is not None else True),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        )
        self._tracks: dict[str, _Track] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._started = False
        self.looks = 0  # stall checks done, for tests
        #: Why each replica's last probe failed, for the log line when its state changes
        #: (a certificate the CA does not know, a refused connection, a status code).
        self.why: dict[str, str] = {}
        self.reconfigure(config)

    # -- lifetime ------------------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        for replica in self._scheduler.replicas:
            self.add(replica)
        self._watchdog = asyncio.create_task(self._watch_stalls(), name="health:stalls")

    def add(self, replica: Replica) -> None:
        """Probe ``replica`` from now (at once, then every interval); idempotent."""
        if replica.name in self._tracks:
            return
        track = self._tracks[replica.name] = _Track(replica)
        if self._started:
            self._spawn(track, self._loop(track), f"health:probe:{replica.name}")

    def remove(self, replica: Replica) -> None:
        """Stop probing ``replica`` and forget its record (its streams stay watched)."""
        track = self._tracks.pop(replica.name, None)
        if track is None:
            return
        for task in track.tasks:
            task.cancel()
        self.outliers.forget(replica.name)
        self.why.pop(replica.name, None)
        self.auto_models.discard(replica.name)

    def watch_models(self, name: str, auto: bool) -> None:
        """Read replica ``name``'s model list with each probe from now (``auto``), or no more."""
        if auto:
            self.auto_models.add(name)
        else:
            self.auto_models.discard(name)

    def reconfigure(self, config: HealthConfig, upstream: UpstreamConfig | None = None) -> None:
        """New health settings (a reload): every replica is probed with them at once (a new
        path or method is judged now, not an old interval later); the streaks carry on."""
        restart = self._started and getattr(self, "config", config) != config
        self.config = config
        self._probe_timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self._probe_body = None if config.body is None else json.dumps(config.body).encode()
        if upstream is not None:
            self.outliers.configure(
                upstream.eject_after, upstream.eject_s, upstream.max_ejected_percent
            )
        if restart:
            for track in self._tracks.values():
                for task in [t for t in track.tasks if t.get_name().startswith("health:probe:")]:
                    task.cancel()
                self._spawn(track, self._loop(track), f"health:probe:{track.replica.name}")

    async def close(self) -> None:
        tasks = [task for track in self._tracks.values() for task in track.tasks]
        if self._watchdog is not None:
            tasks.append(self._watchdog)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tracks.clear()
        self._watchdog = None
        await self._session.close()

    def probes(self, replica: Replica) -> int:
        """How many probe verdicts have been applied to ``replica``."""
        track = self._tracks.get(replica.name)
        return 0 if track is None else track.probed

    # -- probes --------------------------------------------------------------------------

    async def probe(self, replica: Replica) -> bool | None:
        """True or False: the replica's verdict; None: we could not ask (out of descriptors)."""
        config = self.config
        try:
            async with self._session.request(
                config.method, replica.url + config.path, data=self._probe_body,
                headers=None if self._probe_body is None else _JSON,
                timeout=self._probe_timeout,
            ) as response:
                await response.read()
                self.why[replica.name] = f"{config.path} answered {response.status}"
                return 200 <= response.status < 300
        except aiohttp.ClientConnectorError as err:
            if err.os_error.errno in (errno.EMFILE, errno.ENFILE):
                return None  # our own exhaustion says nothing about the replica
            self.why[replica.name] = str(err)
            return False
        except (aiohttp.ClientError, TimeoutError) as err:
            self.why[replica.name] = str(err) or type(err).__name__
            return False

    async def _loop(self, track: _Track) -> None:
        while True:
            await self._probe_and_apply(track)
            await self._timing.sleep(probe_delay(self.config.interval_s, self._timing.rng))

    async def _probe_and_apply(self, track: _Track) -> None:
        verdict = await self.probe(track.replica)
        if verdict is None:
            log.warning("replica %s not probed: batchgate is out of file descriptors",
                        track.replica.name)
        else:
            self.apply(track.replica, verdict)
        if track.replica.name in self.auto_models:
            await self.read_models(track.replica)

    async def read_models(self, replica: Replica) -> None:
        """Read ``replica``'s ``GET /v1/models`` and route its models to it; a failed read
        keeps the last list (proxy.control.models)."""
        headers = [] if self._credentials is None else self._credentials(replica.name, [])
        ids = await read_models(self._session, replica.url, headers, self._probe_timeout)
        track = self._tracks.get(replica.name)
        if track is None or track.replica is not replica or replica.name not in self.auto_models:
            return  # removed, or no longer `auto`, while the read was out
        if ids is None:
            self.model_read_failures += 1
            log.debug("replica %s: GET /v1/models failed; its last list stays", replica.name)
            return
        if replica.models_pending or replica.models != ids:
            log.info("replica %s serves %s", replica.name, ", ".join(sorted(ids)) or "no model")
            self._scheduler.set_models(replica, ids)  # its grants are told already
        self.model_reads += 1

    def apply(self, replica: Replica, passed: bool) -> None:
        """One probe's verdict on ``replica``: count it, and change its state if due."""
        track = self._tracks.get(replica.name)
        if track is None or track.replica is not replica:
            return  # removed while the probe was out
        track.probed += 1
        if replica.up != track.seen_up:
            # Marked down meanwhile by a refused connection or a stall: a fresh streak.
            track.passes = track.fails = 0
        if passed:
            track.passes += 1
            track.fails = 0
        else:
            track.fails += 1
            track.passes = 0
        if replica.ejected_until is not None and passed and (
            track.due or self.outliers.is_over(replica.name, self._timing.monotonic())
        ):
            track.due = False
            self.outliers.lift(replica.name, self._timing.monotonic())
            self._scheduler.set_ejected(replica, None)
            log.warning("replica %s is back from ejection%s", replica.name,
                        "" if replica.up else " but its probes still fail")
        if replica.up and not passed and track.fails >= self.config.unhealthy_after:
            self._scheduler.set_healthy(replica, False)
            log.warning("replica %s is now unhealthy: %s", replica.name,
                        self.why.get(replica.name, ""))
        elif not replica.up and passed and (track.first
                                            or track.passes >= self.config.healthy_after):
            self._scheduler.set_healthy(replica, True)
            log.warning("replica %s is now %s", replica.name, replica.health)
        if passed:
            track.first = False
        track.seen_up = replica.up

    # -- outliers ------------------------------------------------------------------------

    def observe(self, exchange: ExchangeView) -> None:
        """A request ended: its result counts for (or against) the replica that answered it."""
        name = exchange.replica
        if name is None:
            return
        failed = request_failed(exchange)
        if failed is None:
            return
        if not failed:
            self.outliers.success(name)
            return
        track = self._tracks.get(name)
        if track is None or not track.replica.healthy:
            return  # already out: its last requests failing decide nothing
        duration = self.outliers.failure(
            name, self._timing.monotonic(), len(self._scheduler.replicas)
        )
        if duration is not None:
            self._eject(track, duration)

    def _eject(self, track: _Track, duration: float) -> None:
        replica = track.replica
        self._scheduler.set_ejected(replica, self._timing.wall() + duration)
        track.due = False
        if self._metrics is not None:
            self._metrics.ejected(replica.name)
        log.warning("replica %s ejected for %gs: %d real requests in a row failed",
                    replica.name, duration, self.outliers.eject_after)
        self._spawn(track, self._after_ejection(track, duration), f"health:eject:{replica.name}")

    async def _after_ejection(self, track: _Track, duration: float) -> None:
        await self._timing.sleep(duration)
        if track.replica.health == EJECTED:
            track.due = True
            await self._probe_and_apply(track)

    # -- stalls --------------------------------------------------------------------------

    async def _watch_stalls(self) -> None:
        while True:
            config = self.config
            await self._timing.sleep(min(config.interval_s, config.stall_s / 4))
            self.check_stalls()

    def check_stalls(self) -> None:
        """Mark every replica whose streams all stalled unhealthy, and cut those streams."""
        stall_s = self.config.stall_s
        self.looks += 1
        for replica, streams in self.stalls.stalled(stall_s):
            log.warning("replica %s is wedged: none of its %d streams produced a byte for "
                        "%gs (health.stall_s); marked unhealthy, streams cut",
                        replica.name, len(streams), stall_s)
            self._scheduler.set_healthy(replica, False)
            track = self._tracks.get(replica.name)
            if track is not None:
                track.passes = track.fails = 0
                track.seen_up = False
            message = (f"replica {replica.name} produced nothing for {stall_s:g}s "
                       "(health.stall_s); stream cut and replica marked unhealthy")
            for stream in streams:
                self.stalls.leave(stream)
                stream.exchange.cut_reason = message
                if self._metrics is not None:
                    self._metrics.upstream_error(replica.name, "timeout")
                stream.task.cancel()

    @staticmethod
    def _spawn(track: _Track, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        track.tasks.add(task)
        task.add_done_callback(track.tasks.discard)


_JSON = {"Content-Type": "application/json"}
