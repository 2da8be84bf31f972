"""``make soak``: mixed load with hang-ups and a replica restart; is the proxy leaking?

batchgate runs as its own process (``batchgate serve``, access log on, to /dev/null) in front
of three ``batchgate sim`` engines, each its own process. For ``--seconds`` (``SOAK_S``,
default 600) this process keeps ``--callers`` callers busy with a mix of chat completions,
SSE streams and ``GET /v1/models``; one caller in five hangs up (before the answer's head, or
mid-stream). Halfway through, one engine is killed (SIGKILL) and started again on its port
after 5 s. Every 10 s the proxy's RSS (/proc/<pid>/statm) and open descriptors
(/proc/<pid>/fd) are sampled.

At the end the load stops, the proxy must come back to an empty queue and no slot in use
(its /metrics), and the report goes to bench/results/soak-<date>.json and to the soak section
of docs/benchmarks.md (everything from the ``SOAK_MARKER`` line on; ``make bench`` keeps it).
Growth is read from the first sample after warm-up (a tenth of the run, at least 10 s) to the
last: the allocator's and the pools' first fill is not a leak. Every process started here is
stopped at the end, on errors and Ctrl-C too; nothing is killed by name.

Usage: .venv/bin/python bench/soak.py [--seconds 600] [--callers 48] [--seed 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from procs import (
    LOAD_CPU,
    SUT_CPU,
    Proc,
    Procs,
    can_pin,
    fd_count,
    free_port,
    pin_self,
    raise_nofile,
    rss_kib,
    wait_http,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "bench" / "results"
#: The soak section of docs/benchmarks.md starts at this line and runs to the end of the file.
SOAK_MARKER = "<!-- soak: written by make soak (bench/soak.py); make bench keeps it -->"
SAMPLE_S = 10.0
REPLICAS = 3
CAP = 8  # max_concurrency of each engine, and its --max-batch


@dataclass
class Load:
    """What the callers saw, by outcome."""

    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def done(self) -> int:
        return sum(self.outcomes.values())


def request_bytes(kind: str, rid: str) -> bytes:
    if kind == "models":
        return f"GET /v1/models HTTP/1.1\r\nHost: soak\r\nX-Request-Id: {rid}\r\n\r\n".encode()
    body = json.dumps({
        "model": "sim", "messages": [{"role": "user", "content": "soak"}],
        "max_tokens": 16, "stream": kind == "stream",
    }).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nX-Request-Id: {rid}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def one_call(port: int, rng: random.Random, rid: str) -> str:
    """One request on its own connection; returns its outcome as the caller saw it."""
    kind = rng.choices(["chat", "stream", "models"], weights=[50, 35, 15])[0]
    hangup = rng.choice(["before_head", "mid_stream"]) if rng.random() < 0.2 else None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes(kind, rid))
        if hangup == "before_head":
            await asyncio.sleep(rng.uniform(0, 0.05))
            return "hung up before head"
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1].decode()
        headers = head.decode("latin-1").lower()
        if "transfer-encoding: chunked" in headers:
            events = 0
            while size := int((await reader.readline()).split(b";")[0], 16):
                await reader.readexactly(size + 2)
                events += 1
                if hangup == "mid_stream" and events >= 3:
                    return "hung up mid-stream"
            await reader.readline()
        else:
            length = int(headers.split("content-length:", 1)[1].split("\r\n", 1)[0])
            await reader.readexactly(length)
        return status
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError):
        return "cut"
    finally:
        writer.close()


async def drive(port: int, callers: int, until: float, seed: int, load: Load) -> None:
    async def caller(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        i = 0
        while time.monotonic() < until:
            try:
                outcome = await asyncio.wait_for(one_call(port, rng, f"s{n}x{i}"), 60)
            except TimeoutError:
                outcome = "no answer in 60 s"
            load.outcomes[outcome] += 1
            i += 1

    await asyncio.gather(*(caller(n) for n in range(callers)))


def write_config(path: Path, port: int, engine_ports: list[int]) -> None:
    replicas = "".join(
        f"  - name: sim-{i}\n    url: http://127.0.0.1:{p}\n    max_concurrency: {CAP}\n"
        for i, p in enumerate(engine_ports))
    path.write_text(
        f"server:\n  host: 127.0.0.1\n  port: {port}\nreplicas:\n{replicas}"
        "queue:\n  max_size: 1000\n  timeout_s: 30\nhealth:\n  interval_s: 1\n  timeout_s: 1\n"
        "upstream:\n  connect_timeout_s: 2\n  read_timeout_s: 60\n"
        "logging:\n  format: json\n  level: info\n")


def start_engine(procs: Procs, i: int, port: int) -> Proc:
    proc = procs.start(f"sim-{i}", [
        sys.executable, "-m", "proxy", "sim", "--port", str(port), "--max-batch", str(CAP),
        "--time-scale", "0.05", "--model", "sim"])
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc


def start_proxy(procs: Procs, config: Path, log: Path) -> Proc:
    """``batchgate serve`` with its access log (stdout) going nowhere: the log's cost and
    memory are part of what is soaked, its lines are not kept."""
    with log.open("ab") as err:
        popen = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, {SUT_CPU})) if procs.pinned else None)
    proc = Proc("batchgate", popen, log)
    procs.started.append(proc)
    return proc


def gauges(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    wanted = ("batchgate_queue_depth ", "batchgate_replica_in_flight{")
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(wanted)}


async def soak(args: argparse.Namespace, procs: Procs, work: Path) -> dict[str, Any]:
    engine_ports = [free_port() for _ in range(REPLICAS)]
    engines = [start_engine(procs, i, p) for i, p in enumerate(engine_ports)]
    port = free_port()
    config = work / "soak.yaml"
    write_config(config, port, engine_ports)
    proxy = start_proxy(procs, config, work / "batchgate.log")
    wait_http(f"http://127.0.0.1:{port}/readyz", proxy)

    load = Load()
    started = time.monotonic()
    until = started + args.seconds
    samples: list[dict[str, float]] = []
    events: list[str] = []

    def sample() -> None:
        samples.append({"t_s": round(time.monotonic() - started, 1),
                        "rss_kib": rss_kib(proxy.pid), "fds": fd_count(proxy.pid),
                        "requests": load.done})

    async def watch() -> None:
        restart_at = started + args.seconds / 2
        restarted = False
        sample()
        while time.monotonic() < until:
            await asyncio.sleep(min(SAMPLE_S, max(0.0, until - time.monotonic())))
            if not proxy.alive():
                raise RuntimeError(f"batchgate exited:\n{proxy.tail()}")
            if not restarted and time.monotonic() >= restart_at:
                restarted = True
                victim = engines[0]
                os.killpg(victim.pid, signal.SIGKILL)  # a process this run started
                victim.popen.wait(5)
                procs.started.remove(victim)
                events.append(f"{time.monotonic() - started:.0f} s: sim-0 killed (SIGKILL)")
                await asyncio.sleep(5)
                engines[0] = await asyncio.to_thread(start_engine, procs, 0, engine_ports[0])
                events.append(f"{time.monotonic() - started:.0f} s: sim-0 restarted")
            sample()

    await asyncio.gather(drive(port, args.callers, until, args.seed, load), watch())
    # The load has stopped: the proxy must hold nothing (every caller has left or finished).
    # Another process: polled (bounded, 30 s), there is nothing to wait on.
    for _ in range(150):
        left = gauges(port)
        if not any(left.values()):
            break
        await asyncio.sleep(0.2)
    sample()
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": args.seconds, "callers": args.callers, "seed": args.seed,
            "samples": samples, "events": events, "outcomes": dict(load.outcomes),
            "gauges_after": left, "pinned": can_pin()}


def growth(samples: list[dict[str, float]], seconds: float) -> dict[str, float]:
    warm = max(SAMPLE_S, seconds / 10)
    base = next(s for s in samples if s["t_s"] >= warm) if samples[-1]["t_s"] >= warm \
        else samples[0]
    last = samples[-1]
    minutes = max((last["t_s"] - base["t_s"]) / 60, 1e-9)
    return {
        "from_t_s": base["t_s"],
        "rss_start_mib": samples[0]["rss_kib"] / 1024,
        "rss_base_mib": base["rss_kib"] / 1024,
        "rss_end_mib": last["rss_kib"] / 1024,
        "rss_max_mib": max(s["rss_kib"] for s in samples) / 1024,
        "rss_growth_mib_per_min": (last["rss_kib"] - base["rss_kib"]) / 1024 / minutes,
        "fds_start": samples[0]["fds"], "fds_base": base["fds"], "fds_end": last["fds"],
        "fds_max": max(s["fds"] for s in samples),
    }


def section(result: dict[str, Any], commit: str) -> str:
    g = result["growth"]
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(result["outcomes"].items()))
    rows = "\n".join(f"| {s['t_s']:.0f} | {s['rss_kib'] / 1024:.1f} | {s['fds']} | "
                     f"{s['requests']} |" for s in result["samples"])
    gauges_ok = not any(result["gauges_after"].values())
    return f"""{SOAK_MARKER}
