"""Running the proxy: embedded simulated replicas, the listeners, reload, graceful shutdown.

aiohttp's ``run_app`` closes the listener first on SIGTERM. Kubernetes needs the opposite: keep
answering (readiness 503, new work still served for a quiet period, then 503) while endpoints
are withdrawn and in-flight work finishes. So the lifecycle is driven here, explicitly
(the drain itself: :mod:`proxy.control.drain`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

from aiohttp import web

from proxy.config import Config, ReplicaConfig
from proxy.control.drain import CUT_GRACE_S, first_of
from proxy.edge.admin import create_admin_app
from proxy.edge.app import CONFIG, LIFECYCLE, RELOADER, create_app
from proxy.edge.protocol import LimitedRunner
from proxy.observe.accesslog import AccessLog

log = logging.getLogger("batchgate")


def _bound_port(runner: web.AppRunner) -> int:
    address = runner.addresses[0]
    return int(address[1])


class CannotListen(Exception):
    """A listener could not bind; ``str(err)`` is the one line to print (the CLI exits 1)."""


class EmbeddedEngines:
    """An in-process simulated engine for every ``simulated:`` replica.

    Each listens on an ephemeral loopback port, and the config is given their URLs
    (:meth:`resolve`), so the rest of the proxy treats them exactly like remote engines. A
    reload that adds one starts it; one whose replica is gone is stopped (:meth:`stop`).
    """

    def __init__(self) -> None:
        self._runners: dict[str, web.AppRunner] = {}
        self._stopping: set[asyncio.Task[None]] = set()

    async def resolve(self, config: Config, running: Config | None = None) -> Config:
        """``config`` with every simulated replica's URL filled in: the engine of the same
        replica in ``running`` (the config in force), or one started now."""
        current = {r.name: r for r in running.replicas} if running is not None else {}
        replicas = []
        for replica in config.replicas:
            if replica.simulated is None:
                replicas.append(replica)
                continue
            was = current.get(replica.name)
            if was is not None and was.simulated == replica.simulated and was.url:
                url = was.url
            else:
                url = await self._start(replica)
            replicas.append(dataclasses.replace(replica, url=url))
        return dataclasses.replace(config, replicas=tuple(replicas))

    async def _start(self, replica: ReplicaConfig) -> str:
        assert replica.simulated is not None
        # Imported only here: a proxy of real engines never loads the simulator.
        from proxy.sim.server import create_sim_app

        runner = web.AppRunner(
            create_sim_app(replica.simulated, model=replica.name),
            handler_cancellation=True,
            access_log=None,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
        except BaseException:
            await runner.cleanup()
            raise
        url = f"http://127.0.0.1:{_bound_port(runner)}"
        self._runners[replica.name] = runner
        log.info("replica %s: simulated engine at %s", replica.name, url)
        return url

    def stop(self, name: str) -> None:
        """The replica is gone (its last request done): stop its engine, if it has one."""
        runner = self._runners.pop(name, None)
        if runner is not None:
            task = asyncio.get_running_loop().create_task(runner.cleanup())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        for runner in self._runners.values():
            await runner.cleanup()
        self._runners.clear()
        await asyncio.gather(*self._stopping)


@asynccontextmanager
async def embedded_replicas(config: Config) -> AsyncIterator[Config]:
    """``config`` with its simulated engines running (and stopped at the end)."""
    engines = EmbeddedEngines()
    try:
        yield await engines.resolve(config)
    finally:
        await engines.close()


def _reconfigure_access_log(access_log: AccessLog) -> Callable[[Config], None]:
    def apply(config: Config) -> None:
        access_log.reconfigure(config.logging.format,
                               enabled=config.logging.level in ("debug", "info"))

    return apply


async def serve(
    config: Config,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str, int], None] | None = None,
    on_second_signal: Callable[[signal.Signals], None] | None = None,
    load: Callable[[], Config] | None = None,
    on_reload: Sequence[Callable[[Config], None]] = (),
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then drain and return; or until a drain
    started by ``GET /wait-for-drain`` is over (a signal during it joins it).

    A second SIGTERM/SIGINT during the drain calls ``on_second_signal`` (the CLI exits the
    process there and then: an operator who asks twice does not want to wait for the drain).
    SIGHUP reloads: ``load`` reads the config file again (see :mod:`proxy.control.reload`);
    ``on_reload`` are called with each config a reload applies (the CLI's logging setup).
    Raises :class:`CannotListen` when a listener cannot bind.
    """
    loop = asyncio.get_running_loop()
    stop = stop if stop is not None else asyncio.Event()
    stop_requested = stop
    why = ["stop requested"]  # what started the drain, for its log line

    def on_signal(sig: signal.Signals) -> None:
        # Only signals count: one that arrives during a drain begun by GET /wait-for-drain
        # is the first, and joins it.
        if stop_requested.is_set() and on_second_signal is not None:
            on_second_signal(sig)
            return
        why[0] = sig.name
        stop_requested.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    # SIGHUP's default action ends the process: it is handled from the start, and acted on
    # once the proxy is up (reloads run one at a time; each is owned and awaited below).
    reloads: set[asyncio.Task[object]] = set()
    serving: list[web.Application] = []

    def on_hangup() -> None:
        if not serving:
            log.warning("SIGHUP ignored: batchgate is not serving yet (or any more)")
            return
        task = loop.create_task(serving[0][RELOADER].reload("SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)

    # Always there, on or off per logging.level: a reload may turn it on.
    access_log = AccessLog(sys.stdout.buffer, config.logging.format)
    _reconfigure_access_log(access_log)(config)
    async with AsyncExitStack() as stack:
        stack.callback(access_log.close)
        engines = EmbeddedEngines()
        stack.push_async_callback(engines.close)
        config = await engines.resolve(config)
        app = create_app(config, access_log=access_log, load=load)
        reloader = app[RELOADER]
        reloader.resolve = engines.resolve
        reloader.on_retire(engines.stop)
        reloader.on_reload(_reconfigure_access_log(access_log))
        for callback in on_reload:
            reloader.on_reload(callback)
        # handler_cancellation: a caller that hangs up cancels its handler, which closes the
        # upstream connection, which makes the engine abort the generation.
        # auto_decompress=False (a keyword of aiohttp's request handler, through AppRunner's
        # kwargs): request bodies pass through byte for byte, Content-Encoding intact.
        # LimitedRunner: aiohttp's runner with server.*'s limits on callers (proxy.edge.protocol).
        runner = LimitedRunner(
            app, config.server, handler_cancellation=True, access_log=None,
            shutdown_timeout=CUT_GRACE_S, auto_decompress=False,
        )
        await runner.setup()
        admin_runner: web.AppRunner | None = None
        try:
            host, port = config.server.host, config.server.port
            await _listen(runner, host, port, "server.host, server.port", backlog=1024)
            port = _bound_port(runner)
            log.info("batchgate listening on http://%s:%d", host, port)
            if config.admin is not None:
                admin_runner = web.AppRunner(create_admin_app(app), access_log=None)
                await admin_runner.setup()
                await _listen(admin_runner, config.admin.host, config.admin.port,
                              "admin.host, admin.port")
                log.info("batchgate admin listening on http://%s:%d",
                         config.admin.host, _bound_port(admin_runner))
            serving.append(app)
            _freeze_startup_heap()
            if on_ready is not None:
                on_ready(host, port)
            await _until_drain(app, stop, why)
        finally:
            serving.clear()
            gc.unfreeze()
            for task in reloads:
                task.cancel()
            await asyncio.gather(*reloads, return_exceptions=True)
            # 5. Close the listeners and every connection, then the upstream pools and the
            #    health loops (the app's cleanup_ctx), then the embedded engines.
            if admin_runner is not None:
                await admin_runner.cleanup()
            await runner.cleanup()
    log.info("batchgate stopped")


def _freeze_startup_heap() -> None:
    """Take what startup built out of the cyclic collector's walks while the proxy serves.

    A full collection walks every tracked object: after startup some 50,000 (modules, config,
    the metric registry), a pause of about 9 ms on a 2-core bench machine, which alone breaks
    a 5 ms inter-event p99 for a thousand streams whenever it falls among them. Frozen, they
    are skipped (reference counting still frees them). Collected first, so no startup garbage
    is frozen with them.
    """
    gc.collect()
    gc.freeze()


async def _listen(
    runner: web.AppRunner, host: str, port: int, keys: str, *, backlog: int = 128
) -> None:
    try:
        await web.TCPSite(runner, host, port, backlog=backlog).start()
    except OSError as err:
        raise CannotListen(
            f"cannot listen on {host}:{port} ({keys}): {err.strerror or err}") from err


async def _until_drain(app: web.Application, stop: asyncio.Event, why: list[str]) -> None:
    """Serve until a signal (``stop``) or ``GET /wait-for-drain`` starts the drain, then
    until it is over. The listener stays open throughout; the checklist (fail readiness,
    the quiet period, refuse new work, serve what was accepted, cut at the deadline) is
    :meth:`Lifecycle.start_drain`'s.
    """
    lifecycle = app[LIFECYCLE]
    await first_of(stop.wait(), lifecycle.finished.wait())
    # Read now: a reload may have changed them. A drain begun by GET /wait-for-drain keeps
    # its own start and deadline: SIGTERM then only joins it.
    server = app[CONFIG].current.server
    lifecycle.start_drain(server.drain_quiet_s, server.drain_timeout_s, why[0])
    await lifecycle.finished.wait()
