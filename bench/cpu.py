"""``make bench-cpu``: CPU time per request, this tree against an earlier commit, with the
machine's own resolution measured in the same run.

On a shared machine two processes of the *same* code, measured side by side, read a few per
cent apart: each process has its own memory layout and hash seed, and neighbours' load moves
from one second to the next. A ratio between two versions means something only next to that
spread, so this run measures it as well (an A/A control):

- two processes of this tree's batchgate and two of the baseline commit's, all in front of the
  same bench upstream, pinned as ``make bench`` pins them;
- one-second wrk slices (P2's load: 32 connections, the small JSON POST or the 16-event
  stream); a block is one slice of each in turn and then one of each in the reverse order
  (A B C D D C B A), so a steady drift in the machine's speed falls on all four alike, and
  the order rotates from block to block;
- the CPU time each process spent (/proc schedstat, nanoseconds, every thread) over the
  requests it served;
- per block: this tree over the baseline (each side the sum of its two processes), and the
  two A/A ratios (first process over second, of each version).

Reported: the mean of the per-block ratios with two standard errors either side, and the A/A
ratios beside it. No target: it says how close to 1.0 this machine can tell two versions
apart, which ``make bench``'s single "no worse" ratio cannot. The interval covers the
variation from block to block only: what sets one process apart from another of the same
code for its whole life (the A/A columns show its size; one process against one, so about
1.4 times the spread of the pooled ratio) is not averaged out by more blocks.

Usage: .venv/bin/python bench/cpu.py [--baseline REV] [--blocks N]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import contestants as cs
import yaml
from instructions import DEFAULT_BASELINE
from procs import LOAD_CPU, Proc, Procs, ensure_tools, free_port, pin_self, raise_nofile, wait_http
from wrk import write_scripts

#: kind: (wrk script, path), P2's two loads.
KINDS = {"json": ("post", "/v1/completions"), "sse16": ("stream", "/sse?events=16&interval_ms=0")}
#: Two processes of each version: the second of each is the A/A control.
NAMES = ("batchgate", "batchgate#2", "baseline", "baseline#2")
CONNECTIONS = 32


def cpu_ns(pid: int) -> int:
    """CPU time of the whole process ``pid`` so far, in ns: its threads, those that ended
    included (Linux's per-process CPU clock, ``clock_getcpuclockid``: clock ticks in /proc are
    10 ms, too coarse for a one-second slice)."""
    return time.clock_gettime_ns(((~pid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, SCHED)


def block_order(names: tuple[str, ...], block: int) -> list[str]:
    """The slices of one block: the names rotated by ``block``, then the same in reverse (a
    drift that is linear over the block costs each contestant the same)."""
    k = block % len(names)
    order = list(names[k:] + names[:k])
    return order + order[::-1]


def _mean_2se(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return {"mean": mean, "low": mean - 2 * se, "high": mean + 2 * se,
            "median": statistics.median(values), "sd": statistics.stdev(values)
            if len(values) > 1 else math.nan}


def summarize(blocks: list[dict[str, tuple[int, int]]]) -> dict[str, Any]:
    """Per-block (cpu ns, requests) of each of NAMES, in; us per request and the ratios, out."""
    def us(block: dict[str, tuple[int, int]], *names: str) -> float:
        return sum(block[n][0] for n in names) / sum(block[n][1] for n in names) / 1e3

    ratios: dict[str, list[float]] = {"batchgate/baseline": [], "A/A batchgate": [],
                                      "A/A baseline": []}
    for block in blocks:
        ratios["batchgate/baseline"].append(
            us(block, "batchgate", "batchgate#2") / us(block, "baseline", "baseline#2"))
        ratios["A/A batchgate"].append(us(block, "batchgate") / us(block, "batchgate#2"))
        ratios["A/A baseline"].append(us(block, "baseline") / us(block, "baseline#2"))
    whole = {n: (sum(b[n][0] for b in blocks), sum(b[n][1] for b in blocks)) for n in NAMES}
    return {
        "us_per_request": {n: whole[n][0] / whole[n][1] / 1e3 for n in NAMES},
        "blocks": len(blocks),
        "ratios": {k: _mean_2se(v) for k, v in ratios.items()},
        "per_block": ratios,
    }


def _slice(url: str, script: Path) -> int:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{CONNECTIONS}", "-d1s", "--timeout", "5s", "-s", str(script), url],
        capture_output=True, text=True, timeout=60, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary for {url}:\n{out.stdout}\n{out.stderr}")
    data = json.loads(line[len("WRK_JSON "):])
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    if errors:
        raise RuntimeError(f"{url}: {errors} errors in a slice")
    if not data["requests"]:
        # A proxy that stalled for the whole second: no CPU per request to speak of.
        raise RuntimeError(f"{url}: no request answered in a one-second slice")
    return int(data["requests"])


def measure(targets: dict[str, tuple[Proc, str]], script: Path, blocks: int
            ) -> list[dict[str, tuple[int, int]]]:
    for _, url in targets.values():
        _slice(url, script)  # warm-up: connections pooled, code paths taken
    out = []
    for b in range(blocks):
        block = {n: (0, 0) for n in NAMES}
        for name in block_order(NAMES, b):
            proc, url = targets[name]
            before = cpu_ns(proc.pid)
            requests = _slice(url, script)
            spent = cpu_ns(proc.pid) - before
            block[name] = (block[name][0] + spent, block[name][1] + requests)
        out.append(block)
        print(f"  block {b + 1}/{blocks}", flush=True)
    return out


def _start(procs: Procs, tmp: Path, tree: Path, name: str, upstream_port: int, path: str
           ) -> tuple[Proc, str]:
    port = free_port()
    config = cs.batchgate_config(upstream_port, port, cs.RAW)
    config["server"] = cs.older_server(config["server"])  # the same keys for both versions
    conf = tmp / f"{name}.yaml"
    conf.write_text(yaml.safe_dump(config, sort_keys=False))
    # cwd and PYTHONPATH are the tree: `python -m` puts the cwd first on sys.path.
    proc = procs.start(name, ["env", "-C", str(tree), f"PYTHONPATH={tree}", sys.executable,
                              "-m", "proxy", "serve", "--config", str(conf)])
    wait_http(f"http://127.0.0.1:{port}/readyz", proc)
    return proc, f"http://127.0.0.1:{port}{path}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE,
                        help=f"commit to compare with (default {DEFAULT_BASELINE})")
    parser.add_argument("--blocks", type=int, default=16, help="blocks per kind (default 16)")
    args = parser.parse_args(argv)
    if args.blocks < len(NAMES) or args.blocks % len(NAMES):
        # Each contestant is the middle of a block (its two slices back to back, so the work
        # of closing the first one's connections falls in its own second) equally often.
        parser.error(f"--blocks: a multiple of {len(NAMES)}, got {args.blocks}")
    ensure_tools()
    pin_self(LOAD_CPU)
    raise_nofile()
    label = cs.tree_label()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="batchgate-cpu-") as tmp_name:
        tmp = Path(tmp_name)
        procs = Procs(tmp)
        try:
            upstream = cs.start_upstream(procs)
            scripts = write_scripts(tmp)
            base = cs.baseline_tree(args.baseline, tmp / "baseline")
            trees = {"batchgate": cs.ROOT, "batchgate#2": cs.ROOT, "baseline": base,
                     "baseline#2": base}
            for kind, (script, path) in KINDS.items():
                print(f"{kind}: {args.blocks} blocks", flush=True)
                # Fresh processes for each kind: one's memory layout is not carried into both.
                targets = {n: _start(procs, tmp, trees[n], n.replace("#", "-"), upstream.port,
                                     path) for n in NAMES}
                try:
                    results[kind] = summarize(measure(targets, scripts[script], args.blocks))
                finally:
                    for proc, _ in targets.values():
                        procs.stop(proc)
        finally:
            procs.close()
    print(f"CPU per request, this tree {label} against {args.baseline} "
          f"(mean of {args.blocks} blocks, +-2 standard errors)")
    for kind, r in results.items():
        line = ", ".join(f"{k} {v['mean']:.3f}x [{v['low']:.3f}, {v['high']:.3f}]"
                         for k, v in r["ratios"].items())
        print(f"  {kind}: {line}")
    out = cs.HERE / "results" / f"{datetime.now(UTC):%Y-%m-%d}-cpu.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"baseline": args.baseline, "head": label,
                               "blocks": args.blocks,
                               "connections": CONNECTIONS, "kinds": results}, indent=1) + "\n")
    print(f"raw figures in {out.relative_to(cs.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
