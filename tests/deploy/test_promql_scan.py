"""The catalogue and the scanner behind the deploy checks: the catalogue must be the exporter's,
and the scanner must see every selector, or the dashboard and rules checks pass vacuously."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.deploy.promql import CATALOGUE, Matcher, Selector, problems, scan


def test_scan_finds_selectors_matchers_and_grouping() -> None:
    s = scan(
        'histogram_quantile(0.95, sum by (job, le) (rate(batchgate_queue_wait_seconds_bucket'
        '{job="a", le!="+Inf"}[5m:1m] offset 1h)))\n'
        '/ on (job) group_left () max without (instance) (batchgate_queue_capacity > 0)'
        ' and batchgate_queue_depth # a comment naming not_a_metric'
    )
    assert s.selectors == [
        Selector("batchgate_queue_wait_seconds_bucket",
                 (Matcher("job", "=", "a"), Matcher("le", "!=", "+Inf"))),
        Selector("batchgate_queue_capacity"),
        Selector("batchgate_queue_depth"),
    ]
    assert s.grouping == {"job", "le", "instance"}


def test_scan_tells_functions_and_keywords_from_metric_names() -> None:
    s = scan("sum(rate(x_total[1m])) by (a) > bool 1e3 or count_values(\"v\", y) unless inf")
    assert [sel.name for sel in s.selectors] == ["x_total", "y"]
    assert s.grouping == {"a"}


def test_every_catalogue_metric_passes() -> None:
    for name in CATALOGUE:
        assert problems(f'sum by (job) (rate({name}{{instance=~".+"}}[5m]))') == []


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("batchgate_queue_wait_seconds", "'batchgate_queue_wait_seconds' is not in"),
        ("rate(batchgate_requests[5m])", "'batchgate_requests' is not in"),
        ('batchgate_tokens_total{kind="output"}', "'output' is not one of"),
        ('batchgate_requests_total{route=~"/v1/completions|/v1/complete"}', "'/v1/complete'"),
        ('batchgate_rejected_requests_total{replica="r0"}', "has no label 'replica'"),
        ("sum by (replica) (batchgate_queue_depth)", "grouping by 'replica'"),
        ('{__name__="batchgate_queue_depth"}', "selector without a metric name"),
        ("batchgate:saturation", "'batchgate:saturation' is not in"),
    ],
)
def test_problems_are_reported(expr: str, problem: str) -> None:
    assert any(problem in p for p in problems(expr)), problems(expr)


def test_recorded_names_are_allowed_when_declared() -> None:
    assert problems("batchgate:x:ratio > 1", recorded={"batchgate:x:ratio"}) == []


def test_catalogue_is_what_the_exporter_defines() -> None:
    """The catalogue the dashboard and rules are checked against is batchgate's own."""
    from proxy.observe.metrics import Metrics, SchedulerCollector

    metrics = Metrics()
    scheduler = SimpleNamespace(queue_depth=0, max_queue=1, replicas=[], depths=dict,
                                models=list)
    metrics.registry.register(SchedulerCollector(scheduler))  # type: ignore[arg-type]
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",)}
    exported = {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in suffixes[family.type]
    }
    assert exported == set(CATALOGUE)
