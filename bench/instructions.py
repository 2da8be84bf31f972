"""``make bench-instructions``: instructions per request, this tree against an earlier commit.

Rates and CPU seconds move with whatever else the machine runs (a shared 2-core box moves them
by 30 %). The number of instructions a request costs does not: valgrind's callgrind counts
them exactly, so two versions of batchgate compare to within 0.5 % whatever the load. Each
batchgate runs under callgrind in front of the same bench upstream (bench/upstream.py, not
counted); after a warm-up the counters are zeroed, N requests are sent, and the counters are
dumped, so the figure is the user-space instructions of exactly those N requests (the kernel's
share, system calls and the loopback TCP stack, is not counted: see docs/benchmarks.md).

Usage: .venv/bin/python bench/instructions.py [--baseline REV] [-n N]
The baseline is the commit's ``proxy/`` (git archive), run with this tree's virtualenv.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import contestants as cs
import yaml
from procs import Procs, free_port, raise_nofile, wait_http
from wrk import SMALL_POST

#: The commit that produced the 2026-11-27 figures of docs/benchmarks.md.
DEFAULT_BASELINE = "f571e5b"
WARMUP = 100
#: P2 runs wrk with 32 and 64 connections and the body below. At 16 callers and a body without
#: "model" the figure understated this tree's cost against f571e5b (1.017x where P2's load
#: gives 1.032x): what a request costs depends on how many are in flight.
CONCURRENCY = 32
KINDS = {
    # What make bench's P2 sends: a small JSON completion, and a 16-event stream (a POST: work).
    "json": ("/v1/completions", SMALL_POST.encode()),
    "sse16": ("/sse?events=16&interval_ms=0", b'{"stream":true}'),
    # The same stream with its events 2 ms apart, each its own read, as P3's (and a real
    # engine's) are: the cost per event, where interval 0 lets reads merge events.
    "sse16_spaced": ("/sse?events=16&interval_ms=2", b'{"stream":true}'),
}


async def _load(url: str, kind: str, n: int) -> None:
    path, body = KINDS[kind]
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        todo = iter(range(n))

        async def worker() -> None:
            for _ in todo:
                async with session.post(url + path, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{kind}: status {resp.status}")

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def _total(dump: str) -> int:
    with open(dump) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def measure(procs: Procs, tmp: Path, tree: Path, name: str, upstream: cs.Target, n: int
            ) -> dict[str, float]:
    port = free_port()
    config = cs.batchgate_config(upstream.port, port, cs.RAW)
    config["health"] = {"path": "/health", "interval_s": 3600, "timeout_s": 2}  # no probes
    if tree != cs.ROOT:  # an older commit may not know the keys added since (32 callers here)
        config["server"] = cs.older_server(config["server"])
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp / f"callgrind-{name}.out"
    # cwd and PYTHONPATH are the tree: `python -m` puts the cwd first on sys.path.
    proc = procs.start(name, [
        "env", "-C", str(tree), f"PYTHONPATH={tree}",
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-line=no",
        sys.executable, "-m", "proxy", "serve", "--config", str(path),
    ], cpu=None)
    wait_http(f"http://127.0.0.1:{port}/readyz", proc, timeout_s=300)
    url = f"http://127.0.0.1:{port}"
    per_request: dict[str, float] = {}
    try:
        for kind in KINDS:
            asyncio.run(_load(url, kind, WARMUP))
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True,
                           capture_output=True)
            asyncio.run(_load(url, kind, n))
            before = set(glob.glob(f"{out}*"))
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True,
                           capture_output=True)
            dumps = sorted(set(glob.glob(f"{out}*")) - before)
            per_request[kind] = _total(dumps[-1]) / n
    finally:
        procs.stop(proc, grace_s=60)
    return per_request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE,
                        help=f"commit to compare with (default {DEFAULT_BASELINE})")
    parser.add_argument("-n", type=int, default=400, help="requests counted per figure")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    raise_nofile()
    label = cs.tree_label()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="batchgate-instr-") as tmp_name:
        tmp = Path(tmp_name)
        procs = Procs(tmp)
        try:
            upstream = cs.start_upstream(procs, cpu=None)
            trees = {"baseline": cs.baseline_tree(args.baseline, tmp / "baseline"),
                     "this tree": cs.ROOT}
            for name, tree in trees.items():
                results[name] = measure(procs, tmp, tree, name.replace(" ", "-"), upstream,
                                        args.n)
        finally:
            procs.close()
    print(f"instructions per request (callgrind, user space), {args.n} requests each")
    print(f"| request | baseline {args.baseline} | this tree {label} | ratio |")
    print("|---|---|---|---|")
    for kind in KINDS:
        base, now = results["baseline"][kind], results["this tree"][kind]
        print(f"| {kind} | {base / 1000:.1f} k | {now / 1000:.1f} k | {now / base:.3f}x |")
    out = cs.HERE / "results" / f"{datetime.now(UTC):%Y-%m-%d}-instructions.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"baseline": args.baseline, "head": label, "n": args.n,
                               "per_request": results}, indent=1) + "\n")
    print(f"raw figures in {out.relative_to(cs.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