## Soak (`make soak`)

{result['seconds']:.0f} s of mixed load (chat completions, SSE streams, `GET /v1/models`;
one caller in five hangs up, before the head or mid-stream) from {result['callers']} callers
through `batchgate serve` (access log on) to three `batchgate sim` engines
({CAP} slots each), one of them killed with SIGKILL halfway and restarted 5 s later. Run of
{result['date']}, commit `{commit}`, seed {result['seed']}; raw figures in
`bench/results/{result['file']}`. Reproduce with `make soak` (`SOAK_S=600` by default).

| | start | after warm-up ({g['from_t_s']:.0f} s) | end | max |
|---|---|---|---|---|
| RSS (MiB) | {g['rss_start_mib']:.1f} | {g['rss_base_mib']:.1f} | {g['rss_end_mib']:.1f} \
| {g['rss_max_mib']:.1f} |
| open descriptors | {g['fds_start']} | {g['fds_base']} | {g['fds_end']} | {g['fds_max']} |

RSS growth after warm-up: **{g['rss_growth_mib_per_min']:+.2f} MiB/min**; descriptors
{g['fds_base']} -> {g['fds_end']} (the end sample is taken after the load stopped).
After the load: queue and slots {'all 0' if gauges_ok else 'NOT 0: ' + str(result['gauges_after'])}.
Events: {'; '.join(result['events']) or 'none'}. Requests by what the caller saw
({sum(result['outcomes'].values())} in all): {outcomes}.

