"""Slow clients suite (issue 8): 300 head-tricklers and 50 body-tricklers against a running
``batchgate serve`` (its own process, uvloop, as in production), while one normal caller
keeps sending requests.

What must hold:
- every trickler is cut with an OpenAI-style 408 within its timeout (plus a bounded slack
  for a loaded machine), never before it, and long before it could have finished sending;
- the proxy counts exactly 300 ``header_timeout`` and 50 ``body_timeout`` rejections;
- the normal caller's p99 latency while the tricklers hold their connections and are cut
  stays within ``P99_MARGIN_MS`` of its baseline, measured in the same run just before and
  just after the attack (the worse of the two, so background noise on a shared machine that
  hits one baseline does not fail the run), plus their difference when that is larger than
  the margin (the run's own measure of that noise).

The tricklers arrive over 1.5 s, interleaved, as a flood from many clients does; each is
timed from its own connection.

Loopback only; about 10 s (35 s to fail if the tricklers are never cut).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import BOUND_S, FakeReplica, start_app

HEAD_TRICKLERS = 300
BODY_TRICKLERS = 50
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
MIN_BODY_RATE = 100.0  # bytes/s; the body tricklers send 2 B/s
TRICKLE_EVERY_S = 0.5
#: How late past its timeout a trickler may be cut: the timer itself is exact to a millisecond;
#: the rest is a 2-core machine shared with other work, and 350 cuts falling due together.
CUT_SLACK_S = 3.0
#: The normal caller's p99 under attack may exceed its baseline p99 by this much, or by the
#: difference between its two baselines if that is larger (the machine's own noise in this
#: run). A few ms is the promise; 10 ms keeps a shared CI machine's scheduling from failing it.
P99_MARGIN_MS = 10.0
BASELINE_SAMPLES = 400

#: The tricklers arrive over this long, interleaved.
ARRIVAL_S = 1.5
HEAD_START = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
BODY_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"

LISTENING = re.compile(rb"listening on (http://\S+)")


@dataclass
class Trickler:
    """One slow caller on a bare socket: what it got back, and when."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    started: float
    answer: bytes = b""
    cut_at: float | None = None
    sent: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


def percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=1000, method="inclusive")[int(q * 1000) - 1]


@contextlib.asynccontextmanager
async def batchgate(tmp_path: Path, replica_url: str) -> AsyncIterator[str]:
    """``python -m proxy serve`` with small timeouts; yields its URL; killed at the end."""
    config = tmp_path / "batchgate.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": 0, "header_timeout_s": HEADER_TIMEOUT_S,
                   "body_timeout_s": BODY_TIMEOUT_S, "min_body_rate": MIN_BODY_RATE},
        "replicas": [{"name": "r", "url": replica_url, "max_concurrency": 8}],
        "health": {"interval_s": 60},
        "logging": {"format": "text", "level": "info"},  # info: the "listening" line
    }))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    out = proc.stdout
    lines: list[bytes] = []
    pump: asyncio.Task[None] | None = None
    try:
        async def until_listening() -> str:
            while line := await out.readline():
                lines.append(line)
                if match := LISTENING.search(line):
                    return match.group(1).decode()
            raise AssertionError(f"batchgate exited before listening: {b''.join(lines)!r}")

        url = await asyncio.wait_for(until_listening(), BOUND_S)

        async def drain_output() -> None:  # the access log: a full pipe must never block it
            while await out.readline():
                pass

        pump = asyncio.create_task(drain_output())
        yield url
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), BOUND_S)
        if pump is not None:
            await asyncio.wait_for(pump, BOUND_S)


async def open_trickler(host: str, port: int, first: bytes) -> Trickler:
    # Taken before connecting: the proxy's timer starts later than this, and the caller sees
    # the cut later than it happens, so the time measured is never shorter than the timeout.
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(first)
    return Trickler(reader, writer, started)


async def read_cut(t: Trickler) -> None:
    """Read until the proxy closes the connection; note when."""
    try:
        t.answer = await asyncio.wait_for(t.reader.read(), BOUND_S * 3)
    except ConnectionResetError:
        t.answer = b"<reset>"
    t.cut_at = time.monotonic()
    t.done.set()


async def tick(tricklers: list[Trickler], byte: bytes, opened: asyncio.Event) -> None:
    """One shared ticker (not 350 sleeping tasks): a byte to every trickler still open."""
    while not opened.is_set() or any(not t.done.is_set() for t in tricklers):
        for t in tricklers:
            if not t.done.is_set() and not t.writer.is_closing():
                t.writer.write(byte)
                t.sent += 1
        await asyncio.sleep(TRICKLE_EVERY_S)


