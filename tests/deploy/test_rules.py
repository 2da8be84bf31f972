"""deploy/prometheus/rules.yaml: valid, unit-tested with promtool, and reading only real series."""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.deploy.promql import ROOT, Matcher, problems, run_promtool, scan

RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules_test.yaml"

ALERTS = {
    "BatchgateQueueNearCapacity": "warning",
    "BatchgateRejectionsHigh": "warning",
    "BatchgateReplicaDown": "warning",
    "BatchgateNoHealthyReplica": "critical",
    "BatchgateTTFTHigh": "warning",
}
RECORDED = {
    "batchgate:replica_saturation:ratio",
    "batchgate:tokens:rate1m",
    "batchgate:ttft_seconds:p95_5m",
    "batchgate:queue_utilisation:ratio",
    "batchgate:requests:rate5m",
    "batchgate:demand",
}
#: Every `by (...)` and `on (...)` clause of the rules: the labels in it.
_CLAUSE = re.compile(r"\b(by|on)\s*\(([^)]*)\)")


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    done = run_promtool("check", "rules", RULES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests() -> None:
    done = run_promtool("test", "rules", RULES_TEST)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rules_read_only_catalogue_series() -> None:
    rules = _rules()
    recorded = {r["record"] for r in rules if "record" in r}
    found = [
        f"{rule.get('record') or rule.get('alert')}: {p}"
        for rule in rules
        for p in problems(rule["expr"], recorded=recorded)
    ]
    assert found == []


def test_the_required_rules_exist_and_alerts_are_complete() -> None:
    rules = _rules()
    assert RECORDED - {r["record"] for r in rules if "record" in r} == set()
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert set(alerts) == set(ALERTS)
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] == ALERTS[name], name
        assert {"summary", "description", "runbook"} <= set(alert["annotations"]), name
        assert "for" in alert, name


def test_unit_tests_cover_every_rule() -> None:
    """Each alert is shown firing and not firing, and each recorded series is evaluated."""
    rules = _rules()
    cases = yaml.safe_load(RULES_TEST.read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    evaluated = {
        sel.name
        for test in cases
        for case in test.get("promql_expr_test", [])
        for sel in scan(case["expr"]).selectors
    }
    for test in cases:
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = {r["alert"] for r in rules if "alert" in r}
    assert alerts - fired == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown not firing"
    recorded = {r["record"] for r in rules if "record" in r}
    assert recorded - evaluated == set(), "recorded series never evaluated"


def test_ttft_alert_and_recording_rule_read_streams_only() -> None:
    """A non-streamed answer's first byte comes after the whole generation: not a TTFT."""
    rules = {r.get("record") or r.get("alert"): r for r in _rules()}
    for name in ("BatchgateTTFTHigh", "batchgate:ttft_seconds:p95_5m"):
        selectors = [
            sel for sel in scan(rules[name]["expr"]).selectors
            if sel.name == "batchgate_time_to_first_byte_seconds_bucket"
        ]
        assert selectors, name
        for sel in selectors:
            assert Matcher("stream", "=", "true") in sel.matchers, (name, sel)


def test_rules_keep_deployments_apart() -> None:
    """Every aggregation and every vector match keeps `namespace` and `job`: two deployments on
    one Prometheus (a sidecar tier and a gateway tier, or two namespaces with a replica named
    sim-0 each) never add up. The promtool cases in rules_test.yaml show it on series."""
    found = [
        f"{rule.get('record') or rule.get('alert')}: {m.group()}"
        for rule in _rules()
        for m in _CLAUSE.finditer(rule["expr"])
        if not {"namespace", "job"} <= {label.strip() for label in m.group(2).split(",")}
    ]
    assert found == []


def test_demand_is_queued_plus_in_flight_per_deployment() -> None:
    rules = {r.get("record"): r for r in _rules()}
    demand = scan(rules["batchgate:demand"]["expr"])
    assert {sel.name for sel in demand.selectors} == {
        "batchgate_queue_depth", "batchgate_replica_in_flight"}
    assert demand.grouping == {"namespace", "job"}
