"""The scheduling phases of ``make bench`` (issue 10), against ``batchgate sim``.

* ``tenants``: an interactive tenant's queue wait while a batch tenant floods. A batch tenant
  sends :data:`FLOOD` requests at once; while they drain, an interactive tenant sends one
  request every :data:`TRICKLE_S`. Three batchgates in front of the same engine, run one
  after the other: ``fifo`` (no ``scheduling``: one tenant, one class, first come first
  served), ``fair`` (``scheduling.tenant_header``: deficit round-robin between the two
  tenants, one class) and ``classes`` (``scheduling.classes: [interactive, batch]`` as well,
  the trickle sending ``X-Batchgate-Class: interactive``). The figure is the interactive
  requests' ``X-Batchgate-Queue-Ms`` (p50, p99, max): the time each waited for a slot.
* ``budget``: preemptions of an engine with a KV-cache budget (``batchgate sim --kv-tokens``)
  behind a count-only cap (``max_concurrency`` alone) and behind the same cap plus
  ``max_tokens_in_flight`` equal to the budget, with a mix of long and short requests. Prompts
  are token ids, so batchgate's estimate and the engine's count agree exactly.

Each variant is its own batchgate process; a variant whose config this build refuses (a key
it does not know yet) is reported as not run, with batchgate's one-line error.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import aiohttp
import contestants as cs
import yaml
from phases import Run, aio
from procs import Procs, free_port, wait_http

from proxy.bench.core import percentiles

MODEL = "batchgate-sim"
FLOOD = 1000
TRICKLE_S = 0.25  # the interactive tenant: 4 requests a second
TENANT_HEADER = "X-Tenant"
#: The engine of the tenants phase: 8 at a time, 16 tokens each, steps at a tenth of the seed
#: profile's time (a request takes about 60 ms; the flood drains in about 8 s).
TENANTS_SIM = {"max_batch": 8, "time_scale": 0.1}
TENANTS_TOKENS = 16

KV_TOKENS = 8192
BUDGET_SIM = {"max_batch": 64, "time_scale": 0.15, "kv_tokens": KV_TOKENS}
#: (share, prompt token ids, max_tokens) of the budget phase's mix.
LONG = (0.2, 1500, 400)
SHORT = (0.8, 100, 100)
BUDGET_REQUESTS = 200
BUDGET_CAP = 32


def start_sim(procs: Procs, name: str, *, max_batch: int, time_scale: float,
              kv_tokens: int = 0) -> cs.Target:
    port = free_port()
    proc = procs.start(name, [
        str(cs.BIN / "batchgate"), "sim", "--port", str(port), "--max-batch", str(max_batch),
        "--time-scale", str(time_scale), "--kv-tokens", str(kv_tokens),
    ])
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return cs.Target(name, port, proc)


def start_variant(run: Run, sim: cs.Target, name: str, replica: dict[str, Any],
                  extra: dict[str, Any]) -> tuple[cs.Target | None, str | None]:
    """A batchgate with ``replica`` keys and ``extra`` sections; (None, why) if it refuses."""
    port = free_port()
    config = cs.batchgate_config(sim.port, port, cs.ProxySettings(
        max_concurrency=int(replica["max_concurrency"]), queue_max=5000,
        queue_timeout_s=600))
    config["replicas"] = [{**config["replicas"][0], **replica}]  # type: ignore[index]
    config.update(extra)
    path = run.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = run.procs.start(name, [str(cs.BIN / "batchgate"), "serve", "--config", str(path)])
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc)
    except RuntimeError:
        run.procs.stop(proc)
        lines = [line for line in proc.tail().splitlines() if line.strip()]
        return None, lines[-1] if lines else "batchgate did not start"
    return cs.Target(name, port, proc), None


async def _metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _summary_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    pct = percentiles(values)
    return {"p50": pct["p50"], "p99": pct["p99"], "max": max(values)}


# -- tenants -------------------------------------------------------------------------------


TENANT_VARIANTS: dict[str, dict[str, Any]] = {
    "fifo": {},
    "fair": {"scheduling": {"tenant_header": TENANT_HEADER}},
    "classes": {"scheduling": {"classes": ["interactive", "batch"], "default_class": "batch",
                               "tenant_header": TENANT_HEADER}},
}


def phase_tenants(run: Run) -> dict[str, Any]:
    sim = start_sim(run.procs, "sim-tenants", **TENANTS_SIM)
    flood = 200 if run.quick else FLOOD
    out: dict[str, Any] = {"flood": flood, "trickle_s": TRICKLE_S, "max_concurrency": 8,
                           "max_tokens": TENANTS_TOKENS, "sim": TENANTS_SIM, "variants": {}}
    try:
        for name, extra in TENANT_VARIANTS.items():
            target, why = start_variant(run, sim, f"batchgate-{name}",
                                        {"max_concurrency": 8}, extra)
            if target is None:
                out["variants"][name] = {"skipped": why}
                run.say(f"  {name}: not run: {why}")
                continue
            try:
                result = aio(_tenants_once(target.url, flood, classed=name == "classes"))
            finally:
                assert target.proc is not None
                run.procs.stop(target.proc)
            out["variants"][name] = result
            run.say(f"  {name}: interactive queue wait p50 {result['interactive_ms']['p50']:.0f}"
                    f" p99 {result['interactive_ms']['p99']:.0f} max "
                    f"{result['interactive_ms']['max']:.0f} ms ({result['interactive']} requests);"
                    f" flood drained in {result['flood_s']:.1f} s, errors {result['errors']}")
    finally:
        assert sim.proc is not None
        run.procs.stop(sim.proc)
    return out


async def _tenants_once(url: str, flood: int, *, classed: bool) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": "x", "max_tokens": TENANTS_TOKENS}
    batch_waits: list[float] = []
    inter_waits: list[float] = []
    errors: list[str] = []

    async def one(session: aiohttp.ClientSession, headers: dict[str, str],
                  waits: list[float]) -> None:
        try:
            async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    errors.append(str(r.status))
                    return
                waits.append(float(r.headers.get("X-Batchgate-Queue-Ms", "nan")))
        except (aiohttp.ClientError, TimeoutError) as err:
            errors.append(type(err).__name__)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await one(session, {TENANT_HEADER: "batch"}, [])  # warm the path; not recorded
        started = time.monotonic()
        batch_headers = {TENANT_HEADER: "batch"}
        floods = [asyncio.create_task(one(session, batch_headers, batch_waits))
                  for _ in range(flood)]
        # The trickle starts once the flood is queued: it measures waiting behind it.
        deadline = time.monotonic() + 30
        while (await _metric(session, url, "batchgate_queue_depth")) < flood * 0.8:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        inter_headers = {TENANT_HEADER: "interactive"}
        if classed:
            inter_headers["X-Batchgate-Class"] = "interactive"
        trickle: list[asyncio.Task[None]] = []
        while not all(task.done() for task in floods):
            trickle.append(asyncio.create_task(one(session, inter_headers, inter_waits)))
            await asyncio.sleep(TRICKLE_S)
        flood_s = time.monotonic() - started
        await asyncio.gather(*floods, *trickle)
    return {
        "interactive": len(trickle),
        "interactive_ms": _summary_ms(inter_waits),
        "batch_ms": _summary_ms(batch_waits),
        "flood_s": flood_s,
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
    }


# -- budget --------------------------------------------------------------------------------


BUDGET_VARIANTS: dict[str, dict[str, Any]] = {
    "count_only": {"max_concurrency": BUDGET_CAP},
    "token_budget": {"max_concurrency": BUDGET_CAP, "max_tokens_in_flight": KV_TOKENS},
}


def budget_mix(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt tokens, max_tokens) of ``n`` requests: the same shuffled mix for every variant."""
    rng = random.Random(seed)
    longs = round(n * LONG[0])
    mix = [(LONG[1], LONG[2])] * longs + [(SHORT[1], SHORT[2])] * (n - longs)
    rng.shuffle(mix)
    return mix


