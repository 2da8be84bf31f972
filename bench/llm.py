"""P4 and the seed table: ``batchgate sim`` (max-batch 32, the seed profile) on the
system-under-test core, loaded by ``batchgate bench``'s generator directly and through
batchgate, alternately."""

from __future__ import annotations

import statistics
from typing import Any

import contestants as cs
from phases import Run, aio, rotate

from proxy.bench.cli import BenchOptions, LevelResult, run_level

#: The seed table: one replica, N callers at once, 100 tokens each, total time in ms.
SEED_MS = {1: 1776, 2: 1981, 4: 2067, 8: 3767, 16: 4431, 32: 4942}
SEED_TOLERANCE = 0.05
P4_TARGET = 0.99


def _level(url: str, concurrency: int, requests: int, options: BenchOptions) -> LevelResult:
    return aio(run_level(url, concurrency=concurrency, rate=None, requests=requests,
                         options=options))


def phase_p4(run: Run, sim: cs.Target) -> dict[str, Any]:
    """Tokens/s of 32 callers straight at the engine vs 200 callers through batchgate with
    max_concurrency 32: the same number of 32-request rounds, so the same work. A gap between
    one request finishing and the next starting shows as lost tokens/s."""
    settings = cs.ProxySettings(max_concurrency=32, queue_max=1000, queue_timeout_s=600)
    bg = cs.start_batchgate(run.procs, run.tmp, sim.port, settings, name="batchgate-p4")
    max_tokens = 8 if run.quick else 32
    requests = 32 * (7 if run.quick else 8)  # >= 200, so all 200 callers are waiting at once
    options = BenchOptions(max_tokens=max_tokens, stream=True, model="batchgate-sim",
                           timeout_s=600.0)
    plan = {"direct": (sim.url, 32), "batchgate": (bg.url, 200)}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in plan}
    try:
        _level(bg.url, 32, 32, options)  # warm the pool; not recorded
        for r in range(min(run.rounds, 2)):
            for name in rotate(list(plan), r):
                url, callers = plan[name]
                level = _level(url, callers, requests, options)
                runs[name].append({
                    "tokens_per_s": level.tokens_per_s,
                    "total_ms": level.total_time_s * 1000,
                    "tokens": level.tokens,
                    "errors": level.requests - level.ok,
                    "callers": callers,
                })
            run.say("  round {}: direct {:.0f} tok/s, batchgate {:.0f} tok/s".format(
                r + 1, runs["direct"][-1]["tokens_per_s"], runs["batchgate"][-1]["tokens_per_s"]))
    finally:
        assert bg.proc is not None
        run.procs.stop(bg.proc)
    direct = statistics.median(x["tokens_per_s"] for x in runs["direct"])
    through = statistics.median(x["tokens_per_s"] for x in runs["batchgate"])
    return {
        "max_tokens": max_tokens,
        "requests": requests,
        "runs": runs,
        "direct_tokens_per_s": direct,
        "batchgate_tokens_per_s": through,
        "ratio": through / direct if direct else None,
        "met": bool(direct) and through / direct >= P4_TARGET,
    }


def phase_seed(run: Run, sim: cs.Target) -> dict[str, Any]:
    """The seed table through batchgate: for each N one batchgate with max_concurrency N and
    N callers sending one 100-token request each; total time from first send to last answer.
    All six batchgates run at once (idle ones cost nothing); the engine is measured directly
    too, so a miss can be told apart from the engine's own drift."""
    levels = (1, 2, 4) if run.quick else tuple(SEED_MS)
    targets = {
        n: cs.start_batchgate(
            run.procs, run.tmp, sim.port,
            cs.ProxySettings(max_concurrency=n, queue_max=1000, queue_timeout_s=600),
            name=f"batchgate-seed-{n}",
        )
        for n in levels
    }
    options = BenchOptions(max_tokens=100, stream=False, model="batchgate-sim", timeout_s=600.0)
    rows: dict[int, dict[str, list[float]]] = {n: {"direct": [], "batchgate": []} for n in levels}
    rounds = 1 if run.quick else max(1, run.rounds - 1)
    try:
        for r in range(rounds):
            for n in levels:
                for name in rotate(["direct", "batchgate"], r + n):
                    url = sim.url if name == "direct" else targets[n].url
                    level = _level(url, n, n, options)
                    if level.ok != n:
                        raise RuntimeError(f"seed level {n} via {name}: {level.errors}")
                    rows[n][name].append(level.total_time_s * 1000)
                run.say(f"  round {r + 1} N={n}: direct {rows[n]['direct'][-1]:.0f} ms, "
                        f"batchgate {rows[n]['batchgate'][-1]:.0f} ms (seed {SEED_MS[n]})")
    finally:
        for target in targets.values():
            assert target.proc is not None
            run.procs.stop(target.proc)
    table = []
    for n in levels:
        through = statistics.median(rows[n]["batchgate"])
        direct = statistics.median(rows[n]["direct"])
        table.append({
            "concurrency": n,
            "seed_ms": SEED_MS[n],
            "batchgate_ms": through,
            "direct_ms": direct,
            "vs_seed": through / SEED_MS[n] - 1,
            "vs_direct": through / direct - 1,
            "met": abs(through / SEED_MS[n] - 1) <= SEED_TOLERANCE,
            "runs": rows[n],
        })
    return {"rows": table, "met": all(row["met"] for row in table)}
