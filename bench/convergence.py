"""The adaptive-cap convergence figure: ``batchgate sim --max-batch 16`` (``--time-scale 0.5``)
behind batchgate with ``adaptive: {min: 1, max: 128}``, against the same engine behind fixed
caps.

For each contestant (fixed ``max_concurrency`` 8, 12, 16, 20, 24, 32, then adaptive starting
at 8) one batchgate is started in front of the one engine, and ``batchgate bench``'s load
generator (:func:`proxy.bench.client.run_level`, closed loop) sends non-streamed 100-token
completions from 48 callers, three times the engine's batch, so batchgate always has
waiters. Tokens/s is read from the engine's own ``vllm:generation_tokens`` counter over a
steady window (after a warm-up; for adaptive, after the cap has settled: unchanged for five
readings), so no edge of the load (the first requests, the last stragglers) is in it. During
the window the engine's queue (``vllm:num_requests_waiting``) and batchgate's cap
(``batchgate_replica_max_concurrency``) are sampled four times a second.

Targets (issue 10): the cap settles at about 16, the engine's queue near 0, and tokens/s at
least 97 % of the best fixed cap's.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from typing import Any

import aiohttp
import contestants as cs
import yaml
from procs import Procs, free_port, wait_http

from proxy.bench.client import run_level
from proxy.bench.core import BenchOptions

MAX_BATCH = 16
CALLERS = 3 * MAX_BATCH
MAX_TOKENS = 100  # as the seed table's: a generation many steps long, as real ones are
#: Half the seed's step times (22 ms at a batch of 16): a 100-token request takes 2.2 s, so a
#: window holds several generations and the phase stays near a minute.
TIME_SCALE = 0.5
FIXED_CAPS = (8, 12, 16, 20, 24, 32)
START_CAP = 8
ADAPTIVE = {"min": 1, "max": 128}  # interval_s: the default, 1 s
TARGET_RATIO = 0.97
SAMPLE_S = 0.25
SETTLE_READINGS = 5  # the cap unchanged this many adaptive intervals in a row


async def _scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """name -> value (summed over label sets) of a /metrics text."""
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            values[name] = values.get(name, 0.0) + float(value)
    return values


def _start(procs: Procs, tmp: Any, sim_port: int, name: str, cap: int,
           adaptive: dict[str, Any] | None) -> cs.Target:
    port = free_port()
    settings = cs.ProxySettings(max_concurrency=cap, queue_max=1000, queue_timeout_s=600)
    config = cs.batchgate_config(sim_port, port, settings)
    # No quiet period on SIGTERM: the load has stopped by then, and the phase has seven stops.
    config["server"]["drain_quiet_s"] = 0  # type: ignore[index]
    replica = config["replicas"][0]  # type: ignore[index]
    if adaptive is not None:
        replica["adaptive"] = adaptive
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = procs.start(name, [str(cs.BIN / "batchgate"), "serve", "--config", str(path)])
    wait_http(f"http://127.0.0.1:{port}/readyz", proc)
    return cs.Target(name, port, proc)


async def _measure(sim: cs.Target, target: cs.Target, *, warm_s: float, window_s: float,
                   settle_s: float | None) -> dict[str, Any]:
    """Load ``target`` until the window is over; the figures of the window."""
    options = BenchOptions(max_tokens=MAX_TOKENS, stream=False, model="batchgate-sim",
                           duration_s=3600.0, timeout_s=600.0)
    load = asyncio.create_task(run_level(target.url, concurrency=CALLERS, rate=None,
                                         requests=None, options=options))
    started = time.monotonic()
    caps: list[float] = []
    settled_after = None
    async with aiohttp.ClientSession() as session:
        try:
            await asyncio.sleep(warm_s)
            if settle_s is not None:
                # Wait until the cap stays put for SETTLE_READINGS intervals (1 s each).
                history: list[float] = []
                while time.monotonic() - started < settle_s:
                    cap = (await _scrape(session, target.url))[
                        "batchgate_replica_max_concurrency"]
                    history.append(cap)
                    if len(history) >= SETTLE_READINGS and len(set(
                            history[-SETTLE_READINGS:])) == 1:
                        break
                    await asyncio.sleep(1.0)
                settled_after = time.monotonic() - started
            before = (await _scrape(session, sim.url))["vllm:generation_tokens_total"]
            t0 = time.monotonic()
            waiting: list[float] = []
            while time.monotonic() - t0 < window_s:
                engine = await _scrape(session, sim.url)
                waiting.append(engine["vllm:num_requests_waiting"])
                ours = await _scrape(session, target.url)
                caps.append(ours["batchgate_replica_max_concurrency"])
                await asyncio.sleep(SAMPLE_S)
            after = (await _scrape(session, sim.url))["vllm:generation_tokens_total"]
            elapsed = time.monotonic() - t0
        finally:
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load
    return {
        "tokens_per_s": (after - before) / elapsed,
        "engine_waiting_mean": statistics.fmean(waiting),
        "engine_waiting_max": max(waiting),
        "cap_mean": statistics.fmean(caps),
        "cap_min": min(caps),
        "cap_max": max(caps),
        "cap_last": caps[-1],
        "settled_after_s": settled_after,
        "window_s": elapsed,
    }


def phase_adaptive(procs: Procs, tmp: Any, quick: bool, say: Any) -> dict[str, Any]:
    sim = cs.start_sim(procs, max_batch=MAX_BATCH, time_scale=TIME_SCALE)
    caps = (8, 16, 32) if quick else FIXED_CAPS
    # Warm-up: one generation, so every caller's request is in its steady rhythm.
    warm_s, window_s = (1.0, 1.5) if quick else (2.5, 3.0)
    fixed: dict[int, dict[str, Any]] = {}
    try:
        for cap in caps:
            target = _start(procs, tmp, sim.port, f"batchgate-cap-{cap}", cap, None)
            try:
                fixed[cap] = asyncio.run(_measure(sim, target, warm_s=warm_s,
                                                  window_s=window_s, settle_s=None))
            finally:
                assert target.proc is not None
                procs.stop(target.proc)
            say(f"  fixed cap {cap}: {fixed[cap]['tokens_per_s']:.0f} tok/s, engine queue "
                f"{fixed[cap]['engine_waiting_mean']:.1f}")
        target = _start(procs, tmp, sim.port, "batchgate-adaptive", START_CAP, ADAPTIVE)
        try:
            adaptive = asyncio.run(_measure(sim, target, warm_s=1.0,
                                            window_s=2 * window_s,
                                            settle_s=10.0 if quick else 25.0))
        finally:
            assert target.proc is not None
            procs.stop(target.proc)
    finally:
        assert sim.proc is not None
        procs.stop(sim.proc)
    best_cap = max(fixed, key=lambda c: fixed[c]["tokens_per_s"])
    best = fixed[best_cap]["tokens_per_s"]
    ratio = adaptive["tokens_per_s"] / best if best else None
    say(f"  adaptive: cap {adaptive['cap_mean']:.1f} (last {adaptive['cap_last']:.0f}), "
        f"engine queue {adaptive['engine_waiting_mean']:.2f}, "
        f"{adaptive['tokens_per_s']:.0f} tok/s = {ratio or 0:.3f} x best fixed ({best_cap})")
    settled = abs(adaptive["cap_mean"] - MAX_BATCH) <= 1.5
    queue_near_zero = adaptive["engine_waiting_mean"] <= 1.0
    return {
        "max_batch": MAX_BATCH,
        "callers": CALLERS,
        "max_tokens": MAX_TOKENS,
        "time_scale": TIME_SCALE,
        "start_cap": START_CAP,
        "adaptive_config": ADAPTIVE,
        "fixed": {str(c): v for c, v in fixed.items()},
        "adaptive": adaptive,
        "best_fixed_cap": best_cap,
        "best_fixed_tokens_per_s": best,
        "ratio": ratio,
        "met": bool(settled and queue_near_zero and ratio is not None
                    and ratio >= TARGET_RATIO),
    }
