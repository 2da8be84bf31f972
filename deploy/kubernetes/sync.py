#!/usr/bin/env python3
"""Copy what the kustomize overlays need from elsewhere in the repository into their folders.

`kubectl kustomize` (its default load restrictor) refuses to read files outside an overlay's
folder, so the overlays carry copies, generated from the sources of truth:

- monitoring/prometheusrule.yaml: a PrometheusRule whose spec is deploy/prometheus/rules.yaml
  (its text, comments kept, indented under `spec:`);
- monitoring/batchgate.json: deploy/grafana/batchgate.json byte for byte.

`make deploy-sync` writes them; `--check` (and tests/deploy/test_kubernetes.py) fails when a
copy is stale. Never edit the copies: edit the sources and run `make deploy-sync`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RULE_HEADER = """\
# GENERATED from deploy/prometheus/rules.yaml by deploy/kubernetes/sync.py (make deploy-sync).
# Do not edit: edit the source and regenerate; make test fails while this copy is stale.
# The Prometheus Operator loads a PrometheusRule whose labels match its ruleSelector: add
# yours (e.g. `release: kube-prometheus-stack`) in an overlay of your own.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: batchgate
spec:
"""


def prometheus_rule(rules_text: str) -> str:
    """rules.yaml from its `groups:` line on, as the PrometheusRule's spec (comments kept)."""
    lines = rules_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    # Everything after the leading comment block is the rule file's one top-level key.
    if any(line[:1] not in ("", " ", "#") for line in lines[start + 1:]):
        raise SystemExit("deploy/prometheus/rules.yaml: expected `groups:` as its only key")
    body = "".join(f"  {line}\n" if line else "\n" for line in lines[start:])
    return RULE_HEADER + body


def render(root: Path = ROOT) -> dict[Path, bytes]:
    """Each generated file (path relative to root) and the bytes it must hold."""
    here = Path("deploy/kubernetes")
    rules = (root / "deploy/prometheus/rules.yaml").read_text()
    return {
        here / "monitoring/prometheusrule.yaml": prometheus_rule(rules).encode(),
        here / "monitoring/batchgate.json": (root / "deploy/grafana/batchgate.json").read_bytes(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a copy is stale")
    args = parser.parse_args()
    stale = []
    for rel, data in render().items():
        path = ROOT / rel
        if path.exists() and path.read_bytes() == data:
            continue
        if args.check:
            stale.append(str(rel))
        else:
            path.write_bytes(data)
            print(f"wrote {rel}")
    if stale:
        print(f"stale: {', '.join(stale)} (run `make deploy-sync`)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
