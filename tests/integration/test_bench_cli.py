"""``batchgate bench`` against real loopback servers: the simulated engine, and small fakes that
fail on purpose. Assertions are on counts and orderings, never on how long anything took."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, cast

import aiohttp
import pytest
from aiohttp import web

from proxy.bench import probes
from proxy.bench.cli import (
    BenchOptions,
    LevelResult,
    RequestResult,
    add_parser,
    arrival_offsets,
    cmd_bench,
    run_level,
)
from proxy.config import SimulatedConfig
from proxy.sim.engine import SimEngine
from proxy.sim.server import SIM_ENGINE_KEY, create_sim_app
from tests.integration.conftest import BOUND_S, start_app, until

ROOT = Path(__file__).resolve().parents[2]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FAST = SimulatedConfig(max_batch=4, time_scale=0.01)
MAX_TOKENS = 12


class Sim:
    def __init__(self, url: str, engine: SimEngine) -> None:
        self.url = url
        self.engine = engine

    def assert_idle(self) -> None:
        """Every request the bench sent ran to its end: none aborted, none left running."""
        engine = self.engine
        assert engine.running == engine.waiting == engine.total_aborted == 0, engine
        assert engine.total_started == engine.total_finished, engine


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    app = create_sim_app(FAST, model="bench-model")
    runner, url = await start_app(app)
    yield Sim(url, app[SIM_ENGINE_KEY])
    await runner.cleanup()


def check_complete(level: LevelResult, requests: int, stream: bool) -> None:
    assert (level.requests, level.ok, level.errors) == (requests, requests, {})
    assert level.tokens == requests * MAX_TOKENS
    assert level.no_usage == 0 and level.total_time_s > 0 and level.tokens_per_s > 0
    for result in level.results:
        assert result.status == 200 and result.usage and result.tokens == MAX_TOKENS
        assert result.ttft is not None
        if stream:
            assert 0 < result.ttft < result.e2e
            assert len(result.itl) == MAX_TOKENS - 1 and all(gap >= 0 for gap in result.itl)
        else:
            assert result.ttft == result.e2e and result.itl == []
    assert level.itl_count == (requests * (MAX_TOKENS - 1) if stream else 0)
    assert level.ttft_ms["p50"] <= level.ttft_ms["p95"] <= level.ttft_ms["p99"]
    assert level.ttft_ms["p99"] <= level.e2e_ms["p99"]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("concurrency", [1, 4])
async def test_closed_loop_one_request_per_caller(
    sim: Sim, concurrency: int, stream: bool, chat: bool
) -> None:
    options = BenchOptions(max_tokens=MAX_TOKENS, stream=stream, chat=chat, model="bench-model")
    level = await run_level(
        sim.url, concurrency=concurrency, rate=None, requests=concurrency, options=options
    )
    check_complete(level, concurrency, stream)
    assert level.concurrency == level.max_concurrency == concurrency and level.rate is None
    sim.assert_idle()


async def test_closed_loop_callers_send_back_to_back(sim: Sim) -> None:
    options = BenchOptions(max_tokens=MAX_TOKENS, stream=True)  # no model: the sim accepts it
    seen: list[RequestResult] = []
    level = await run_level(
        sim.url, concurrency=3, rate=None, requests=10, options=options, on_result=seen.append
    )
    check_complete(level, 10, stream=True)
    assert level.max_concurrency == 3 and len(seen) == 10
    # Each caller waits for its last answer before sending again: 3 start at once, 7 later.
    first_end = min(r.end for r in level.results)
    assert sum(r.start < first_end for r in level.results) == 3
    sim.assert_idle()


async def test_open_loop_sends_the_seeded_schedule(sim: Sim) -> None:
    options = BenchOptions(max_tokens=MAX_TOKENS, stream=True, seed=3)
    level = await run_level(sim.url, concurrency=None, rate=500.0, requests=9, options=options)
    check_complete(level, 9, stream=True)
    assert level.rate == 500.0 and level.concurrency is None
    assert 1 <= level.max_concurrency <= 9 and level.dispatch_lag_ms is not None
    sim.assert_idle()


async def test_open_loop_duration_bounds_the_schedule(sim: Sim) -> None:
    options = BenchOptions(max_tokens=MAX_TOKENS, duration_s=0.05, seed=11)
    expected = 0
    for offset in arrival_offsets(400.0, 11):
        if offset >= 0.05:
            break
        expected += 1
    level = await run_level(sim.url, concurrency=None, rate=400.0, requests=None, options=options)
    assert expected > 0
    check_complete(level, expected, stream=False)
    sim.assert_idle()


async def test_cancelling_a_level_aborts_every_generation(sim: Sim) -> None:
    """A user's Ctrl-C mid-level: the connections close, so the engine stops generating."""
    options = BenchOptions(max_tokens=10_000, stream=True)
    level = asyncio.create_task(
        run_level(sim.url, concurrency=3, rate=None, requests=3, options=options)
    )
    await until(lambda: sim.engine.running == 3, "three streams generating")
    level.cancel()
    with pytest.raises(asyncio.CancelledError):
        await level
    await until(lambda: sim.engine.total_aborted == 3, "every generation aborted")
    assert sim.engine.running == sim.engine.waiting == sim.engine.total_finished == 0


