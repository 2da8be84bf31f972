"""deploy/grafana/batchgate.json: importable as is, and every query valid PromQL over real series.

Grafana variables are replaced by what Grafana would put in their place (`$replica` by a
regular expression, `$__rate_interval` by a duration), then each query becomes a recording
rule in a temporary file that ``promtool check rules`` parses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.promql import (
    CATALOGUE,
    ROOT,
    TARGET_LABELS,
    Matcher,
    problems,
    run_promtool,
    scan,
)

DASHBOARD = ROOT / "deploy" / "grafana" / "batchgate.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

#: Grafana's built-in variables, as a typical query would see them.
BUILTINS = {
    "__rate_interval": "5m", "__interval": "1m", "__range": "1h",
    "__interval_ms": "60000", "__range_s": "3600", "__range_ms": "3600000",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LABEL_VALUES = re.compile(r"label_values\(\s*(\w+)(\{[^}]*\})?\s*,\s*(\w+)\s*\)")
#: The matchers that keep one deployment's series apart from another's on a shared Prometheus.
DEPLOYMENT_FILTERS = (Matcher("job", "=~", "$job"), Matcher("namespace", "=~", "$namespace"))


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels inside collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _variables(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def _substitutions(dashboard: Mapping[str, Any], keep: bool = False) -> dict[str, str]:
    """What Grafana puts in place of each variable; `keep` leaves the dashboard's own variables
    as they are written (`$job`), for the checks that each query is filtered by them."""
    # Every query variable of this dashboard is used inside a regex matcher (`=~"$replica"`),
    # where "All" becomes its allValue, `.*` (a single value is a regex too).
    user = {name: f"${name}" if keep else ".*"
            for name, v in _variables(dashboard).items() if v["type"] != "datasource"}
    return {**BUILTINS, **user}


def to_promql(expr: str, substitutions: Mapping[str, str]) -> str:
    def replace(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in substitutions:
            raise AssertionError(f"unknown Grafana variable ${name} in {expr!r}")
        return substitutions[name]

    return _VARIABLE.sub(replace, expr)


def _queries(dashboard: Mapping[str, Any], keep: bool = False) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    subs = _substitutions(dashboard, keep)
    return [
        (f"panel {panel['id']} {panel.get('title', '')!r} target {target['refId']}",
         to_promql(target["expr"], subs))
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
    ]


def _promtool_check(exprs: list[str], tmp_path: Path) -> tuple[bool, str]:
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard_queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = run_promtool("check", "rules", path)
    return done.returncode == 0, done.stdout + done.stderr


def test_imports_as_is() -> None:
    dashboard = _dashboard()
    assert "__inputs" not in dashboard  # no import-time prompt: the datasource is a variable
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] == "batchgate"
    assert dashboard["id"] is None


def _variable_query(variable: Mapping[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def test_variables() -> None:
    variables = _variables(_dashboard())
    assert list(variables) == ["datasource", "namespace", "job", "replica"]  # each narrows the next
    datasource = variables["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    replica = variables["replica"]
    assert _variable_query(replica) == (
        'label_values(batchgate_replica_max_concurrency{job=~"$job", namespace=~"$namespace"},'
        " replica)"
    )
    assert replica["type"] == "query"
    assert replica["datasource"] == DATASOURCE
    assert replica["multi"] is True
    assert replica["includeAll"] is True


@pytest.mark.parametrize(
    ("name", "query"),
    [
        ("namespace", "label_values(batchgate_build_info, namespace)"),
        ("job", 'label_values(batchgate_build_info{namespace=~"$namespace"}, job)'),
    ],
)
def test_one_deployment_at_a_time(name: str, query: str) -> None:
    """Two deployments on one Prometheus (each with a replica `sim-0`, say) must never add up:
    the dashboard shows one job of one namespace, so neither variable offers "All" or several
    values at once."""
    variable = _variables(_dashboard())[name]
    assert _variable_query(variable) == query
    assert (variable["type"], variable["datasource"]) == ("query", DATASOURCE)
    assert variable["multi"] is False
    assert variable["includeAll"] is False
    assert variable["refresh"] == 2  # on time range change: deployments come and go


def test_every_query_is_filtered_to_the_deployment() -> None:
    """Every selector of every panel carries `job=~"$job", namespace=~"$namespace"`: one
    selector without them (the right-hand side of an `and`, say) mixes in other deployments."""
    found = [
        f"{where}: {sel.name} lacks {m.label}=~{m.value!r}"
        for where, expr in _queries(_dashboard(), keep=True)
        for sel in scan(expr).selectors
        for m in DEPLOYMENT_FILTERS
        if m not in sel.matchers
    ]
    assert found == []


def test_variable_queries_read_catalogue_series() -> None:
    for v in _variables(_dashboard()).values():
        if v["type"] != "query":
            continue
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = _LABEL_VALUES.fullmatch(query)
        assert m, f"variable {v['name']}: expected label_values(metric, label), got {query!r}"
        metric, _, label = m.groups()
        assert metric in CATALOGUE, f"variable {v['name']}: {metric!r} is not in the catalogue"
        assert label in set(CATALOGUE[metric]) | TARGET_LABELS, f"{metric} has no label {label}"


def test_every_datasource_is_the_variable() -> None:
    """No datasource uid of the exporting Grafana is left in: it would not exist on import."""

    def walk(node: Any, where: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource":
                    yield where, value
                yield from walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                yield from walk(item, f"{where}[{i}]")

    dashboard = _dashboard()
    found = [(where, ds) for where, ds in walk(dashboard["panels"], "panels")]
    assert found
    assert [(where, ds) for where, ds in found if ds != DATASOURCE] == []


def test_panels_explain_themselves_and_do_not_overlap() -> None:
    dashboard = _dashboard()
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        title = panel["title"]
        if panel["type"] != "row":
            assert len(panel.get("description", "")) >= 80, f"{title}: describe it for operators"
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), title
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, title
        for cell in ((x, y) for x in range(g["x"], g["x"] + g["w"])
                     for y in range(g["y"], g["y"] + g["h"])):
            assert cell not in taken, f"{title} overlaps {taken[cell]}"
            taken[cell] = title


def test_every_query_parses(tmp_path: Path) -> None:
    queries = _queries(_dashboard())
    assert len(queries) >= 20
    ok, output = _promtool_check([q for _, q in queries], tmp_path)
    assert ok, output


def test_the_parse_check_catches_a_broken_query(tmp_path: Path) -> None:
    ok, output = _promtool_check(["sum by (le) (rate(batchgate_queue_depth[5m])"], tmp_path)
    assert not ok
    assert "dashboard:query_0" in output


def test_every_query_reads_catalogue_series() -> None:
    found = [f"{where}: {p}" for where, q in _queries(_dashboard()) for p in problems(q)]
    assert found == []


def test_every_exported_series_is_on_the_dashboard() -> None:
    shown = {sel.name for _, q in _queries(_dashboard()) for sel in scan(q).selectors}
    # A histogram is shown through its buckets; _sum and _count add nothing to percentiles.
    expected = {n for n in CATALOGUE if not n.endswith(("_sum", "_count"))}
    assert expected - shown == set()


@pytest.mark.parametrize(
    "histogram",
    sorted(n.removesuffix("_bucket") for n in CATALOGUE if n.endswith("_bucket")),
)
def test_histograms_show_p50_p95_p99(histogram: str) -> None:
    quantile = re.compile(
        r"histogram_quantile\(\s*([0-9.]+)\s*,\s*sum by \(le\) \(rate\("
        + re.escape(histogram) + r"_bucket[{\[]"
    )
    found = {float(q) for _, expr in _queries(_dashboard()) for q in quantile.findall(expr)}
    assert found == {0.5, 0.95, 0.99}


def test_time_to_first_token_panel_reads_streams_only() -> None:
    """Non-streamed answers send their first byte after the whole generation: not a TTFT."""
    dashboard = _dashboard()
    subs = _substitutions(dashboard)
    ttft = [p for p in _panels(dashboard) if "first token" in p.get("title", "").lower()]
    assert ttft
    for panel in ttft:
        for target in panel["targets"]:
            selectors = [
                sel for sel in scan(to_promql(target["expr"], subs)).selectors
                if sel.name == "batchgate_time_to_first_byte_seconds_bucket"
            ]
            assert selectors, panel["title"]
            for sel in selectors:
                assert Matcher("stream", "=", "true") in sel.matchers, (panel["title"], sel)
