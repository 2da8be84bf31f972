"""make bench-cpu's arithmetic (bench/cpu.py): the slice order of a block, and the ratios with
their A/A controls. Pure: per-block CPU and request counts in, figures out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture(scope="module")
def cpu(bench_script: Callable[[str], Any]) -> Any:
    return bench_script("cpu")


def test_a_block_runs_each_contestant_twice_mirrored_and_rotates(cpu: Any) -> None:
    names = ("a", "b", "c", "d")
    first = cpu.block_order(names, 0)
    assert first == ["a", "b", "c", "d", "d", "c", "b", "a"]
    assert cpu.block_order(names, 1)[0] == "b"
    for block in range(8):
        order = cpu.block_order(names, block)
        assert Counter(order) == dict.fromkeys(names, 2)
        # Mirrored: the mean position of every contestant is the block's middle.
        for name in names:
            assert sum(i for i, n in enumerate(order) if n == name) == len(order) - 1


def _block(us: dict[str, float], requests: int = 1000) -> dict[str, tuple[int, int]]:
    return {name: (round(us[name] * 1e3 * requests), requests) for name in us}


def test_the_ratio_pools_both_processes_of_each_version(cpu: Any) -> None:
    # This tree's two processes at 90 and 110 us, the baseline's at 100 and 100.
    blocks = [_block({"batchgate": 90, "batchgate#2": 110, "baseline": 100, "baseline#2": 100})
              for _ in range(3)]
    out = cpu.summarize(blocks)
    assert out["ratios"]["batchgate/baseline"]["mean"] == pytest.approx(1.0)
    assert out["ratios"]["A/A batchgate"]["mean"] == pytest.approx(90 / 110)
    assert out["ratios"]["A/A baseline"]["mean"] == pytest.approx(1.0)
    assert out["us_per_request"]["batchgate"] == pytest.approx(90)
    assert out["blocks"] == 3


def test_the_interval_is_two_standard_errors_of_the_block_ratios(cpu: Any) -> None:
    blocks = [_block({"batchgate": b, "batchgate#2": b, "baseline": 100, "baseline#2": 100})
              for b in (90, 100, 110, 100)]
    r = cpu.summarize(blocks)["ratios"]["batchgate/baseline"]
    # ratios 0.9, 1.0, 1.1, 1.0: mean 1.0, sd 0.0816, se 0.0408
    assert r["mean"] == pytest.approx(1.0)
    assert r["high"] - r["mean"] == pytest.approx(2 * 0.08165 / 2, rel=1e-3)
    assert r["low"] == pytest.approx(2 * r["mean"] - r["high"])
    assert cpu.summarize(blocks)["per_block"]["batchgate/baseline"] == pytest.approx(
        [0.9, 1.0, 1.1, 1.0])


def test_requests_weigh_the_cpu_within_a_block(cpu: Any) -> None:
    # One process served twice the requests of the other: us per request is total over total.
    block = {"batchgate": (100_000_000, 1000), "batchgate#2": (100_000_000, 2000),
             "baseline": (150_000_000, 1500), "baseline#2": (150_000_000, 1500)}
    out = cpu.summarize([block, block])
    assert out["ratios"]["batchgate/baseline"]["mean"] == pytest.approx(
        (200_000_000 / 3000) / (300_000_000 / 3000))
    assert out["ratios"]["A/A batchgate"]["mean"] == pytest.approx(100 / 50)