# --- failures are counted, not raised -----------------------------------------------------------


async def serve(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    return await start_app(app)


async def test_http_errors_are_counted_by_status() -> None:
    async def busy(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "queue full"}}, status=429)

    runner, url = await serve(busy)
    try:
        level = await run_level(url, concurrency=2, rate=None, requests=5, options=BenchOptions())
    finally:
        await runner.cleanup()
    assert (level.requests, level.ok, level.tokens, level.errors) == (5, 0, 0, {"429": 5})
    assert [r.status for r in level.results] == [429] * 5


async def test_an_error_event_mid_stream_is_a_body_error() -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"text":" a"}]}\n\n')
        await response.write(b'data: {"error":{"message":"engine died"}}\n\n')
        return response

    runner, url = await serve(broken)
    try:
        options = BenchOptions(stream=True)
        level = await run_level(url, concurrency=1, rate=None, requests=2, options=options)
    finally:
        await runner.cleanup()
    assert (level.ok, level.errors, level.tokens) == (0, {"body_error": 2}, 0)


async def test_a_server_that_ignores_stream_is_measured_as_whole() -> None:
    async def whole(request: web.Request) -> web.Response:
        return web.json_response({"choices": [{"text": "x"}], "usage": {"completion_tokens": 5}})

    runner, url = await serve(whole)
    try:
        options = BenchOptions(stream=True)
        level = await run_level(url, concurrency=2, rate=None, requests=2, options=options)
    finally:
        await runner.cleanup()
    assert (level.ok, level.tokens, level.itl_count) == (2, 10, 0)
    assert all(r.ttft == r.e2e for r in level.results)


async def test_refused_connections_are_conn_errors() -> None:
    with socket.socket() as sock:  # a port that was just free, and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    level = await run_level(url, concurrency=3, rate=None, requests=3, options=BenchOptions())
    assert (level.ok, level.errors) == (0, {"conn_error": 3})
    assert all(r.status is None for r in level.results)


async def test_a_server_that_never_answers_times_out() -> None:
    release = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    runner, url = await serve(stuck)
    try:
        options = BenchOptions(timeout_s=0.05)
        level = await run_level(url, concurrency=2, rate=None, requests=2, options=options)
    finally:
        release.set()
        await runner.cleanup()
    assert (level.ok, level.errors) == (0, {"timeout": 2})


# --- the command --------------------------------------------------------------------------------