| t (s) | RSS (MiB) | fds | requests done |
|---|---|---|---|
{rows}
"""


def keep_soak(page: str, docs: Path = DOCS) -> str:
    """``page`` (a new docs/benchmarks.md from make bench) with the current soak section."""
    current = docs.read_text() if docs.exists() else ""
    marker, rest = current.partition(SOAK_MARKER)[1:]
    return page.rstrip("\n") + "\n\n" + marker + rest if marker else page


def write_docs(text: str) -> None:
    current = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    head = current.split(SOAK_MARKER, 1)[0].rstrip("\n")
    DOCS.write_text(head + "\n\n" + text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="batchgate soak: RSS and FDs under load.")
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--callers", type=int, default=48)
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--docs", action=argparse.BooleanOptionalAction, default=True,
                        help="write the soak section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="batchgate-soak-") as tmp:
        procs = Procs(Path(tmp))
        if procs.pinned:
            pin_self(LOAD_CPU)  # the engines and the proxy share the other core
        try:
            result = asyncio.run(soak(args, procs, Path(tmp)))
        finally:
            procs.close()
    result["growth"] = growth(result["samples"], args.seconds)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    RESULTS.mkdir(exist_ok=True)
    result["file"] = f"soak-{result['date'][:10]}.json"
    (RESULTS / result["file"]).write_text(json.dumps(result, indent=1) + "\n")
    g = result["growth"]
    print(f"RSS {g['rss_base_mib']:.1f} -> {g['rss_end_mib']:.1f} MiB after warm-up "
          f"({g['rss_growth_mib_per_min']:+.2f} MiB/min), fds {g['fds_base']} -> "
          f"{g['fds_end']}; gauges after: {result['gauges_after']}; {result['outcomes']}")
    if args.docs:
        write_docs(section(result, commit))
        print(f"updated {DOCS.relative_to(ROOT)}")
    return 0 if not any(result["gauges_after"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
