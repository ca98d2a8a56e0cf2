"""Turn the Prometheus Operator's PrometheusRule CRD into a strict, offline JSON Schema.

    python deploy/kubernetes/schemas/vendor_prometheus_operator_schema.py <checkout> [commit]

<checkout>: a clone of prometheus-operator/prometheus-operator.

Reads example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml and keeps the
storage version's openAPIV3Schema the way vendor_kserve_schemas.py does for KServe's CRDs: no
descriptions, and strict (a field the schema does not declare is an error), so that
tests/test_manifests.py validates the `monitoring` overlay's PrometheusRule offline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from vendor_kserve_schemas import strict_schema  # noqa: E402  (the same strictness for every CRD)

CRD = "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml"
HERE = Path(__file__).parent


def main(argv: list[str]) -> int:
    checkout = Path(argv[0])
    commit = (
        argv[1]
        if len(argv) > 1
        else subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    crd = yaml.safe_load(
        subprocess.run(
            ["git", "-C", str(checkout), "show", f"{commit}:{CRD}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    for version in crd["spec"]["versions"]:
        if not version.get("storage"):
            continue
        schema = strict_schema(version["schema"]["openAPIV3Schema"])
        schema["$comment"] = (
            f"prometheus-operator/prometheus-operator@{commit}:{CRD} "
            f"{crd['spec']['group']}/{version['name']}"
        )
        out = HERE / f"prometheus-operator-prometheusrule-{version['name']}.json"
        out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
        print(f"{out} {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
