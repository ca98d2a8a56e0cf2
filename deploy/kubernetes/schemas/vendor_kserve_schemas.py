"""Turn KServe's published CRDs into strict, offline JSON Schemas for tests/test_manifests.py.

    python deploy/kubernetes/schemas/vendor_kserve_schemas.py <kserve checkout> [commit]

The CRDs (config/crd/full/serving.kserve.io_*.yaml) are 2 MB of YAML, mostly descriptions and
repeated copies of the Kubernetes Container and Volume schemas. This keeps each CRD's
openAPIV3Schema without descriptions, moves subtrees that occur more than once into `$defs`, and
makes it strict the way `kubectl apply --validate=strict` is: where a schema lists `properties`
and neither allows extra ones nor preserves unknown fields, any other field is an error.
"""

from __future__ import annotations

import collections
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

CRDS = {
    "inferenceservice": "config/crd/full/serving.kserve.io_inferenceservices.yaml",
    "servingruntime": "config/crd/full/serving.kserve.io_servingruntimes.yaml",
}
HERE = Path(__file__).parent
SHARED_MIN_CHARS = 1000  # only big repeated subtrees are worth a $ref


def _canonical(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def strict_schema(schema: dict) -> dict:
    """Drop descriptions; forbid fields a structural schema does not declare."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "description":
            continue
        if key in ("properties", "patternProperties"):  # maps of field name -> schema
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = strict_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [strict_schema(sub) for sub in value]
        else:
            out[key] = value
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def share_repeats(schema: dict) -> dict:
    """Replace every big subtree that occurs more than once by a $ref to one copy in $defs."""
    counts: collections.Counter[str] = collections.Counter()

    def count(node: Any) -> None:
        if isinstance(node, dict):
            text = _canonical(node)
            if len(text) >= SHARED_MIN_CHARS:
                counts[text] += 1
            for value in node.values():
                count(value)
        elif isinstance(node, list):
            for value in node:
                count(value)

    defs: dict[str, Any] = {}

    def replace(schema: dict, top: bool = False) -> dict:
        text = _canonical(schema)
        if not top and counts.get(text, 0) > 1:
            name = "s" + hashlib.sha256(text.encode()).hexdigest()[:12]
            if name not in defs:
                defs[name] = {}  # reserve the name; the copy is made once
                defs[name] = descend(schema)
            return {"$ref": f"#/$defs/{name}"}
        return descend(schema)

    def descend(schema: dict) -> dict:
        """Recurse only where JSON Schema expects a schema; maps of them and values stay as they are."""
        out: dict[str, Any] = {}
        for key, value in schema.items():
            if key in ("properties", "patternProperties"):
                out[key] = {name: replace(sub) for name, sub in value.items()}
            elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
                out[key] = replace(value)
            elif key in ("allOf", "anyOf", "oneOf"):
                out[key] = [replace(sub) for sub in value]
            else:
                out[key] = value
        return out

    count(schema)
    out = replace(schema, top=True)
    out["$defs"] = dict(sorted(defs.items()))
    return out


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
    for name, path in CRDS.items():
        crd = yaml.safe_load(
            subprocess.run(
                ["git", "-C", str(checkout), "show", f"{commit}:{path}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for version in crd["spec"]["versions"]:
            if not version.get("storage"):
                continue
            schema = share_repeats(strict_schema(version["schema"]["openAPIV3Schema"]))
            schema["$comment"] = (
                f"kserve/kserve@{commit}:{path} {crd['spec']['group']}/{version['name']}"
            )
            out = HERE / f"kserve-{name}-{version['name']}.json"
            out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
            print(f"{out} {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