async def measure(session: aiohttp.ClientSession, url: str, *, count: int | None = None,
                  until: asyncio.Event | None = None) -> list[float]:
    """Sequential requests on one kept-alive connection; latencies in ms."""
    samples: list[float] = []
    body = {"prompt": "hi", "max_tokens": 1}
    while (count is not None and len(samples) < count) or (
            until is not None and not until.is_set()):
        start = time.perf_counter()
        async with session.post(url + "/v1/completions", json=body) as resp:
            await resp.read()
            assert resp.status == 200
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def rejected(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples if s.name == "batchgate_rejected_requests_total"
    }


def check_cut(t: Trickler, timeout_s: float, reason: str, total_bytes: int) -> None:
    assert t.cut_at is not None
    head, _, body = t.answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), t.answer[:200]
    assert json.loads(body)["error"]["code"] == reason
    waited = t.cut_at - t.started
    assert timeout_s - 0.01 <= waited <= timeout_s + CUT_SLACK_S, waited  # 10 ms: clocks
    assert t.sent < total_bytes, "it sent everything: it was never cut"


async def test_tricklers_are_cut_and_a_normal_caller_does_not_notice(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4096:  # 350 tricklers + the replica's side
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    replica = FakeReplica("r")
    replica.runner, replica.url = await start_app(replica.app())
    try:
        async with batchgate(tmp_path, replica.url) as url, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1),
            timeout=aiohttp.ClientTimeout(total=BOUND_S),
        ) as session:
            host, port = url.removeprefix("http://").split(":")
            await measure(session, url, count=100)  # warm up: pools, caches, the JIT-less rest
            before = await measure(session, url, count=BASELINE_SAMPLES)

            # A head needs 60 more bytes, a body 1000: at 2 B/s, 30 s and 500 s to finish.
            slow_field = b"X-Slow: " + b"a" * 50 + b"\r\n\r\n"
            heads: list[Trickler] = []
            bodies: list[Trickler] = []
            opened, all_cut = asyncio.Event(), asyncio.Event()
            readers: list[asyncio.Task[None]] = []

            async def attack() -> None:
                """The tricklers arrive over ARRIVAL_S (six heads to one body), as a real flood
                does, rather than in one millisecond; so their cuts are spread as well."""
                total = HEAD_TRICKLERS + BODY_TRICKLERS
                for i in range(total):
                    body = (i % 7 == 6 and len(bodies) < BODY_TRICKLERS) or (
                        len(heads) == HEAD_TRICKLERS)
                    t = await open_trickler(host, int(port), BODY_HEAD if body else HEAD_START)
                    (bodies if body else heads).append(t)
                    readers.append(asyncio.create_task(read_cut(t)))
                    await asyncio.sleep(ARRIVAL_S / total)
                opened.set()
                await asyncio.gather(*readers)
                all_cut.set()

            attacker = asyncio.create_task(attack())
            tickers = [asyncio.create_task(tick(heads, slow_field[:1], opened)),
                       asyncio.create_task(tick(bodies, b"x", opened))]
            try:
                during = await asyncio.wait_for(measure(session, url, until=all_cut),
                                                BOUND_S * 3)
            finally:
                for task in [attacker, *readers, *tickers]:
                    task.cancel()
                await asyncio.gather(attacker, *readers, *tickers, return_exceptions=True)
                for t in heads + bodies:
                    t.writer.close()
            after = await measure(session, url, count=BASELINE_SAMPLES)
            reasons = await rejected(session, url)
    finally:
        await replica.runner.cleanup()

    for t in heads:
        check_cut(t, HEADER_TIMEOUT_S, "header_timeout", len(slow_field))
    for t in bodies:
        check_cut(t, BODY_TIMEOUT_S, "body_timeout", 1000)
    assert reasons["header_timeout"] == HEAD_TRICKLERS
    assert reasons["body_timeout"] == BODY_TRICKLERS
    assert replica.arrivals == 100 + 2 * BASELINE_SAMPLES + len(during), "a trickler got through"

    p99_before, p99_after = percentile(before, 0.99), percentile(after, 0.99)
    under_attack = percentile(during, 0.99)
    # The two baselines differ only by what else the machine did meanwhile: that much noise
    # is allowed on top of the margin.
    margin = max(P99_MARGIN_MS, abs(p99_before - p99_after))
    report = (f"p99 ms: before {p99_before:.2f}, during {under_attack:.2f} "
              f"({len(during)} requests), after {p99_after:.2f}; allowed "
              f"{max(p99_before, p99_after) + margin:.2f}")
    print(report)
    assert len(during) >= 100, f"too few requests during the attack to judge: {report}"
    assert under_attack <= max(p99_before, p99_after) + margin, report
