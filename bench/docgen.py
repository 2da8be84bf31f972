"""docs/benchmarks.md from one run's results: the figures, the machine, the method, and the
command that reproduces them. Written by every full ``make bench``; never edited by hand.
Usage: python bench/docgen.py bench/results/DATE.json   (rewrites docs/benchmarks.md)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import report
import scheduling
from phases import PAIR_ROUNDS
from soak import keep_soak

ROOT = Path(__file__).resolve().parent.parent


def _f(value: Any, spec: str = ".0f") -> str:
    return "-" if value is None else f"{value:{spec}}"


def _table(summary: dict[str, Any]) -> str:
    return _md(report.rows(summary))


def _md(grid: list[list[str]]) -> str:
    lines = ["| " + " | ".join(grid[0]) + " |", "|" + "---|" * len(grid[0])]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in grid[1:]]
    return "\n".join(lines)


def _baseline(summary: dict[str, Any]) -> str:
    grid = report.baseline_rows(summary)
    if not grid:
        return ""
    versus = summary["baseline"]
    pairs = PAIR_ROUNDS
    return f"""
### Against the baseline code

The batchgate of commit `{versus['sha']}` (`make bench BASELINE={versus['commit']}`: that
commit's `proxy/` run with this tree's virtualenv), a fifth contestant in the same rounds of
P1-P3 and P5, with the same config. "No worse" is the target for the CPU and memory figures;
rates and latencies are shown (on the proxy's saturated core a rate is the reciprocal of the
CPU per request, and the machine's noise moves it far more). For P1 and P2 the ratio is the
median over rounds of the two measured next to each other, so the machine's drift during
the run cancels out; P2 adds {pairs} rounds of the two alone, back to back, the order
alternating (two runs of the same code differ by up to 10 % here, and three pairs could not
tell a 3 % change from noise). The columns beside the ratio are each one's median over the
rounds of all five.

{_md(grid)}
"""


def _targets(summary: dict[str, Any]) -> str:
    out = []
    for t in summary.get("targets", []):
        value = t["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        out.append(f"- **{'met' if t['met'] else 'MISSED'}**: {t['target']}: {shown} {t['unit']}")
    return "\n".join(out) or "- (no targets evaluated)"


def _streams(results: dict[str, Any]) -> str:
    streams = results.get("streams") or {}
    if not streams:
        return "(not run)"
    lines = ["| contestant | streams | attempt | added gap p99 (ms) | delay p99 (ms) | "
             "proxy CPU (cores) | upstream CPU (cores) | generator CPU (cores) | RSS (MiB) | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, result in streams.items():
        for s in result["steps"]:
            lines.append(
                f"| {name} | {s['streams']} | {s.get('attempt', 1)}"
                f" | {_f(s['added_p99_ms'], '.1f')} | {_f(s['delay_ms']['p99'], '.1f')}"
                f" | {_f(s['proxy_cpu'], '.2f')} | {_f(s['upstream_cpu'], '.2f')}"
                f" | {_f(s['client_cpu'], '.2f')} | {_f(s['rss_kib'] / 1024, '.1f')}"
                f" | {'yes' if s['ok'] else 'no'} |"
            )
    return "\n".join(lines)


def _profile(results: dict[str, Any]) -> str:
    prof = results.get("profile") or {}
    if not prof:
        return "(not run)"
    lines = []
    for name, p in prof.items():
        lines.append(f"**{name}**: {_f(p['cpu_us_per_request'])} us of CPU per request "
                     f"({_f(p['kernel_us_per_request'])} us in the kernel), "
                     f"{_f(p['rps_alone_on_core'])} req/s alone on the core.")
        calls = (p.get("syscalls") or {}).get("per_request")
        if calls:
            lines.append("System calls per request: " + ", ".join(
                f"{k} {v:.2f}" for k, v in calls.items() if k != "total") + ".")
        spy = p.get("py_spy") or {}
        own = {k: v for k, v in (spy.get("own_functions_inclusive_us") or {}).items()
               if not k.startswith(("main ", "cmd_serve ", "<module> "))}
        if own:
            lines.append("py-spy, inclusive us per request in its own code: " + ", ".join(
                f"`{k}` {v:.0f}" for k, v in list(own.items())[:9]) + ".")
        elif spy.get("skipped"):
            lines.append(f"py-spy: {spy['skipped']}.")
        lines.append("")
    return "\n".join(lines)


def _scheduling(results: dict[str, Any], results_dir: Path) -> str:
    """The scheduling phases (bench/scheduling.py): this run's, else the newest (not quick)
    run that has them (``--only tenants,budget``), named with its date."""
    if results.get("tenants") or results.get("budget"):
        data, source = results, "this run"
    else:
        # Named <date>-only-<phases>.json by bench/run.py: sorted by name is sorted by date.
        runs = sorted(p for p in results_dir.glob("*-only-*.json")
                      if {"tenants", "budget"} & set(p.stem.split("-only-", 1)[1].split("-")))
        if not runs:
            return "No run of the `tenants` or `budget` phase is on record yet."
        data = json.loads(runs[-1].read_text())
        phases = runs[-1].stem.split("-only-", 1)[1].replace("-", ",")
        source = (f"`{runs[-1].relative_to(ROOT)}` ({data['date']}, commit "
                  f"`{data['machine']['commit']}`, `bench/run.py --only {phases}`)")
    return "\n\n".join([f"From {source}.", _scheduling_method(data),
                        scheduling.markdown(data)])


def _scheduling_method(results: dict[str, Any]) -> str:
    tenants = results.get("tenants") or {}
    budget = results.get("budget") or {}
    out = []
    if tenants:
        sim = tenants["sim"]
        out.append(
            f"- **Two tenants** (`tenants`): `batchgate sim --max-batch {sim['max_batch']} "
            f"--time-scale {sim['time_scale']:g}` behind batchgate (`max_concurrency: "
            f"{tenants['max_concurrency']}`); a batch tenant sends {tenants['flood']} "
            f"{tenants['max_tokens']}-token requests at once; once they are queued, an "
            f"interactive tenant sends one every {tenants['trickle_s'] * 1000:.0f} ms until the "
            "flood has drained. The interactive requests' `X-Batchgate-Queue-Ms`: `fifo` has no "
            "`scheduling` (one tenant, one class); `fair` sets `scheduling.tenant_header` (fair "
            "share between the two tenants, one class); `classes` adds `scheduling.classes: "
            "[interactive, batch]` with the trickle sending `X-Batchgate-Class: interactive`.")
    if budget:
        sim = budget["sim"]
        (_, lp, lm), (_, sp, sm) = budget["long"], budget["short"]
        out.append(
            f"- **Token budget** (`budget`): `batchgate sim --kv-tokens {budget['kv_tokens']} "
            f"--max-batch {sim['max_batch']} --time-scale {sim['time_scale']:g}`; "
            f"{budget['requests']} requests at once, {budget['long'][0] * 100:.0f} % long "
            f"({lp} prompt token ids, `max_tokens: {lm}`), the rest short ({sp}, {sm}), through "
            f"batchgate with `max_concurrency: {budget['cap']}` alone (`count_only`) and with "
            f"`max_tokens_in_flight: {budget['kv_tokens']}` as well (`token_budget`); the "
            "engine's `vllm:num_preemptions_total` over the run, the peak of "
            "`vllm:kv_cache_usage_perc` (sampled every 50 ms), completion tokens/s.")
    return "\n".join(out) or "Not run."


def _instructions(results_dir: Path) -> str:
    """The newest ``make bench-instructions`` figures (bench/instructions.py), if any."""
    runs = sorted(results_dir.glob("*-instructions.json"))
    if not runs:
        return "No `make bench-instructions` run is on record yet."
    data = json.loads(runs[-1].read_text())
    base, now = data["per_request"]["baseline"], data["per_request"]["this tree"]
    rows = [f"| {kind} | {base[kind] / 1000:.1f} k | {now[kind] / 1000:.1f} k | "
            f"{now[kind] / base[kind]:.3f}x |" for kind in now]
    return "\n".join([
        f"From `{runs[-1].relative_to(ROOT)}`: {data['n']} requests each, baseline commit "
        f"`{data['baseline']}`, this tree `{data['head']}`.",
        "",
        f"| request | baseline `{data['baseline']}` | this tree | ratio |",
        "|---|---|---|---|",
        *rows,
    ])


def _cpu(results_dir: Path) -> str:
    """The newest ``make bench-cpu`` figures (bench/cpu.py), if any."""
    runs = sorted(results_dir.glob("*-cpu.json"))
    if not runs:
        return "No `make bench-cpu` run is on record yet."
    data = json.loads(runs[-1].read_text())
    rows = []
    for kind, r in data["kinds"].items():
        us = r["us_per_request"]
        cells = [f"{v['mean']:.3f}x [{v['low']:.3f}, {v['high']:.3f}]"
                 for v in r["ratios"].values()]
        rows.append(f"| {kind} | {(us['baseline'] + us['baseline#2']) / 2:.0f} | "
                    f"{(us['batchgate'] + us['batchgate#2']) / 2:.0f} | " + " | ".join(cells)
                    + " |")
    return "\n".join([
        f"From `{runs[-1].relative_to(ROOT)}`: {data['blocks']} blocks per kind, baseline "
        f"commit `{data['baseline']}`, this tree `{data['head']}`. Ratios are the mean of the "
        "per-block ratios, with two standard errors either side in brackets.",
        "",
        f"| request | baseline `{data['baseline']}` (us) | this tree (us) | this tree / baseline "
        "| A/A: this tree, process 1 / 2 | A/A: baseline, process 1 / 2 |",
        "|---|---|---|---|---|---|",
        *rows,
    ])


def _adaptive(results: dict[str, Any], results_dir: Path) -> str:
    """The adaptive cap's convergence (bench/convergence.py): this run's, else the newest run
    of that phase alone (``--only adaptive``), named with its date."""
    data, source = results.get("adaptive"), "this run"
    if not data:
        runs = sorted(p for p in results_dir.glob("*-only-*.json")
                      if "adaptive" in p.stem.split("-only-", 1)[1].split("-")
                      and "quick" not in p.name)
        if not runs:
            return "No run of the `adaptive` phase is on record yet."
        other = json.loads(runs[-1].read_text())
        data = other.get("adaptive")
        if not data:
            return f"The newest run of the `adaptive` phase (`{runs[-1].name}`) failed."
        source = (f"`{runs[-1].relative_to(ROOT)}` ({other['date']}, commit "
                  f"`{other['machine']['commit']}`, `bench/run.py --only adaptive`)")
    a = data["adaptive"]
    rows = [f"| fixed `max_concurrency: {cap}` | {f['tokens_per_s']:.0f} | "
            f"{f['tokens_per_s'] / data['best_fixed_tokens_per_s']:.3f}x | {cap} | "
            f"{f['engine_waiting_mean']:.1f} (max {f['engine_waiting_max']:.0f}) |"
            for cap, f in data["fixed"].items()]
    rows.append(
        f"| **adaptive** `{{min: {data['adaptive_config']['min']}, max: "
        f"{data['adaptive_config']['max']}}}`, from {data['start_cap']} | "
        f"**{a['tokens_per_s']:.0f}** | **{data['ratio']:.3f}x** | {a['cap_mean']:.1f} "
        f"({a['cap_min']:.0f}..{a['cap_max']:.0f}, last {a['cap_last']:.0f}) | "
        f"{a['engine_waiting_mean']:.2f} (max {a['engine_waiting_max']:.0f}) |")
    met = "met" if data["met"] else "**missed**"
    settled = a.get("settled_after_s")
    return "\n".join([
        f"From {source}. `batchgate sim --max-batch {data['max_batch']} --time-scale "
        f"{data.get('time_scale', 1):g}`; {data['callers']} "
        f"callers (`batchgate bench`'s generator, closed loop) send {data['max_tokens']}-token "
        "completions through one batchgate at a time; tokens/s is the engine's own "
        "`vllm:generation_tokens` over a steady window, the engine's queue and the cap are "
        "sampled every 0.25 s in it. The adaptive batchgate's window starts once its cap "
        f"stayed put for five readings ({settled:.0f} s after the load began)." if settled
        is not None else "",
        "",
        "| batchgate | tokens/s | vs best fixed | cap (mean) | engine queue (mean) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Target (issue 10): the cap settles at about {data['max_batch']}, the engine's queue "
        f"near 0, tokens/s >= 0.97x the best fixed cap ({data['best_fixed_cap']}): {met}.",
    ])


def markdown(results: dict[str, Any], json_path: Path) -> str:
    summary = results["summary"]
    m = results["machine"]
    wrk_version = " ".join(m["wrk"].split()[:2])
    haproxy_version = m["haproxy"].split()[2] if len(m["haproxy"].split()) > 2 else ""
    s = results["settings"]
    raw, queued = s["raw"], s["queued"]
    minutes = results["wall_time_s"] / 60
    kind = "quick" if results["quick"] else "full"
    return f"""# Benchmarks

batchgate side by side with the upstream alone (**direct**), **HAProxy** {haproxy_version}
and a 27-line aiohttp **passthrough** proxy
(`bench/passthrough.py`, the floor: what any aiohttp proxy costs before features), and the
batchgate of an earlier commit (**baseline**, its own table below), all measured in one run,
interleaved. This page is written by the run; reproduce it with

```sh
make bench        # about {minutes:.0f} minutes; bench/results/<date>.json keeps every number
make bench BENCH_ARGS=--quick   # a one-minute smoke run of the harness (writes no docs)
make bench BASELINE=            # without the baseline commit's batchgate (it runs by default)
```

Run of {results['date']} ({kind}, {results['wall_time_s']:.0f} s),
commit `{m['commit']}`, raw figures in `{json_path}`.
Machine: {m['nproc']} cores ({m['cpu_model']}), Linux {m['kernel']}, Python {m['python']},
aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, {wrk_version}; load average {m['loadavg_start']:.2f}
at the start and {m.get('loadavg_end', float('nan')):.2f} at the end (other work on the machine
adds noise; the contestants are interleaved so it falls on all of them alike).

## Results

{_table(summary)}
{_baseline(summary)}
Targets:

{_targets(summary)}

Rates are medians over {s['rounds']} interleaved rounds ({s['wrk_s']:g} s each); "proxy CPU per
request" is the proxy's CPU time (/proc) over the requests it served in the same run, which
the machine's noise moves far less than a rate.

## How it is measured

- **Pinning.** The upstream and the proxy under test share core 0; the load generator (wrk,
  and batchgate's own, `proxy/bench/`) has core 1 (`sched_setaffinity`, as `taskset` does).
  All the contestants stay up during a phase and take turns; the turn order rotates each round.
- **Upstream** (`bench/upstream.py`): raw asyncio on uvloop, about 10 us of CPU per small
  request, so the proxies' costs dominate. It answers small JSON completions, `/sse` streams
  (N events, M ms apart, each stamped with its write time) and `/health`.
- **batchgate**: `batchgate serve`, one replica at the upstream, `max_concurrency:
  {raw['max_concurrency']}` for P1-P3 (no request ever queues, so the request path is measured),
  `queue: {{max_size: {raw['queue_max']}, timeout_s: {raw['queue_timeout_s']:g}}}`, health probes
  every 5 s, `logging: {{level: warning}}`.
- **HAProxy** (`bench/haproxy.cfg`): `nbthread 1`, the server's `maxconn` = batchgate's
  `max_concurrency`, `maxqueue` = `queue.max_size`, `timeout queue` = `queue.timeout_s`, the
  same `/health` check, `http-reuse always`, `option http-no-delay` (SSE events are not held).
- **P1**: latency of a small JSON POST at concurrency 1 on one keep-alive connection (a
  raw-socket client times each request; wrk's own percentiles are corrected for coordinated
  omission, which at concurrency 1 turns one scheduler hiccup into dozens of samples), and
  at 1,000 req/s open loop (Poisson arrivals) with `batchgate bench`'s generator.
- **P2**: wrk, one thread, 32 and 64 connections (the better median counts) for the small
  JSON POST; 32 connections for 16-event SSE streams (`/sse?events=16&interval_ms=0`).
- **P3**: N streams of 20 events/s (50 ms apart), opened evenly over max(1 s, N/1000 s),
  held {'1' if results['quick'] else '2.5'} s more; N steps up until the added inter-event p99
  passes 5 ms or a stream fails (two failed attempts in a row end the search). The *added
  gap* of an event is its gap since the stream's previous event at the client less the gap
  between the upstream's two writes, so the upstream's own lateness cancels out. CPU per 100
  streams is the proxy's CPU (/proc) at the largest N sustained, scaled to 100 streams.
- **P5**: RSS from `/proc/<pid>/statm` of a fresh proxy after a short warm-up, then with N
  unanswered requests: batchgate and HAProxy with one slot (`max_concurrency: 1`,
  `queue: {{max_size: {queued['queue_max']}, timeout_s: {queued['queue_timeout_s']:g}}}`) held
  by the first, the rest queued; the passthrough has no queue and holds them all upstream.
  Per request = (loaded - idle) / N. Per open stream: the same at P3's 1,000-stream step.
  A process may hold at most as many sockets as the hard `RLIMIT_NOFILE` (HAProxy needs two
  per connection), so HAProxy may hold somewhat fewer than 10,000; the passthrough, which
  needs two sockets per request and accepts slowly, is loaded with half as many.
- **P4**: `batchgate sim --max-batch 32` on core 0; `batchgate bench` streams
  {_f((results.get('p4') or {}).get('max_tokens'))}-token completions, 32 callers straight
  at the engine vs 200 callers through batchgate (`max_concurrency: 32`), the same number of
  requests; tokens/s through batchgate over direct.
- **Adaptive**: `batchgate sim --max-batch 16 --time-scale 0.5`, behind batchgate with fixed
  caps and with `adaptive: {{min: 1, max: 128}}` (`bench/convergence.py`; see its section).
- **Seed table**: the same engine; for N = 1..32 a batchgate with `max_concurrency: N` and N
  callers sending one 100-token request each; total time from the first send to the last
  answer, against the seed's 1776, 1981, 2067, 3767, 4431, 4942 ms.

## Adaptive concurrency: convergence

{_adaptive(results, ROOT / "bench" / "results")}

## Scheduling (issue 10)

{_scheduling(results, ROOT / "bench" / "results")}

## P3 steps

{_streams(results)}

## Where the proxies' CPU goes (small JSON POST, the proxy alone on core 0)

{_profile(results)}

## Instructions per request, against an earlier commit

Rates and CPU seconds move by 30 % on a shared machine; instruction counts do not.
`make bench-instructions [BASELINE=<commit>]` (bench/instructions.py, about 2 minutes) runs
this tree's batchgate and the baseline commit's under valgrind's callgrind, in front of the
same upstream, and counts the user-space instructions of exactly N requests of each kind
after a warm-up, 32 at a time as P2's wrk sends them (`json`: P2's small POST; `sse16`:
P2's 16-event stream). The kernel's share
(system calls, the loopback TCP stack) is not in these figures. The default baseline,
`f571e5b`, is the code behind the 2026-11-27 table.

{_instructions(ROOT / "bench" / "results")}

## CPU per request against an earlier commit, with an A/A control

Two processes of the same code, side by side, read a few per cent apart here (each has its
own memory layout and hash seed; the neighbours' load changes from second to second), so a
ratio between two versions is read next to that spread. `make bench-cpu [BASELINE=<commit>]`
(bench/cpu.py, about 5 minutes) runs two processes of this tree's batchgate and two of the
baseline commit's in front of the same upstream, pinned as above, and gives each one-second
wrk slices of P2's load (32 connections) in mirrored turns (A B C D D C B A, rotated from block
to block). CPU is each process's on-CPU time (schedstat, every thread) over the requests it
served; the A/A columns compare the two processes of one version. The brackets cover the
variation from block to block only; an offset that one process carries for its whole life
is not averaged out by more blocks, which is what the A/A columns measure.

{_cpu(ROOT / "bench" / "results")}
"""


def main() -> int:
    path = Path(sys.argv[1])
    results = json.loads(path.read_text())
    docs = ROOT / "docs" / "benchmarks.md"
    docs.write_text(keep_soak(markdown(results, path), docs))  # make soak's section stays
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
