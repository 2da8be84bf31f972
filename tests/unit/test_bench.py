"""The benchmark's pure parts, with no sockets: percentiles, SSE metering, arrivals, reports,
arguments. Clocks are fake; nothing sleeps."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol
from hypothesis import given
from hypothesis import strategies as st

from proxy.bench import probes
from proxy.bench.cli import add_parser, cmd_bench, progress_bar
from proxy.bench.core import (
    BODY_ERROR,
    BenchOptions,
    LevelResult,
    RequestResult,
    ResponseMeter,
    arrival_offsets,
    endpoint_url,
    percentiles,
    summarise,
)
from proxy.bench.report import document, format_table, speedups, write_plot


def test_core_imports_no_aiohttp() -> None:
    code = "import sys, proxy.bench.core; print('aiohttp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- percentiles --------------------------------------------------------------------------------


def test_percentiles_of_1_to_100() -> None:
    assert percentiles(range(1, 101)) == pytest.approx({"p50": 50.5, "p95": 95.05, "p99": 99.01})


def test_percentiles_of_one_value_and_of_none() -> None:
    assert percentiles([7.0]) == {"p50": 7.0, "p95": 7.0, "p99": 7.0}
    assert all(math.isnan(v) for v in percentiles([]).values())


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=200))
def test_percentiles_match_statistics_inclusive(values: list[float]) -> None:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    got = percentiles(values)
    assert got["p50"] == pytest.approx(cuts[49], abs=1e-6)
    assert got["p95"] == pytest.approx(cuts[94], abs=1e-6)
    assert got["p99"] == pytest.approx(cuts[98], abs=1e-6)
    assert min(values) <= got["p50"] <= got["p95"] <= got["p99"] <= max(values)
    assert percentiles(reversed(values)) == got


# --- metering one response ----------------------------------------------------------------------


class Ticks:
    """A clock that advances by one second each time it is read."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def sse(*payloads: object) -> list[bytes]:
    lines: list[bytes] = []
    for payload in payloads:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        lines += [f"data: {text}\n".encode(), b"\n"]
    return lines


def text_chunk(text: str) -> dict[str, Any]:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text}], "usage": None}


def chat_chunk(delta: dict[str, Any]) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}}


def meter_lines(lines: list[bytes]) -> RequestResult:
    meter = ResponseMeter(0.0, Ticks())
    for line in lines:
        meter.feed(line)
    meter.close()
    return meter.result(200, 100.0, streamed=True)


def test_completion_stream_times_each_content_event() -> None:
    result = meter_lines(sse(*(text_chunk(f" t{i}") for i in range(3)), USAGE, "[DONE]"))
    # The clock is read once per content event: at 1, 2, 3.
    assert (result.ttft, result.itl, result.e2e) == (1.0, [1.0, 1.0], 100.0)
    assert (result.ok, result.tokens, result.usage) == (True, 7, True)


def test_chat_stream_skips_role_only_and_usage_chunks() -> None:
    lines = sse(
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk({"content": "Hi"}),
        chat_chunk({"reasoning_content": "hmm"}),
        chat_chunk({}),
        USAGE,
        "[DONE]",
    )
    result = meter_lines(lines)
    assert (result.ttft, result.itl, result.tokens) == (1.0, [1.0], 7)


def test_without_usage_tokens_are_content_events() -> None:
    result = meter_lines(sse(text_chunk("a"), text_chunk("b"), "[DONE]"))
    assert (result.tokens, result.usage) == (2, False)


def test_sse_framing_crlf_no_space_comments_multiline_and_unterminated_last_event() -> None:
    lines = [
        b": keep-alive comment\r\n",
        b"event: message\r\n",
        b'data:{"choices":[{"text":\r\n',  # one event over two data lines
        b'data: "a"}]}\r\n',
        b"\r\n",
        b"id: 7\n",
        b'data: {"choices":[{"text":"b"}]}',  # no line ending, no blank line: close() ends it
    ]
    result = meter_lines(lines)
    assert (result.ok, result.tokens, result.itl) == (True, 2, [1.0])


@pytest.mark.parametrize("payload", ['{"error": {"message": "overloaded"}}', "not json", "[1, 2]"])
def test_error_or_undecodable_event_fails_the_request(payload: str) -> None:
    result = meter_lines(sse(text_chunk("a"), payload, "[DONE]"))
    assert result.error == BODY_ERROR and not result.ok


