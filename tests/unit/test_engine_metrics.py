"""Reading each engine's /metrics text (proxy.control.enginemetrics), from fixture texts in
each engine's own format (tests/unit/engine_metrics/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.control.enginemetrics import NoKnownSeries, parse
from proxy.core.adaptive import EngineReading

HERE = Path(__file__).parent / "engine_metrics"


@pytest.mark.parametrize(("fixture", "reading"), [
    # vLLM v1, two data-parallel engines: counts summed, KV usage the fullest.
    ("vllm.txt", EngineReading(waiting=3.0, running=30.0, kv_usage=0.87)),
    # vLLM v0: gpu_cache_usage_perc.
    ("vllm_v0.txt", EngineReading(waiting=7.0, running=32.0, kv_usage=0.953)),
    ("tgi.txt", EngineReading(waiting=5.0, running=12.0, kv_usage=None)),
    ("sglang.txt", EngineReading(waiting=2.0, running=48.0, kv_usage=0.28)),
    ("llamacpp.txt", EngineReading(waiting=1.0, running=4.0, kv_usage=None)),
])
def test_each_engines_text(fixture: str, reading: EngineReading) -> None:
    assert parse((HERE / fixture).read_text()) == reading


def test_batchgates_own_simulator() -> None:
    text = ('# TYPE vllm:num_requests_running gauge\n'
            'vllm:num_requests_running{model_name="batchgate-sim"} 16.0\n'
            '# TYPE vllm:num_requests_waiting gauge\n'
            'vllm:num_requests_waiting{model_name="batchgate-sim"} 0.0\n')
    assert parse(text) == EngineReading(waiting=0.0, running=16.0)


def test_the_newer_kv_series_wins_and_nan_is_skipped() -> None:
    text = ("vllm:num_requests_waiting 1\n"
            "vllm:gpu_cache_usage_perc 0.99\n"
            "vllm:kv_cache_usage_perc 0.5\n"
            'vllm:num_requests_running{engine="0"} NaN\n'
            'vllm:num_requests_running{engine="1"} 4\n')
    assert parse(text) == EngineReading(waiting=1.0, running=4.0, kv_usage=0.5)


@pytest.mark.parametrize("text", [
    "",
    "<html><body>Not Found</body></html>\n",
    "# HELP python_info Python platform information\npython_info 1\n",
    # A series whose name only starts like a known one.
    "vllm:num_requests_waiting_total 3\n",
])
def test_no_known_series(text: str) -> None:
    with pytest.raises(NoKnownSeries):
        parse(text)


def test_a_known_series_that_does_not_parse() -> None:
    with pytest.raises(ValueError, match=r"could not convert|Invalid"):
        parse("tgi_queue_size many\n")
