"""Copy deploy/monitoring/rules into the Kubernetes manifests (run after changing a rule).

    python deploy/monitoring/sync_kubernetes.py

- deploy/kubernetes/base/prometheus-rules.yaml: a ConfigMap holding each rule file as it is, to
  mount where your Prometheus' rule_files point (beside the base's scrape ConfigMap);
- deploy/kubernetes/overlays/monitoring/prometheusrule.yaml: the same groups as a PrometheusRule
  for the Prometheus Operator.
kustomize reads no file outside its folder, so these are copies; tests/test_monitoring.py fails
when they differ from the rules.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
KUBERNETES = HERE.parent / "kubernetes"
HEADER = (
    "# Written by deploy/monitoring/sync_kubernetes.py from deploy/monitoring/rules:\n"
    "# edit those, then run it.\n"
)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the longer expressions) as literal blocks, like the rule files."""


_Dumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None
    ),
)


def literal(text: str, indent: int) -> str:
    pad = " " * indent
    return "".join(pad + line if line.strip() else "\n" for line in text.splitlines(keepends=True))


def main() -> None:
    rules = sorted((HERE / "rules").glob("*.yml"))
    config_map = HEADER + (
        "# Mount it where the Prometheus configuration's rule_files look,\n"
        "# e.g. /etc/prometheus/rules/*.yml.\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: mnist-serve-prometheus-rules\ndata:\n"
    )
    for rule in rules:
        config_map += f"  {rule.name}: |\n" + literal(rule.read_text(), 4)
    (KUBERNETES / "base" / "prometheus-rules.yaml").write_text(config_map)

    groups = [group for rule in rules for group in yaml.safe_load(rule.read_text())["groups"]]
    operator = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "mnist-serve", "labels": {"prometheus": "mnist-serve"}},
        "spec": {"groups": groups},
    }
    (KUBERNETES / "overlays" / "monitoring" / "prometheusrule.yaml").write_text(
        HEADER
        + "# The Prometheus Operator's form of the rules; select it with the label below.\n"
        + yaml.dump(operator, Dumper=_Dumper, sort_keys=False, width=120)
    )


if __name__ == "__main__":
    main()