def test_done_is_seen() -> None:
    meter = ResponseMeter(0.0, Ticks())
    for line in sse(text_chunk("a"), "[DONE]"):
        meter.feed(line)
    assert meter.done


@pytest.mark.parametrize("chat", [False, True])
def test_whole_body_ttft_is_e2e_and_tokens_come_from_usage(chat: bool) -> None:
    choice = {"message": {"role": "assistant", "content": "x y"}} if chat else {"text": "x y"}
    body = {"choices": [choice], "usage": {"completion_tokens": 2}}
    meter = ResponseMeter(10.0, Ticks())
    meter.body(json.dumps(body).encode())
    result = meter.result(200, 12.5, streamed=False)
    assert (result.ttft, result.e2e, result.itl, result.tokens) == (2.5, 2.5, [], 2)

    bare = ResponseMeter(10.0, Ticks())
    bare.body(json.dumps({"choices": [choice]}).encode())
    unreported = bare.result(200, 11.0, streamed=False)
    assert (unreported.ok, unreported.tokens, unreported.usage) == (True, 0, False)


async def read_lines(chunks: list[bytes]) -> list[bytes]:
    """Lines as aiohttp's response reader yields them, fed the given network reads."""
    reader = StreamReader(BaseProtocol(asyncio.get_running_loop()), 2**16)
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    return [line async for line in reader]


STREAM = b"".join(
    sse(*(chat_chunk({"content": f"w{i}"}) for i in range(4)), USAGE, "[DONE]")
).replace(b"\n", b"\r\n")


def chunkings(data: bytes, size: int) -> Iterator[list[bytes]]:
    """``data`` in reads of ``size`` bytes, the first read shortened by each possible phase."""
    for phase in range(size):
        head = [data[:phase]] if phase else []
        yield head + [data[i : i + size] for i in range(phase, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(STREAM)])
async def test_events_split_across_reads_meter_the_same(size: int) -> None:
    whole = meter_lines(await read_lines([STREAM]))
    for chunks in chunkings(STREAM, size):
        assert b"".join(chunks) == STREAM
        assert meter_lines(await read_lines(chunks)) == whole
    assert (whole.tokens, len(whole.itl), whole.ok) == (7, 3, True)


# --- arrivals -----------------------------------------------------------------------------------


def take(rate: float, seed: int | None, n: int) -> list[float]:
    offsets = arrival_offsets(rate, seed)
    return [next(offsets) for _ in range(n)]


@pytest.mark.parametrize("rate", [0.5, 8.0, 250.0])
def test_seeded_poisson_gaps_have_mean_one_over_rate(rate: float) -> None:
    times = take(rate, 1234, 20_000)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert all(g > 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    # Exponential: P(gap > mean) = 1/e; a fixed rate, or uniform gaps, would fail this.
    beyond = sum(g > 1 / rate for g in gaps) / len(gaps)
    assert beyond == pytest.approx(math.exp(-1), abs=0.02)


def test_arrivals_are_deterministic_for_a_seed() -> None:
    assert take(5.0, 7, 100) == take(5.0, 7, 100)
    assert take(5.0, 7, 100) != take(5.0, 8, 100)


@pytest.mark.parametrize("rate", [0, -1.0, math.inf, math.nan])
def test_arrival_rate_must_be_positive_and_finite(rate: float) -> None:
    with pytest.raises(ValueError, match="rate must be"):
        next(arrival_offsets(rate, 0))


# --- options ------------------------------------------------------------------------------------


def test_request_bodies() -> None:
    plain = BenchOptions(max_tokens=5, prompt="hi")
    assert plain.body() == {"prompt": "hi", "max_tokens": 5, "stream": False, "ignore_eos": True}
    chat = BenchOptions(max_tokens=5, prompt="hi", chat=True, stream=True, model="m",
                        ignore_eos=False)  # fmt: skip
    assert chat.body() == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_endpoint_url_accepts_a_base_with_or_without_v1() -> None:
    chat = BenchOptions(chat=True)
    assert endpoint_url("http://h:1/", BenchOptions()) == "http://h:1/v1/completions"
    assert endpoint_url("http://h:1/v1", chat) == "http://h:1/v1/chat/completions"
    assert endpoint_url("https://h/app/v1/", chat) == "https://h/app/v1/chat/completions"


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", 0), ("max_tokens", True), ("timeout_s", 0.0), ("duration_s", -1)],
)
def test_options_name_the_bad_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be .*Got {value!r}\."):
        BenchOptions(**{field: value})  # type: ignore[arg-type]