def phase_budget(run: Run) -> dict[str, Any]:
    n = 60 if run.quick else BUDGET_REQUESTS
    out: dict[str, Any] = {"requests": n, "kv_tokens": KV_TOKENS, "cap": BUDGET_CAP,
                           "long": LONG, "short": SHORT, "sim": BUDGET_SIM, "variants": {}}
    sim = start_sim(run.procs, "sim-budget", **BUDGET_SIM)
    try:
        for name, replica in BUDGET_VARIANTS.items():
            target, why = start_variant(run, sim, f"batchgate-{name}", replica, {})
            if target is None:
                out["variants"][name] = {"skipped": why}
                run.say(f"  {name}: not run: {why}")
                continue
            try:
                result = aio(_budget_once(target.url, sim.url, budget_mix(n)))
            finally:
                assert target.proc is not None
                run.procs.stop(target.proc)
            out["variants"][name] = result
            run.say(f"  {name}: {result['preemptions']:.0f} preemptions, peak KV "
                    f"{result['peak_kv_usage'] * 100:.0f} %, {result['tokens_per_s']:.0f} tok/s,"
                    f" {result['wall_s']:.1f} s, errors {result['errors']}")
    finally:
        assert sim.proc is not None
        run.procs.stop(sim.proc)
    return out


