"""Offline validation of Kubernetes manifests: built-in kinds by kubernetes-validate (strict,
every Kubernetes version from MIN_VERSION to the newest it ships), custom resources by
check-jsonschema against the strict CRD schemas vendored in tests/deploy/schemas/.

A kind that neither knows is a failure: kubernetes-validate's CLI only warns about it, so its
Python API is used and "no schema" is reported as a problem like any other. Shared by the
kustomize tests (test_kubernetes.py) and the chart's (helm template output).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import kubernetes_validate.utils as kv  # type: ignore[import-untyped]
import yaml
from packaging.version import Version

SCHEMAS = Path(__file__).resolve().parent / "schemas"
MIN_VERSION = "1.29"  # native sidecars (restartPolicy: Always on init containers) are on by default

Manifest = dict[str, Any]


def kube_versions() -> list[str]:
    """Every Kubernetes version kubernetes-validate ships schemas for, from MIN_VERSION on."""
    found = sorted({kv.major_minor(v) for v in kv.all_versions()}, key=Version)
    chosen = [v for v in found if Version(v) >= Version(MIN_VERSION)]
    assert chosen, f"kubernetes-validate ships no schema for {MIN_VERSION} or later"
    return chosen


def kustomize(overlay: Path) -> list[Manifest]:
    """`kubectl kustomize <overlay>` (default load restrictor) as a list of manifests."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed for the kustomize tests (it ships `kubectl kustomize`)"
    done = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, f"kubectl kustomize {overlay}: {done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


def crd_schema(manifest: Manifest) -> Path | None:
    """The vendored schema for a custom resource (`<group>/<kind>_<version>.json`), if any."""
    group, _, version = str(manifest.get("apiVersion", "")).rpartition("/")
    if not group:
        return None
    path = SCHEMAS / group / f"{str(manifest.get('kind', '')).lower()}_{version}.json"
    return path if path.is_file() else None


def name_of(manifest: Manifest) -> str:
    meta = manifest.get("metadata") or {}
    return f"{manifest.get('kind')}/{meta.get('name')} ({manifest.get('apiVersion')})"


def builtin_problems(manifest: Manifest, versions: Iterable[str]) -> list[str]:
    found = []
    for version in versions:
        try:
            kv.validate(manifest, version, strict=True)
        except kv.SchemaNotFoundError as e:
            found.append(f"{name_of(manifest)}: unknown kind on Kubernetes {version}: {e.message}")
        except kv.ValidationError as e:
            where = "/".join(map(str, e.absolute_path))
            found.append(f"{name_of(manifest)} on Kubernetes {version}: {where}: {e.message}")
    return found


def crd_problems(manifests: Sequence[tuple[Manifest, Path]], workdir: Path) -> list[str]:
    """check-jsonschema, one run per schema over every manifest of that kind."""
    found = []
    by_schema: dict[Path, list[Path]] = {}
    for i, (manifest, schema) in enumerate(manifests):
        path = workdir / f"{i:03d}-{manifest['kind'].lower()}.yaml"
        path.write_text(yaml.safe_dump(manifest))
        by_schema.setdefault(schema, []).append(path)
    cli = Path(sys.executable).with_name("check-jsonschema")
    for schema, files in by_schema.items():
        done = subprocess.run([str(cli), "--schemafile", str(schema), *map(str, files)],
                              capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            found.append(f"check-jsonschema {schema.relative_to(SCHEMAS)}: "
                         f"{done.stdout}{done.stderr}")
    return found


def problems(manifests: Iterable[Manifest], workdir: Path,
             versions: Sequence[str] | None = None) -> list[str]:
    """Why these manifests would not be accepted; empty when every one validates strictly."""
    versions = list(versions or kube_versions())
    found: list[str] = []
    custom: list[tuple[Manifest, Path]] = []
    for manifest in manifests:
        schema = crd_schema(manifest)
        if schema is not None:
            custom.append((manifest, schema))
        else:  # a kind neither knows fails here: "unknown kind", never a warning
            found += builtin_problems(manifest, versions)
    if custom:
        found += crd_problems(custom, workdir)
    return found