def test_api_key_is_not_in_repr() -> None:
    assert "secret" not in repr(BenchOptions(api_key="secret"))


# --- summaries and reports ----------------------------------------------------------------------


def ok(start: float, end: float, ttft: float, itl: list[float], tokens: int) -> RequestResult:
    return RequestResult(start, end, 200, None, ttft, itl, tokens, True)


def test_summary_counts_tokens_of_ok_requests_and_time_from_first_send_to_last_end() -> None:
    results = [
        ok(1.0, 3.0, 0.5, [0.1, 0.2], 10),
        ok(1.5, 4.0, 1.0, [0.3], 20),
        RequestResult(2.0, 5.0, 503, "503", tokens=99),
        RequestResult(2.0, 2.5, None, "conn_error"),
    ]
    level = summarise(results, concurrency=4, rate=None, max_concurrency=4)
    assert (level.requests, level.ok, level.tokens) == (4, 2, 30)
    assert level.errors == {"503": 1, "conn_error": 1}
    assert level.total_time_s == 4.0 and level.tokens_per_s == 7.5
    assert level.itl_count == 3 and level.itl_ms["p50"] == pytest.approx(200.0)
    assert level.e2e_ms["p99"] == pytest.approx(2495.0)
    assert level.no_usage == 0 and level.dispatch_lag_ms is None


def level(concurrency: int, tokens_per_s: float, /, **changes: Any) -> LevelResult:
    figures = {"p50": 10.0, "p95": 20.0, "p99": 30.0}
    base: dict[str, Any] = dict(
        concurrency=concurrency, rate=None, requests=concurrency, ok=concurrency, errors={},
        tokens=100 * concurrency, total_time_s=100 * concurrency / tokens_per_s,
        tokens_per_s=tokens_per_s, max_concurrency=concurrency, ttft_ms=figures,
        itl_ms=figures, e2e_ms=figures, itl_count=99, no_usage=0, dispatch_lag_ms=None,
    )  # fmt: skip
    return LevelResult(**{**base, **changes})


def test_speedup_is_relative_to_a_first_level_of_one() -> None:
    assert speedups([level(1, 50.0), level(4, 150.0)]) == [1.0, 3.0]
    assert speedups([level(2, 50.0), level(4, 150.0)]) == [None, None]


def test_table_is_aligned_and_shows_the_seed_columns() -> None:
    nan = {"p50": math.nan, "p95": math.nan, "p99": math.nan}
    levels = [
        level(1, 56.3),
        level(32, 647.5, errors={"429": 3, "conn_error": 1}, itl_ms=nan, no_usage=2),
    ]
    lines = format_table(levels).splitlines()
    head, first, second, note = lines
    assert head.split()[:5] == ["concurrency", "total", "ms", "tokens", "tokens/s"]
    assert first.split()[:5] == ["1", "1776", "100", "56.3", "1.00x"]
    assert second.split()[:5] == ["32", "4942", "3200", "647.5", "11.50x"]
    assert second.endswith("429:3, conn_error:1") and " - " in second
    assert first.rstrip().endswith("-")
    # Right-aligned: every column ends where its heading ends.
    assert head.index("tokens/s") + len("tokens/s") == first.index("56.3") + len("56.3")
    assert "2 ok requests came without usage" in note


def test_open_loop_table_shows_rate_max_concurrency_and_send_lag() -> None:
    row = level(1, 50.0, concurrency=None, rate=2.5, max_concurrency=3, dispatch_lag_ms=1.25)
    head, line = format_table([row]).splitlines()
    assert head.split()[:4] == ["rate/s", "max", "conc", "total"]
    assert line.split()[:2] == ["2.5", "3"] and "1.2" in line.split()


