"""make bench's report of batchgate against the baseline commit's batchgate (bench/report.py):
which figures count as "no worse", and how the table reads. Pure: results in, summary out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture(scope="module")
def report(bench_script: Callable[[str], Any]) -> Any:
    return bench_script("report")


def _rate(rps: float, cpu_us: float) -> dict[str, Any]:
    return {"median": {"rps": rps, "proxy_us_per_req": cpu_us, "loadgen_cpu": 0.5,
                       "p50_us": 1e6 / rps, "p99_us": 2e6 / rps}}


def _results(with_baseline: bool) -> dict[str, Any]:
    names = {"direct": (30000, 0), "batchgate": (3200, 250), "haproxy": (20000, 25),
             "passthrough": (2600, 330)}
    if with_baseline:
        names["baseline"] = (3000, 260)
    raw = {test: {n: _rate(rps, cpu) for n, (rps, cpu) in names.items()}
           for test in ("p1_c1", "p2_json_c32", "p2_json_c64", "p2_sse16_c32")}
    raw["p2_json_c64"]["baseline" if with_baseline else "batchgate"] = _rate(100, 999)
    def steps(*cores: float) -> list[dict[str, Any]]:  # 250, 500, 750 ... streams, all ok
        return [{"streams": 250 * (i + 1), "ok": True, "proxy_cpu": c}
                for i, c in enumerate(cores)]

    streams = {n: {"sustained": 500, "cpu_pct_per_100": 12.0, "steps": steps(0.3, 0.6)}
               for n in names}
    if with_baseline:  # it also held 750, at less CPU per stream: not the figure compared
        streams["baseline"] = {"sustained": 750, "cpu_pct_per_100": 9.0,
                               "steps": steps(0.35, 0.65, 0.675)}
    queued = {n: {"kib_per_request": 15.0, "held": 10000, "loaded_rss_kib": 2e5}
              for n in names if n != "direct"}
    if with_baseline:
        queued["baseline"]["kib_per_request"] = 15.27
    out: dict[str, Any] = {"raw": raw, "streams": streams, "queued": queued}
    if with_baseline:
        out["baseline"] = {"commit": "f571e5b", "sha": "f571e5b"}
    return out


def test_each_figure_is_judged_in_its_own_direction(report: Any) -> None:
    summary = report.summarise(_results(with_baseline=True))
    figures = {f["figure"]: f for f in summary["baseline"]["figures"]}
    json_cpu = figures["P2 proxy CPU per request, small JSON (us)"]
    assert (json_cpu["batchgate"], json_cpu["baseline"]) == (250, 260)  # best rate's run
    assert json_cpu["ratio"] == pytest.approx(250 / 260) and json_cpu["no_worse"]
    assert figures["P2 max req/s, small JSON"]["no_worse"]  # 3200 >= 3000: higher is better
    assert not figures["P3 streams sustained (20 ev/s, +p99 <= 5 ms)"]["no_worse"]  # 500 < 750
    p3_cpu = figures["P3 proxy CPU per 100 streams at the most both sustained (% core)"]
    assert p3_cpu["ratio"] == pytest.approx(0.6 / 0.65) and p3_cpu["no_worse"]  # at 500
    assert figures["P5 RSS per queued request (KiB)"]["ratio"] == pytest.approx(15.0 / 15.27)
    targets = {t["target"]: t["met"] for t in summary["targets"] if "baseline" in t["target"]}
    # CPU and memory are targets; rates and latencies are shown only.
    assert targets == {
        "No worse than the baseline code (f571e5b): P2 proxy CPU per request, small JSON (us)":
            True,
        "No worse than the baseline code (f571e5b): P2 proxy CPU per stream, SSE-16 (us)":
            True,
        "No worse than the baseline code (f571e5b): P3 streams sustained (20 ev/s, +p99 <= 5 ms)":
            False,
        "No worse than the baseline code (f571e5b): "
        "P3 proxy CPU per 100 streams at the most both sustained (% core)": True,
        "No worse than the baseline code (f571e5b): P5 RSS per queued request (KiB)": True,
    }
    text = report.table(summary)
    assert "baseline f571e5b" in text and "**no**" in text
    # The main table keeps its eight columns: the baseline is only in its own.
    assert all(len(row) == 8 for row in report.rows(summary))


def test_rate_figures_pair_the_two_round_by_round(report: Any) -> None:
    """The machine slows down during the run: each round's pair is compared, so batchgate
    is judged by 0.909, 1.034 and 0.969 (median 0.969), not by its median over the
    baseline's (300 / 290 = 1.034), which mixes rounds run minutes apart."""
    results = _results(with_baseline=True)
    for name, cpus in (("batchgate", (100, 300, 310)), ("baseline", (110, 290, 320))):
        runs = [{"rps": 1e6 / c, "proxy_us_per_req": c, "loadgen_cpu": 0.5} for c in cpus]
        results["raw"]["p2_sse16_c32"][name] = {"median": runs[1], "runs": runs}
    summary = report.summarise(results)
    sse = next(f for f in summary["baseline"]["figures"]
               if f["figure"] == "P2 proxy CPU per stream, SSE-16 (us)")
    assert (sse["batchgate"], sse["baseline"]) == (300, 290)
    assert sse["paired"] and sse["ratio"] == pytest.approx(310 / 320) and sse["no_worse"]
    # The pairs' own rounds (batchgate and the baseline alone) count with the others: five
    # ratios now, 0.909, 0.969, 1.034, 1.05, 1.1, so the median is 1.034.
    for name, cpus in (("batchgate", (105, 110)), ("baseline", (100, 100))):
        results["raw"]["p2_sse16_c32"][name]["pair_runs"] = [
            {"rps": 1e6 / c, "proxy_us_per_req": c, "loadgen_cpu": 0.5} for c in cpus]
    sse = next(f for f in report.summarise(results)["baseline"]["figures"]
               if f["figure"] == "P2 proxy CPU per stream, SSE-16 (us)")
    assert sse["ratio"] == pytest.approx(300 / 290) and not sse["no_worse"]


def test_without_a_baseline_nothing_changes(report: Any) -> None:
    summary = report.summarise(_results(with_baseline=False))
    assert "baseline" not in summary and report.baseline_rows(summary) == []
    assert not any("baseline" in t["target"] for t in summary["targets"])
    assert "baseline" not in report.table(summary)
