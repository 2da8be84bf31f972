"""``make bench``: batchgate side by side with direct, HAProxy 2.6 and an aiohttp passthrough.

On a 2-core machine the upstream and the proxy under test share core 0 and the load generator
(this process, wrk, the Python clients) has core 1. One run measures, interleaved:

* P1 latency added at concurrency 1 and at 1,000 req/s (open loop);
* P2 max req/s for small JSON POSTs (wrk, 32 and 64 connections) and 16-event SSE streams;
* P3 concurrent 20-events/s SSE streams sustained with added inter-event p99 <= 5 ms;
* P5 RSS per queued request (10,000 queued) and per open stream (1,000 open);
* P4 ``batchgate sim`` tokens/s through batchgate (32 slots, 200 callers) over direct;
* the seed table through batchgate (max_concurrency = callers = 1..32);
* the adaptive cap's convergence on ``batchgate sim --max-batch 16`` against fixed caps;
* with py-spy installed, where batchgate's and the floor's CPU goes per request;
* scheduling (bench/scheduling.py): an interactive tenant's queue wait while a batch tenant
  floods, first come first served vs fair share vs classes (``tenants``); engine preemptions
  behind a count-only cap vs a token budget (``budget``).

It prints one table, writes bench/results/<date>.json and (full runs) docs/benchmarks.md.
Every process it starts is stopped at the end, on errors and Ctrl-C too.
Usage: .venv/bin/python bench/run.py [--quick] [--only raw,streams,queued,p4,seed,adaptive,...]
(a run of only some phases writes bench/results/<date>-only-<phases>.json, and no docs
unless ``--docs``; docgen takes the adaptive figures from the newest such file when its run
has none).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import contestants as cs
import convergence
import docgen
import phases
import report
import scheduling
import spy
import wrk
from procs import LOAD_CPU, Procs, ensure_tools, machine_info, pin_self, raise_nofile
from soak import keep_soak

PHASES = ("raw", "profile", "streams", "queued", "p4", "seed", "adaptive", "tenants",
          "budget")
RESULTS = cs.HERE / "results"
DOCS = cs.ROOT / "docs" / "benchmarks.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="batchgate vs direct, HAProxy and a floor.")
    parser.add_argument("--quick", action="store_true",
                        help="short smoke run (about a minute): exercises every phase")
    parser.add_argument("--only", default=",".join(PHASES),
                        help=f"comma-separated phases to run (default: all of {','.join(PHASES)})")
    parser.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                        help="write docs/benchmarks.md (default: on for full runs only)")
    parser.add_argument("--baseline", default="", metavar="REV",
                        help="also run this commit's batchgate side by side in P1-P3 and P5 "
                             "(make bench's BASELINE; empty: not run)")
    args = parser.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.only) - set(PHASES)
    if unknown:
        parser.error(f"--only: unknown phases {sorted(unknown)}; choose from {PHASES}")
    return args


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so the finally below stops every process


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    ensure_tools()
    pin_self(LOAD_CPU)
    raise_nofile()
    results: dict[str, Any] = {
        "schema": 1,
        "date": datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "command": "make bench" + (" BENCH_ARGS=--quick" if args.quick else ""),
        "quick": args.quick,
        "machine": machine_info(),
        "settings": {
            "raw": cs.RAW.__dict__, "queued": cs.QUEUED.__dict__,
            "stream_interval_ms": phases.STREAM_INTERVAL_S * 1000,
        },
        "errors": {},
    }
    failed = False
    with tempfile.TemporaryDirectory(prefix="batchgate-bench-") as tmp_name:
        tmp = Path(tmp_name)
        procs = Procs(tmp)
        run = phases.Run(
            procs=procs, tmp=tmp, quick=args.quick, rounds=1 if args.quick else 3,
            wrk_s=1.0 if args.quick else 2.0, scripts=wrk.write_scripts(tmp), say=say,
        )
        results["settings"].update(rounds=run.rounds, wrk_s=run.wrk_s)
        try:
            if args.baseline:
                run.baseline = cs.baseline_tree(args.baseline, tmp / "baseline")
                results["baseline"] = {"commit": args.baseline, "sha": _sha(args.baseline)}
            failed = _run_phases(run, args.only, results)
        except KeyboardInterrupt:
            say("interrupted: stopping every process started")
            failed = True
        finally:
            procs.close()
    results["wall_time_s"] = time.monotonic() - started
    results["machine"]["loadavg_end"] = os.getloadavg()[0]
    summary = report.summarise(results)
    results["summary"] = summary
    RESULTS.mkdir(exist_ok=True)
    partial = set(args.only) != set(PHASES)
    stem = results["date"][:10] + ("-quick" if args.quick else "")
    if partial:  # never overwrites the day's full run
        stem += "-only-" + "-".join(args.only)
    out = RESULTS / f"{stem}.json"
    out.write_text(json.dumps(_clean(results), indent=1) + "\n")
    print(report.table(summary), end="")
    print(scheduling.text(results), end="")
    print(f"wall time {results['wall_time_s']:.0f} s; raw numbers in {out.relative_to(cs.ROOT)}")
    if args.docs if args.docs is not None else not (args.quick or partial):
        # The soak section (make soak) is not this run's: carried over as it is.
        DOCS.write_text(keep_soak(docgen.markdown(results, out.relative_to(cs.ROOT)), DOCS))
        print(f"updated {DOCS.relative_to(cs.ROOT)}")
    return 1 if failed or results["errors"] else 0


def _run_phases(run: phases.Run, only: list[str], results: dict[str, Any]) -> bool:
    procs = run.procs
    upstream = cs.start_upstream(procs)

    def attempt(name: str, fn: Any) -> None:
        run.say(f"{name} ...")
        try:
            results[name] = fn()
        except Exception:  # one phase failing must not lose the others' figures
            results["errors"][name] = traceback.format_exc()
            run.say(f"{name} FAILED:\n{results['errors'][name]}")

    if "raw" in only:
        targets = cs.start_all(procs, run.tmp, upstream, cs.RAW, run.baseline)
        attempt("raw", lambda: phases.phase_raw(run, upstream, targets))
        cs.stop_all(procs, targets)
    if "profile" in only:
        attempt("profile", lambda: spy.phase_profile(procs, run.tmp, run.scripts["post"],
                                                     2.0 if run.quick else 3.0))
    if "streams" in only:
        steps = (100, 250) if run.quick else (250, 500, 750, 1000, 1500, 2000)
        # Fresh processes: the idle memory they start from.
        targets = cs.start_all(procs, run.tmp, upstream, cs.RAW, run.baseline)
        attempt("streams", lambda: phases.phase_streams(run, upstream, targets, steps))
        cs.stop_all(procs, targets)
    if "queued" in only:
        attempt("queued", lambda: phases.phase_queued(run, upstream, 1000 if run.quick else 10000))
    assert upstream.proc is not None
    procs.stop(upstream.proc)
    if "p4" in only or "seed" in only:
        sim = cs.start_sim(procs)
        if "p4" in only:
            attempt("p4", lambda: phases.phase_p4(run, sim))
        if "seed" in only:
            attempt("seed", lambda: phases.phase_seed(run, sim))
        if sim.proc is not None:
            procs.stop(sim.proc)
    # Each starts its own engine (a smaller batch, a KV budget) and its own batchgates.
    if "tenants" in only:
        attempt("tenants", lambda: scheduling.phase_tenants(run))
    if "budget" in only:
        attempt("budget", lambda: scheduling.phase_budget(run))
    if "adaptive" in only:
        attempt("adaptive", lambda: convergence.phase_adaptive(procs, run.tmp, run.quick,
                                                                run.say))
    return bool(results["errors"])


def _sha(rev: str) -> str:
    return subprocess.run(["git", "-C", str(cs.ROOT), "rev-parse", "--short", rev],
                          capture_output=True, text=True, check=True).stdout.strip()


def _clean(value: Any) -> Any:
    """JSON without NaN: missing figures are null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


if __name__ == "__main__":
    raise SystemExit(main())
