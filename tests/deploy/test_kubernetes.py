"""deploy/kubernetes: every overlay renders with plain `kubectl kustomize` and validates strictly,
offline, for every Kubernetes version from 1.29; the configs in it pass `batchgate
check-config`; the pods are wired as the README says (native sidecar, drain hook, grace period,
probes, discovery, scrapes); the autoscaling query means what it claims, checked by promtool.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from proxy import config as batchgate_config
from tests.deploy import kube
from tests.deploy.promql import problems as promql_problems
from tests.deploy.promql import run_promtool

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ["sidecar", "gateway", "monitoring", "autoscaling/keda",
            "autoscaling/prometheus-adapter"]
CONFIG_PATH = "/etc/batchgate/config.yaml"

Manifest = dict[str, Any]


def render(overlay: str) -> list[Manifest]:
    return kube.kustomize(KUSTOMIZE / overlay)


def one(docs: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def sync_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_sync", KUSTOMIZE / "sync.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the overlays and their copies -------------------------------------------------------------

def test_every_overlay_is_listed() -> None:
    found = sorted(str(p.parent.relative_to(KUSTOMIZE))
                   for p in KUSTOMIZE.rglob("kustomization.yaml"))
    assert found == sorted(OVERLAYS)


def test_copies_in_the_overlays_match_their_sources() -> None:
    """kustomize cannot read deploy/prometheus or deploy/grafana: `make deploy-sync` copies."""
    for rel, data in sync_module().render(ROOT).items():
        assert (ROOT / rel).read_bytes() == data, f"{rel} is stale: run `make deploy-sync`"


def test_the_generated_prometheusrule_holds_exactly_the_rules_file() -> None:
    rule = one(render("monitoring"), "PrometheusRule")
    source = yaml.safe_load((ROOT / "deploy/prometheus/rules.yaml").read_text())
    assert rule["spec"] == source


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly_on_every_kubernetes_version(
    overlay: str, tmp_path: Path
) -> None:
    docs = render(overlay)
    assert docs
    assert kube.problems(docs, tmp_path) == []


# --- the validator itself: what it must refuse -------------------------------------------------

def test_validator_refuses_an_unknown_kind(tmp_path: Path) -> None:
    docs = [{"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}]
    found = kube.problems(docs, tmp_path, versions=["1.29"])
    assert len(found) == 1 and "unknown kind" in found[0]


def test_validator_refuses_an_unknown_field_in_a_builtin_kind(tmp_path: Path) -> None:
    deployment = one(render("gateway"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    found = kube.problems([deployment], tmp_path)
    assert len(found) == len(kube.kube_versions())
    assert all("livenesProbe" in p for p in found)


def test_validator_refuses_an_unknown_field_in_a_custom_resource(tmp_path: Path) -> None:
    scaled = one(render("autoscaling/keda"), "ScaledObject")
    scaled["spec"]["triggers"][0]["metdata"] = scaled["spec"]["triggers"][0].pop("metadata")
    found = kube.problems([scaled], tmp_path)
    assert len(found) == 1 and "metdata" in found[0]


def test_versions_run_from_1_29_to_the_newest_shipped() -> None:
    versions = kube.kube_versions()
    assert versions[0] == "1.29"
    assert len(versions) >= 2


# --- the configs in the overlays ---------------------------------------------------------------

# Keys the overlays use that are being built on other branches of issue 9: while the installed
# proxy.config lacks one, it is left out of the check (and a config that is nothing without it is
# skipped, saying so); once merged, the full config is checked with no change here.
PENDING = {
    ("server", "drain_quiet_s"): batchgate_config.ServerConfig,
    ("server", "load_headers"): batchgate_config.ServerConfig,
    ("health", "ready_without_replicas"): batchgate_config.HealthConfig,
    ("discovery",): batchgate_config.Config,
}


def supported(key: tuple[str, ...]) -> bool:
    return key[-1] in {f.name for f in dataclasses.fields(PENDING[key])}


def without_unmerged(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    left_out = []
    for key in PENDING:
        if supported(key):
            continue
        parent = config
        for part in key[:-1]:
            parent = parent.get(part) or {}
        if key[-1] in parent:
            del parent[key[-1]]
            left_out.append(".".join(key))
    return config, left_out


def pod_of(docs: list[Manifest]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def batchgate_container(docs: list[Manifest]) -> dict[str, Any]:
    pod = pod_of(docs)
    (found,) = [c for c in pod.get("initContainers", []) + pod["containers"]
                if c["name"] == "batchgate"]
    return dict(found)


def mounted_config(docs: list[Manifest]) -> tuple[str, dict[str, Any]]:
    """The config file the batchgate container reads at CONFIG_PATH: (text, parsed)."""
    pod, container = pod_of(docs), batchgate_container(docs)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_PATH]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    cm = one(docs, "ConfigMap", volume["configMap"]["name"])
    text = cm["data"][mount["subPath"]]
    return text, yaml.safe_load(text)


def materialise(docs: list[Manifest], root: Path) -> tuple[str, dict[str, str]]:
    """The batchgate container's secret mounts written under root, and its env from Secrets:
    the files and variables the config names exist as they would in the pod."""
    pod, container = pod_of(docs), batchgate_container(docs)
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for d in docs
               if d["kind"] == "Secret"}
    text, _ = mounted_config(docs)
    for mount in container["volumeMounts"]:
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        if "secret" not in volume:
            continue
        data = secrets[volume["secret"]["secretName"]]
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True)
        for item in volume["secret"].get("items") or [{"key": k, "path": k} for k in data]:
            (target / item["path"]).write_text(data[item["key"]])
        text = text.replace(mount["mountPath"], str(target))
    env = {}
    for var in container.get("env", []):
        ref = var["valueFrom"]["secretKeyRef"]
        env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return text, env


@pytest.mark.parametrize("overlay", ["sidecar", "gateway"])
def test_overlay_config_passes_check_config(overlay: str, tmp_path: Path) -> None:
    text, env = materialise(render(overlay), tmp_path)
    original = yaml.safe_load(text)
    config, left_out = without_unmerged(yaml.safe_load(text))
    if "discovery" in left_out:
        # Until discovery is merged: each entry stands in as one static replica at the same
        # address, so every other key is still checked today.
        config["replicas"] = [
            {"name": f"{e['name_prefix']}-0", "url": f"http://{e['dns']}:{e['port']}",
             "max_concurrency": e["max_concurrency"]}
            for e in original["discovery"]
        ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config) if left_out else text)
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    effective = yaml.safe_load(done.stdout)
    assert effective["auth"]["api_keys_file"] is not None  # callers need a key
    if "discovery" in left_out:
        pytest.skip("checked with discovery as static replicas (not merged yet); left out: "
                    + ", ".join(left_out))


# --- what the pods are wired to do -------------------------------------------------------------

def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(found)


def test_sidecar_is_a_native_sidecar_with_probes_and_a_drain_hook() -> None:
    docs = render("sidecar")
    pod = pod_of(docs)
    _, config = mounted_config(docs)
    port = config["server"]["port"]

    gate = batchgate_container(docs)
    assert gate in pod["initContainers"] and gate["restartPolicy"] == "Always"
    assert (gate["livenessProbe"]["httpGet"]["path"], port_number(
        gate, gate["livenessProbe"]["httpGet"]["port"])) == ("/healthz", port)
    assert (gate["readinessProbe"]["httpGet"]["path"], port_number(
        gate, gate["readinessProbe"]["httpGet"]["port"])) == ("/readyz", port)
    # Not ready until the engine is: the pod stays out of its Services while weights load.
    assert config["health"]["assume_healthy_at_start"] is False

    (engine,) = pod["containers"]
    engine_port = port_number(engine, engine["startupProbe"]["httpGet"]["port"])
    engine_url = f"http://127.0.0.1:{engine_port}"
    assert [r["url"] for r in config["replicas"]] == [engine_url]
    assert f"--max-num-seqs={config['replicas'][0]['max_concurrency']}" in engine["args"]
    assert "startupProbe" in engine

    # preStop blocks on /wait-for-drain, bounded above the drain and below the grace period.
    hook = " ".join(engine["lifecycle"]["preStop"]["exec"]["command"])
    assert f"http://127.0.0.1:{port}/wait-for-drain" in hook
    (guard,) = map(float, re.findall(r"timeout=(\d+)", hook))
    drain = float(config["server"]["drain_timeout_s"])
    grace = float(pod["terminationGracePeriodSeconds"])
    assert drain < guard < grace

    service = one(docs, "Service")
    (svc_port,) = service["spec"]["ports"]  # the proxy port alone: no /admin/* for callers
    assert port_number(gate, svc_port["targetPort"]) == port
    assert service["spec"]["selector"].items() <= one(docs, "Deployment")["spec"]["template"][
        "metadata"]["labels"].items()

    # Scraped: batchgate where /metrics is served (admin listener) and the engine.
    monitor = one(docs, "PodMonitor")
    scraped = {(e["port"], e["path"]) for e in monitor["spec"]["podMetricsEndpoints"]}
    metrics_port = config["admin"]["port"] if config.get("admin") else port
    gate_port = [p["name"] for p in gate["ports"] if p["containerPort"] == metrics_port]
    engine_names = [p["name"] for p in engine["ports"] if p["containerPort"] == engine_port]
    assert scraped == {(gate_port[0], "/metrics"), (engine_names[0], "/metrics")}


def test_engine_prestop_hook_blocks_until_wait_for_drain_answers() -> None:
    """The hook's own command, run against a stand-in for batchgate that holds its answer:
    it sends GET /wait-for-drain, is still waiting while the drain runs, exits 0 on the 200."""
    (engine,) = pod_of(render("sidecar"))["containers"]
    command = list(engine["lifecycle"]["preStop"]["exec"]["command"])
    asked, drained = threading.Event(), threading.Event()
    seen: list[tuple[str, str]] = []

    class Batchgate(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.command, self.path))
            asked.set()
            drained.wait(30)  # deadlock guard only
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Batchgate)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    assert command[0] == "python3"
    argv = [sys.executable, *[a.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
                              for a in command[1:]]]
    proc = subprocess.Popen(argv)
    try:
        assert asked.wait(30)
        assert proc.poll() is None, "the hook returned before batchgate had drained"
        drained.set()
        assert proc.wait(timeout=30) == 0
        assert seen == [("GET", "/wait-for-drain")]
    finally:
        drained.set()
        proc.kill()
        proc.wait()
        server.shutdown()
        server.server_close()


def test_secrets_come_from_a_secret_and_the_config_from_a_configmap() -> None:
    for overlay in ("sidecar", "gateway"):
        docs = render(overlay)
        text, _ = mounted_config(docs)
        # No credential written into the ConfigMap: keys come from the Secret's file and env.
        assert "replace-me" not in text
        config = yaml.safe_load(text)
        assert re.fullmatch(r"\$\{[A-Z_]+\}", config["auth"]["upstream_api_key"])
        gate = batchgate_container(docs)
        assert all("secretKeyRef" in e["valueFrom"] for e in gate["env"])


def test_gateway_has_two_pods_a_budget_spread_and_discovers_sidecars() -> None:
    docs = render("gateway")
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] >= 2
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pod = pod_of(docs)
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"

    _, config = mounted_config(docs)
    gate = batchgate_container(docs)
    assert float(pod["terminationGracePeriodSeconds"]) > float(config["server"]["drain_timeout_s"])
    assert gate["readinessProbe"]["httpGet"]["path"] == "/readyz"

    # Discovery names the headless Service, which selects the sidecar pods on batchgate's port.
    headless = one(docs, "Service", "vllm-headless")
    assert headless["spec"]["clusterIP"] == "None"
    (entry,) = config["discovery"]
    ns = headless["metadata"]["namespace"]
    assert entry["dns"] == f"{headless['metadata']['name']}.{ns}.svc.cluster.local"
    sidecar = render("sidecar")
    sidecar_labels = one(sidecar, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= sidecar_labels.items()
    _, sidecar_config = mounted_config(sidecar)
    (svc_port,) = headless["spec"]["ports"]
    assert entry["port"] == svc_port["port"] == sidecar_config["server"]["port"]
    assert port_number(batchgate_container(sidecar), svc_port["targetPort"]) == entry["port"]
    assert entry["max_concurrency"] == sidecar_config["replicas"][0]["max_concurrency"]
    assert entry["interval_s"] == 5
    assert one(sidecar, "Deployment")["metadata"]["namespace"] == ns

    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service", "batchgate-gateway-metrics")
    services = [d for d in docs if d["kind"] == "Service"]
    selected = [d["metadata"]["name"] for d in services
                if monitor["spec"]["selector"]["matchLabels"].items()
                <= d["metadata"]["labels"].items()]
    assert selected == ["batchgate-gateway-metrics"]
    # The callers' Service carries the proxy port alone, never the admin listener.
    callers = one(docs, "Service", "batchgate-gateway")
    assert [port_number(gate, p["targetPort"]) for p in callers["spec"]["ports"]] == [
        config["server"]["port"]]
    (endpoint,) = monitor["spec"]["endpoints"]
    (svc,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port_number(gate, svc["targetPort"]) == config["admin"]["port"]


def test_dashboard_configmap_is_the_dashboard_labelled_for_grafana() -> None:
    cm = one(render("monitoring"), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = json.loads((ROOT / "deploy/grafana/batchgate.json").read_text())
    assert json.loads(cm["data"]["batchgate.json"]) == source


def test_prometheusrule_passes_promtool_and_the_rules_unit_tests(tmp_path: Path) -> None:
    rule = one(render("monitoring"), "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    shutil.copy(ROOT / "deploy/prometheus/rules_test.yaml", tmp_path / "rules_test.yaml")
    done = run_promtool("check", "rules", tmp_path / "rules.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    done = run_promtool("test", "rules", tmp_path / "rules_test.yaml")
    assert done.returncode == 0, done.stdout + done.stderr


# --- autoscaling -------------------------------------------------------------------------------

def keda_trigger() -> dict[str, Any]:
    scaled = one(render("autoscaling/keda"), "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    return dict(trigger["metadata"])


def adapter_rule() -> dict[str, Any]:
    doc = yaml.safe_load(
        (KUSTOMIZE / "autoscaling/prometheus-adapter/prometheus-adapter-rules.yaml").read_text())
    (rule,) = doc["externalRules"]
    return dict(rule)


def sidecar_capacity() -> int:
    _, config = mounted_config(render("sidecar"))
    return int(config["replicas"][0]["max_concurrency"])


def test_keda_scales_the_sidecar_deployment_on_demand_over_capacity() -> None:
    scaled = one(render("autoscaling/keda"), "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == one(render("sidecar"), "Deployment")[
        "metadata"]["name"]
    meta = keda_trigger()
    assert meta["ignoreNullValues"] == "false"  # a missing series is an error, not zero demand
    assert float(meta["threshold"]) == sidecar_capacity()
    assert "fallback" in scaled["spec"]
    assert promql_problems(meta["query"]) == []


def test_hpa_alternative_targets_the_adapters_metric_per_pod_capacity() -> None:
    hpa = one(render("autoscaling/prometheus-adapter"), "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["external"]["metric"]["name"] == adapter_rule()["name"]["as"]
    assert metric["external"]["target"] == {"type": "AverageValue",
                                            "averageValue": str(sidecar_capacity())}
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(render("sidecar"), "Deployment")[
        "metadata"]["name"]


GW = 'job="batchgate-gateway"'
DEMAND_CASES = [
    # Two gateways: 3 + 2 waiting, 32 + 4 in flight on two sidecars; a sidecar's own series
    # (job batchgate-sidecar) count the same requests again and must be left out.
    ({f'batchgate_queue_depth{{{GW}, instance="a"}}': 3,
      f'batchgate_queue_depth{{{GW}, instance="b"}}': 2,
      f'batchgate_replica_in_flight{{{GW}, instance="a", replica="vllm-10.0.0.1"}}': 32,
      f'batchgate_replica_in_flight{{{GW}, instance="b", replica="vllm-10.0.0.2"}}': 4,
      'batchgate_queue_depth{job="batchgate-sidecar", instance="c"}': 50,
      'batchgate_replica_in_flight{job="batchgate-sidecar", instance="c", replica="vllm"}': 32},
     41.0),
    # Engines at zero: gateways know no replica yet (no in-flight series); the queue is demand.
    ({f'batchgate_queue_depth{{{GW}, instance="a"}}': 7}, 7.0),
    # No gateway scraped at all: no value (KEDA errors and falls back), never a zero.
    ({'batchgate_queue_depth{job="batchgate-sidecar", instance="c"}': 50}, None),
]


def promtool_says(expr: str, series: dict[str, float], demand: float | None,
                  tmp_path: Path) -> str:
    """promtool's verdict on `expr` over constant series at 1m: "" when it equals `demand`
    (one sample without labels, or no sample at all for None), else promtool's complaint."""
    expected = [] if demand is None else [{"labels": "{}", "value": demand}]
    test: dict[str, Any] = {
        "rule_files": [],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": [{"series": s, "values": f"{v}x8"} for s, v in series.items()],
            "promql_expr_test": [{"expr": expr, "eval_time": "1m", "exp_samples": expected}],
        }],
    }
    path = tmp_path / "demand_test.yaml"
    path.write_text(yaml.safe_dump(test))
    done = run_promtool("test", "rules", path)
    return "" if done.returncode == 0 else done.stdout + done.stderr


@pytest.mark.parametrize(("series", "demand"), DEMAND_CASES)
def test_keda_query_counts_the_gateways_demand(
    series: dict[str, float], demand: float | None, tmp_path: Path
) -> None:
    assert promtool_says(keda_trigger()["query"], series, demand, tmp_path) == ""


@pytest.mark.parametrize(("series", "demand"), DEMAND_CASES)
def test_adapter_query_counts_the_same_demand(
    series: dict[str, float], demand: float | None, tmp_path: Path
) -> None:
    # The adapter puts the HPA's namespace matcher where <<.LabelMatchers>> is.
    expr = adapter_rule()["metricsQuery"].replace("<<.LabelMatchers>>", 'namespace="llm"')
    in_llm = {s.replace("{", '{namespace="llm", '): v for s, v in series.items()}
    elsewhere = {s.replace("{", '{namespace="other", '): 1000 for s in series}
    assert promtool_says(expr, {**in_llm, **elsewhere}, demand, tmp_path) == ""


# --- lint --------------------------------------------------------------------------------------

def test_yamllint_on_deploy() -> None:
    cli = Path(sys.executable).with_name("yamllint")
    done = subprocess.run([str(cli), "--strict", "-c", str(ROOT / ".yamllint"), "deploy"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