async def _budget_once(url: str, sim_url: str, mix: list[tuple[int, int]]) -> dict[str, Any]:
    errors: list[str] = []
    tokens = 0
    short_e2e: list[float] = []

    async def one(session: aiohttp.ClientSession, prompt: int, max_tokens: int) -> None:
        nonlocal tokens
        body = {"model": MODEL, "prompt": [7] * prompt, "max_tokens": max_tokens}
        sent = time.monotonic()
        try:
            async with session.post(url + "/v1/completions", json=body) as r:
                doc = await r.json(content_type=None)
                if r.status != 200:
                    errors.append(str(r.status))
                    return
                tokens += int(doc["usage"]["completion_tokens"])
                if prompt == SHORT[1]:
                    short_e2e.append((time.monotonic() - sent) * 1000)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as err:
            errors.append(type(err).__name__)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        before = await _metric(session, sim_url, "vllm:num_preemptions_total")
        peak = 0.0
        started = time.monotonic()
        tasks = [asyncio.create_task(one(session, p, m)) for p, m in mix]
        while not all(task.done() for task in tasks):
            peak = max(peak, await _metric(session, sim_url, "vllm:kv_cache_usage_perc"))
            await asyncio.sleep(0.05)
        wall = time.monotonic() - started
        await asyncio.gather(*tasks)
        after = await _metric(session, sim_url, "vllm:num_preemptions_total")
    return {
        "preemptions": after - before,
        "peak_kv_usage": peak,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "wall_s": wall,
        "short_e2e_ms": _summary_ms(short_e2e),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
    }



# -- the figures, as text and as markdown ---------------------------------------------------


def _f(value: Any, spec: str = ".0f") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:{spec}}"


def rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per variant of each scheduling phase that ran (header first)."""
    table = [["scheduling variant", "interactive wait p50 / p99 / max (ms)",
              "batch wait p50 / p99 (ms)", "preemptions", "peak KV", "tokens/s", "wall s",
              "errors"]]
    for name, v in ((results.get("tenants") or {}).get("variants") or {}).items():
        if "skipped" in v:
            table.append([f"tenants {name}", "not run", "", "", "", "", "", ""])
            continue
        i, b = v["interactive_ms"], v["batch_ms"]
        table.append([f"tenants {name} ({v['interactive']} interactive)",
                      f"{_f(i['p50'])} / {_f(i['p99'])} / {_f(i['max'])}",
                      f"{_f(b['p50'])} / {_f(b['p99'])}", "", "", "",
                      _f(v["flood_s"], ".1f"), str(v["errors"])])
    for name, v in ((results.get("budget") or {}).get("variants") or {}).items():
        if "skipped" in v:
            table.append([f"budget {name}", "", "", "not run", "", "", "", ""])
            continue
        table.append([f"budget {name}", "", "", _f(v["preemptions"]),
                      f"{_f(v['peak_kv_usage'] * 100)} %", _f(v["tokens_per_s"]),
                      _f(v["wall_s"], ".1f"), str(v["errors"])])
    return table


def text(results: dict[str, Any]) -> str:
    grid = rows(results)
    if len(grid) == 1:
        return ""
    widths = [max(len(row[i]) for row in grid) for i in range(len(grid[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in grid]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + "\n"


def skipped(results: dict[str, Any]) -> list[str]:
    return [f"`{phase} {name}`: {v['skipped']}"
            for phase in ("tenants", "budget")
            for name, v in ((results.get(phase) or {}).get("variants") or {}).items()
            if "skipped" in v]


def markdown(results: dict[str, Any]) -> str:
    """The "Scheduling" section of docs/benchmarks.md."""
    grid = rows(results)
    if len(grid) == 1:
        return "(not run)"
    lines = ["| " + " | ".join(grid[0]) + " |", "|" + "---|" * len(grid[0])]
    lines += ["| " + " | ".join(row) + " |" for row in grid[1:]]
    notes = skipped(results)
    if notes:
        lines += ["", "Not run (this build refused the variant's config):", "",
                  *(f"- {note}" for note in notes)]
    return "\n".join(lines)