@pytest.fixture
def sim_thread() -> Iterator[tuple[str, SimEngine]]:
    """The sim on its own loop in a thread, so the command under test can run its own loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = create_sim_app(FAST, model="thread-model")
    runner, url = asyncio.run_coroutine_threadsafe(start_app(app), loop).result(BOUND_S)
    try:
        yield url, app[SIM_ENGINE_KEY]
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(BOUND_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(BOUND_S)
        loop.close()


LEVEL_KEYS = {
    "concurrency", "rate", "max_concurrency", "requests", "ok", "errors", "total_time_ms",
    "tokens", "tokens_per_s", "speedup", "ttft_ms", "itl_ms", "e2e_ms", "itl_count", "no_usage",
    "dispatch_lag_ms",
}  # fmt: skip


def check_document(path: Path, url: str, concurrency: list[int]) -> None:
    doc = json.loads(path.read_text())
    assert {"schema", "date", "tool", "config", "levels"} <= set(doc)
    config = doc["config"]
    assert (config["url"], config["mode"], config["max_tokens"], config["stream"]) == (
        url, "closed", MAX_TOKENS, True,
    )  # fmt: skip
    assert config["model"] == "thread-model"  # asked of /v1/models
    assert [level["concurrency"] for level in doc["levels"]] == concurrency
    for level in doc["levels"]:
        assert set(level) == LEVEL_KEYS
        assert (
            level["tokens"] == level["requests"] * MAX_TOKENS == level["concurrency"] * MAX_TOKENS
        )
        assert level["errors"] == {} and level["ok"] == level["requests"]
        for figures in ("ttft_ms", "itl_ms", "e2e_ms"):
            assert set(level[figures]) == {"p50", "p95", "p99"}
    assert doc["levels"][0]["speedup"] == 1.0


def test_cmd_bench_prints_the_table_and_writes_json(
    sim_thread: tuple[str, SimEngine], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, engine = sim_thread
    parser = argparse.ArgumentParser(prog="batchgate")
    add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "bench.json"
    argv = ["bench", "--url", url, "--concurrency", "1,4", "--max-tokens", str(MAX_TOKENS),
            "--stream", "--json", str(out)]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func is cmd_bench
    assert cmd_bench(args) == 0
    stdout = capsys.readouterr().out
    heading, head, one, four = stdout.splitlines()
    assert heading.startswith(f"# POST {url}/v1/completions  model=thread-model")
    assert head.split()[0] == "concurrency"
    assert one.split()[0] == "1" and one.split()[2] == str(MAX_TOKENS)
    assert four.split()[0] == "4" and four.split()[2] == str(4 * MAX_TOKENS)
    check_document(out, url, [1, 4])
    assert engine.total_finished == 5 and engine.total_aborted == 0


MAIN = """
import argparse, sys
from proxy.bench.cli import add_parser
parser = argparse.ArgumentParser(prog="batchgate")
add_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
raise SystemExit(args.func(args))
"""


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", MAIN, "bench", *argv],
        capture_output=True,
        text=True,
        timeout=BOUND_S * 3,
        check=False,
    )


def test_cli_in_a_subprocess(sim_thread: tuple[str, SimEngine], tmp_path: Path) -> None:
    url, _ = sim_thread
    out = tmp_path / "bench.json"
    done = run_cli("--url", url, "--concurrency", "1,2", "--max-tokens", str(MAX_TOKENS),
                   "--stream", "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # stderr is a pipe, not a terminal: no progress bar
    check_document(out, url, [1, 2])


def test_cli_bad_arguments_exit_2() -> None:
    done = run_cli("--url", "http://127.0.0.1:9", "--concurrency", "0")
    assert done.returncode == 2
    assert "argument --concurrency: must be an integer >= 1, got '0'" in done.stderr


def test_cli_without_a_model_to_find_exits_1() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = run_cli("--url", f"http://127.0.0.1:{port}", "--concurrency", "1")
    assert done.returncode == 1
    first_line = f"batchgate bench: GET http://127.0.0.1:{port}/v1/models failed"
    assert done.stderr.startswith(first_line) and done.stderr.count("\n") == 1
    assert done.stderr.rstrip().endswith("pass --model NAME")


def test_cmd_bench_runs_without_tqdm(
    sim_thread: tuple[str, SimEngine], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm is an extra: not installed
    url, engine = sim_thread
    parser = argparse.ArgumentParser(prog="batchgate")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "--url", url, "--concurrency", "2",
                              "--max-tokens", str(MAX_TOKENS)])  # fmt: skip
    assert cmd_bench(args) == 0
    out = capsys.readouterr()
    row = out.out.splitlines()[2].split()  # heading, column names, the level
    assert row[0] == "2" and row[2] == str(2 * MAX_TOKENS)
    assert out.err == ""
    assert engine.total_finished == 2


# --- the serve path, as `batchgate serve` runs it -----------------------------------------------

NOT_FOR_SERVE = ("proxy.bench", "proxy.sim", "tqdm", "matplotlib")


def imported(importtime: str) -> list[str]:
    """Module names from ``python -X importtime`` output (one line per first import)."""
    names = []
    for line in importtime.splitlines():
        if line.startswith("import time:") and not line.endswith("imported package"):
            names.append(line.rsplit("|", 1)[1].strip())
    return names


async def test_serve_loads_no_bench_sim_tqdm_or_matplotlib(
    replicas: Callable[[str], Any], tmp_path: Path
) -> None:
    """A real `batchgate serve` process that proxies one request and drains on SIGTERM has
    imported neither the load generator nor the simulator nor their optional libraries."""
    replica = await replicas("r")
    config = tmp_path / "config.yaml"
    config.write_text(
        "server: {host: 127.0.0.1, port: 0, drain_quiet_s: 0}\n"
        f"replicas: [{{name: r, url: '{replica.url}', max_concurrency: 2}}]\n"
        "logging: {format: text, level: info}\n"
    )
    trace = tmp_path / "importtime.txt"
    with trace.open("w") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-X", "importtime", "-m", "proxy", "serve", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=err, cwd=ROOT,
        )
        try:
            assert proc.stdout is not None
            url = None
            while url is None:
                line = (await asyncio.wait_for(proc.stdout.readline(), BOUND_S)).decode()
                assert line, "serve exited before listening"
                if "batchgate listening on " in line:
                    url = line.rsplit(" ", 1)[1].strip()
            async with aiohttp.ClientSession() as session, session.post(
                url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}
            ) as resp:
                assert resp.status == 200
                await resp.read()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), BOUND_S) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    names = imported(trace.read_text())
    assert {"proxy.server", "proxy.edge.forward", "aiohttp"} <= set(names)  # the probe works
    assert [name for name in names if name.startswith(NOT_FOR_SERVE)] == []


# --- the raw-socket probes (proxy.bench.probes) against a loopback upstream ---------------------


class ProbeUpstream(asyncio.Protocol):
    """Enough of bench/upstream.py for the probes: a small JSON answer on keep-alive, a
    stamped ``/sse`` stream, and ``/hold`` (never answered)."""

    open: ClassVar[set[asyncio.Transport]] = set()
    held: ClassVar[int] = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.buf = b""
        ProbeUpstream.open.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        ProbeUpstream.open.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head, self.buf = self.buf[:end], self.buf[end + 4 :]
            length = 2 if b"Content-Length: 2" in head else 0  # the probes send b"{}" or nothing
            self.buf = self.buf[length:]
            target = head.split(b" ", 2)[1]
            if target.startswith(b"/sse"):
                self.transport.write(sse_head())
                for _ in range(3):  # three events at once, whatever the query asks
                    event = b'data: {"t":%.6f}\n\n' % time.monotonic()
                    self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.transport.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
            elif target == b"/hold":
                ProbeUpstream.held += 1
            else:
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")


def sse_head() -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


@pytest.fixture
async def probe_port() -> AsyncIterator[int]:
    ProbeUpstream.open.clear()
    ProbeUpstream.held = 0
    server = await asyncio.get_running_loop().create_server(ProbeUpstream, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    for transport in list(ProbeUpstream.open):
        transport.close()
    await server.wait_closed()


async def test_latency_probe_times_each_request(probe_port: int) -> None:
    request = probes.http_request("POST", "/v1/completions", b"{}")
    res = await probes.latency_c1("127.0.0.1", probe_port, request, count=50,
                                  duration_s=BOUND_S, warmup=5)
    assert res.errors == 0 and len(res.latencies_s) == 50 and min(res.latencies_s) > 0
    await until(lambda: not ProbeUpstream.open, "the probe closed its connection")


async def test_stream_probe_records_every_event(probe_port: int) -> None:
    res = await probes.sse_streams("127.0.0.1", probe_port, streams=4, interval_s=0.01,
                                   ramp_s=0.01, hold_s=0.01, sample=dict)
    assert (res.streams, res.completed, res.errors, res.events) == (4, 4, 0, 12)
    await until(lambda: not ProbeUpstream.open, "every stream closed")


async def test_hold_probe_opens_n_and_closes_them_all(probe_port: int) -> None:
    request = probes.http_request("POST", "/hold", b"{}")
    async with probes.hold("127.0.0.1", probe_port, 20, request, parallel=5) as held:
        assert len(held) == 20
        await until(lambda: ProbeUpstream.held == 20, "all 20 requests arrived")
    assert all(transport.is_closing() for transport in held)
    await until(lambda: not ProbeUpstream.open, "the upstream saw every connection close")