def test_json_document_has_the_documented_keys_and_no_nan() -> None:
    nan = {"p50": math.nan, "p95": math.nan, "p99": math.nan}
    doc = document([level(1, 50.0), level(2, 90.0, ttft_ms=nan)], {"url": "http://x"})
    text = json.dumps(doc, allow_nan=False)
    back = json.loads(text)
    assert set(back) == {"schema", "date", "tool", "config", "levels"}
    assert back["date"].endswith("Z")
    first, second = back["levels"]
    assert set(first) == {
        "concurrency", "rate", "max_concurrency", "requests", "ok", "errors", "total_time_ms",
        "tokens", "tokens_per_s", "speedup", "ttft_ms", "itl_ms", "e2e_ms", "itl_count",
        "no_usage", "dispatch_lag_ms",
    }  # fmt: skip
    assert first["total_time_ms"] == pytest.approx(2000.0)
    assert second["speedup"] == pytest.approx(1.8)
    assert second["ttft_ms"] == {"p50": None, "p95": None, "p99": None}


def test_plot_is_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    write_plot(out, [level(1, 50.0), level(2, 90.0), level(4, 170.0)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- arguments ----------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="batchgate")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def test_defaults() -> None:
    args = parse("--url", "http://127.0.0.1:8080/")
    assert args.func is cmd_bench and args.url == "http://127.0.0.1:8080"
    assert (args.concurrency, args.rate, args.requests, args.max_tokens) == (None, None, None, 100)
    assert (args.stream, args.chat, args.ignore_eos, args.seed) == (False, False, True, 0)
    assert parse("--url", "http://h", "--no-ignore-eos").ignore_eos is False
    assert parse("--url", "http://h", "--concurrency", "1, 4,16").concurrency == [1, 4, 16]
    assert parse("--url", "http://h", "--rate", "0.5,2").rate == [0.5, 2.0]


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--url", "127.0.0.1:8080"],
        ["--url", "http://h", "--concurrency", "0"],
        ["--url", "http://h", "--concurrency", "1,,2"],
        ["--url", "http://h", "--concurrency", "two"],
        ["--url", "http://h", "--rate", "-1"],
        ["--url", "http://h", "--rate", "nan"],
        ["--url", "http://h", "--concurrency", "1", "--rate", "2"],
        ["--url", "http://h", "--max-tokens", "0"],
        ["--url", "http://h", "--duration", "0"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_open_loop_needs_an_end(capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_bench(parse("--url", "http://127.0.0.1:9", "--rate", "5")) == 2
    assert "--rate needs --requests or --duration" in capsys.readouterr().err


def test_missing_matplotlib_is_one_line_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    args = parse("--url", "http://127.0.0.1:9", "--plot", str(tmp_path / "p.png"))
    assert cmd_bench(args) == 1
    err = capsys.readouterr().err
    assert err == "batchgate bench: --plot needs matplotlib: pip install 'batchgate[bench]'\n"


def test_unwritable_output_fails_before_any_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse("--url", "http://127.0.0.1:9", "--json", str(tmp_path / "no" / "such.json"))
    assert cmd_bench(args) == 1
    assert "--json: cannot write to" in capsys.readouterr().err


# --- what the proxy's runtime does not load ------------------------------------------------------

#: The load generator, the simulator and their optional libraries: `serve` never needs them.
NOT_FOR_SERVE = ("proxy.bench", "proxy.sim", "tqdm", "matplotlib")

LOADED_BY_SERVE = """
import sys
import proxy.cli, proxy.server
from proxy.edge.app import create_app
from proxy.config import Config, ReplicaConfig
args = proxy.cli.build_parser().parse_args(["serve", "--config", "x.yaml"])
assert args.func is proxy.cli.cmd_serve
create_app(Config(replicas=(ReplicaConfig(name="r", url="http://127.0.0.1:9",
                                          max_concurrency=1),)))
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in ("proxy", "tqdm",
                                                                  "matplotlib"))))
"""


def test_importing_the_serve_path_loads_no_bench_sim_tqdm_or_matplotlib() -> None:
    out = subprocess.run([sys.executable, "-c", LOADED_BY_SERVE], capture_output=True,
                         text=True, check=True)
    loaded = out.stdout.split()
    assert "proxy.server" in loaded and "proxy.edge.app" in loaded  # the probe itself works
    assert [m for m in loaded if m.startswith(NOT_FOR_SERVE)] == []


def test_bench_is_still_a_command_of_the_cli() -> None:
    from proxy.cli import build_parser

    args = build_parser(["bench"]).parse_args(["bench", "--url", "http://127.0.0.1:9"])
    assert args.func is cmd_bench
    assert "bench" in build_parser().format_help()  # listed, though not loaded


def test_the_whole_core_folder_imports_no_aiohttp() -> None:
    code = (
        "import importlib, pkgutil, sys, proxy.core\n"
        "names = [m.name for m in pkgutil.iter_modules(proxy.core.__path__, 'proxy.core.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(len(names), 'aiohttp' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, aiohttp_loaded = out.stdout.split()
    assert int(count) >= 3 and aiohttp_loaded == "False"


# --- progress without tqdm ----------------------------------------------------------------------


def test_progress_without_tqdm_is_a_plain_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` fail
    out = io.StringIO()
    with progress_bar("concurrency 3", 3, enabled=True, file=out) as tick:
        for _ in range(3):
            tick()
    assert out.getvalue() == (
        "\rconcurrency 3: 1/3 req\rconcurrency 3: 2/3 req\rconcurrency 3: 3/3 req\n"
    )


def test_progress_with_tqdm_draws_its_bar() -> None:
    pytest.importorskip("tqdm")  # the bench extra, which the test extra brings
    out = io.StringIO()
    with progress_bar("concurrency 3", 3, enabled=True, file=out) as tick:
        for _ in range(3):
            tick()
    assert "concurrency 3" in out.getvalue() and "3/3" in out.getvalue()
    assert "req" in out.getvalue()


def test_progress_disabled_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for blocked in (False, True):
        if blocked:
            monkeypatch.setitem(sys.modules, "tqdm", None)
        out = io.StringIO()
        with progress_bar("rate 5/s", None, enabled=False, file=out) as tick:
            tick()
        assert out.getvalue() == ""


# --- the raw-socket probes' parsing (proxy.bench.probes), fed by hand ---------------------------


def sse_response(events: int) -> bytes:
    """What the bench upstream's ``/sse`` route sends: chunked, each event stamped ``"t"``."""
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    out = [head]
    for i in range(events):
        event = b'data: {"choices":[{"text":" tok"}],"t":%.6f}\n\n' % (100.0 + i * 0.05)
        out.append(b"%x\r\n%s\r\n" % (len(event), event))
    out.append(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
    return b"".join(out)


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True


def feed_stream(raw: bytes, cuts: list[int]) -> tuple[probes._Recorder, FakeTransport]:
    rec = probes._Recorder(-math.inf, math.inf)
    rec.expected = 1
    stream = probes._Stream(rec, b"GET /sse HTTP/1.1\r\n\r\n")
    transport = FakeTransport()
    stream.connection_made(transport)  # type: ignore[arg-type]
    at = 0
    for cut in [*sorted(set(cuts)), len(raw)]:
        if cut > at:
            stream.data_received(raw[at:cut])
            at = cut
    return rec, transport


@given(st.lists(st.integers(0, len(sse_response(5))), max_size=30))
def test_stream_probe_counts_the_same_events_however_reads_split(cuts: list[int]) -> None:
    rec, transport = feed_stream(sse_response(5), cuts)
    assert (rec.completed, rec.errors, rec.events) == (1, 0, 5)
    assert len(rec.gaps) == len(rec.added) == 4 and len(rec.delays) == 5
    assert transport.written == [b"GET /sse HTTP/1.1\r\n\r\n"] and transport.closed
    assert rec.finished.is_set()


def test_stream_probe_counts_a_non_200_as_an_error() -> None:
    rec, transport = feed_stream(b"HTTP/1.1 503 Service Unavailable\r\n\r\n", [5])
    assert (rec.completed, rec.errors, rec.events) == (0, 1, 0) and transport.closed


@pytest.mark.parametrize(
    ("raw", "complete"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{}", False),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0", False),  # head not ended
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n", False),
    ],
)
def test_latency_probe_knows_when_a_response_is_whole(raw: bytes, complete: bool) -> None:
    assert probes._response_complete(bytearray(raw)) is complete


def test_http_request_frames_a_body() -> None:
    assert probes.http_request("POST", "/x", b"{}", close=True) == (
        b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    )


def test_probes_import_no_aiohttp() -> None:
    code = "import sys, proxy.bench.probes; print('aiohttp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
