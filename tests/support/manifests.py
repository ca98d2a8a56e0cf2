"""The Kubernetes manifests as kubectl renders them, and their strict validation offline (Kubernetes'
schemas from kubernetes-validate, KServe's and the Prometheus Operator's vendored CRD schemas)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.common import ROOT

KUBERNETES = ROOT / "deploy" / "kubernetes"
SCHEMAS = KUBERNETES / "schemas"
KUBERNETES_VERSION = "1.32"  # the kubectl these machines have
KSERVE_SCHEMAS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "kserve-inferenceservice-v1beta1.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "kserve-servingruntime-v1alpha1.json",
}
# Other CRDs' vendored schemas (vendor_prometheus_operator_schema.py): the monitoring overlay's.
CRD_SCHEMAS = {
    **KSERVE_SCHEMAS,
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheus-operator-prometheusrule-v1.json",
}


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI") == "true":
            pytest.fail("kubectl is missing, and CI must render the manifests")
        pytest.skip("kubectl is not installed (CI=true makes this a failure)")
    return kubectl


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(name: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize deploy/kubernetes/<name>` prints (cached: rendering is pure)."""
    if name not in _rendered:
        result = subprocess.run(
            [_kubectl(), "kustomize", str(KUBERNETES / name)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"kubectl kustomize {name} failed:\n{result.stderr}"
        _rendered[name] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return copy.deepcopy(_rendered[name])


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def the(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = objects(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def validation_errors(doc: dict[str, Any]) -> list[str]:
    """Strict schema errors of one object: KServe's from its CRD schema, the rest from Kubernetes'."""
    label = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if doc.get("apiVersion", "").split("/")[0] in {group.split("/")[0] for group, _ in CRD_SCHEMAS}:
        schema_file = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if schema_file is None:
            return [f"{label}: no vendored schema for {doc['apiVersion']} {doc['kind']}"]
        validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / schema_file).read_text()))
        return [
            f"{label}: {'.'.join(map(str, error.absolute_path))}: {error.message}"
            for error in validator.iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{label}: {'.'.join(map(str, error.absolute_path))}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [
            f"{label}: no Kubernetes {KUBERNETES_VERSION} schema for {doc.get('apiVersion')} {doc.get('kind')}"
        ]
    return []
