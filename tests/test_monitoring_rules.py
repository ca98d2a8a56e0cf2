"""Monitoring's files proven by the real tools, without a running server: the rules with
`promtool check rules` and `promtool test rules` (the unit tests in deploy/monitoring/tests feed
series and expect each alert at its time, and a rule with the wrong budget fails them), the
compose and Kubernetes Prometheus configurations with `promtool check config`, the Kubernetes
copies of the rules, and what the dashboard shows. The dashboard against a real Prometheus:
tests/test_monitoring.py.

Outside CI a missing promtool skips with a reason; under CI=true it fails (.ci/run installs
Debian's `prometheus` package, which ships it).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import yaml

from tests.support.common import ROOT
from tests.support.prometheus import (
    MONITORING,
    RULES,
    engine,
    metric_names,
    panel_queries,
    rule_groups,
    run,
)


def test_the_rules_pass_promtool_check():
    result = run(engine("promtool"), "check", "rules", *map(str, RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULES) >= 2


def test_the_rules_pass_their_promtool_unit_tests():
    result = run(engine("promtool"), "test", "rules", "rules.test.yml", cwd=MONITORING / "tests")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_catch_a_wrong_objective(tmp_path):
    """With a 1 % availability budget instead of 0.1 %, the expected pages do not fire."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    for rule in RULES:
        (tmp_path / "rules" / rule.name).write_text(rule.read_text().replace("* 0.001)", "* 0.01)"))
    shutil.copy(MONITORING / "tests" / "rules.test.yml", tmp_path / "tests")
    result = run(engine("promtool"), "test", "rules", "rules.test.yml", cwd=tmp_path / "tests")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "alertname: MnistServeErrorBudgetBurn," in output, output


def test_every_alert_has_a_severity_a_summary_and_a_description():
    for rule_file in RULES:
        for group in yaml.safe_load(rule_file.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
                    assert rule["annotations"]["summary"] and rule["annotations"]["description"], (
                        rule["alert"]
                    )


def test_the_compose_prometheus_configuration_passes_promtool(tmp_path):
    """deploy/monitoring/prometheus.yml as the image holds it: rules under /etc/prometheus/rules."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "mnist-serve"  # the job the alerts read
    assert job["dns_sd_configs"] == [
        {"names": ["server"], "type": "A", "port": 9100, "refresh_interval": "10s"}
    ]  # every replica
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    config["rule_files"] = [str(MONITORING / "rules" / "*.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = run(engine("promtool"), "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULES)} rule files found" in result.stdout + result.stderr


def test_the_compose_monitoring_profile_runs_prometheus_on_every_replica():
    from tests.support.compose import docker_compose, load_compose, parse_dockerfile

    services = load_compose({})["services"]
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]  # off unless asked for
    assert prometheus["build"]["target"] == "prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert ("prometheus", "/prometheus") in [tuple(v.split(":")[:2]) for v in prometheus["volumes"]]
    # The image holds the configuration and the rules where the command and rule_files look.
    _, stages = parse_dockerfile(ROOT / "Dockerfile")
    (stage,) = [s for s in stages if s.name == "prometheus"]
    copies = stage.all("COPY")
    assert "deploy/monitoring/prometheus.yml /etc/prometheus/prometheus.yml" in copies
    assert "deploy/monitoring/rules/ /etc/prometheus/rules/" in copies
    assert any(c.startswith("--from=prometheus-bin /usr/bin/prometheus") for c in copies)
    assert "USER" in [kind for kind, _ in stage.instructions]  # not root
    # The 9100 that dns_sd scrapes is the servers' --metrics-port.
    command = services["server"]["command"]
    assert command[command.index("--metrics-port") + 1] == "9100"
    env = {k: v for k, v in os.environ.items() if k != "COMPOSE_PROFILES"}
    result = subprocess.run(
        [
            docker_compose(),
            "--profile",
            "monitoring",
            "-f",
            str(ROOT / "docker-compose.yml"),
            "config",
            "-q",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_the_kubernetes_copies_of_the_rules_are_the_rules():
    """The base's rules ConfigMap and the PrometheusRule overlay hold exactly the rules."""
    base = yaml.safe_load((ROOT / "deploy/kubernetes/base/prometheus-rules.yaml").read_text())
    assert {name: yaml.safe_load(text) for name, text in base["data"].items()} == {
        rule.name: yaml.safe_load(rule.read_text()) for rule in RULES
    }, "run python deploy/monitoring/sync_kubernetes.py"
    operator = yaml.safe_load(
        (ROOT / "deploy/kubernetes/overlays/monitoring/prometheusrule.yaml").read_text()
    )
    assert operator["spec"]["groups"] == rule_groups(), (
        "run python deploy/monitoring/sync_kubernetes.py"
    )


def test_the_prometheusrule_overlay_validates_against_the_operators_schema():
    from tests.support.manifests import render, the, validation_errors

    rule = the(render("overlays/monitoring"), "PrometheusRule")
    assert validation_errors(rule) == []
    assert rule["spec"]["groups"] == rule_groups()
    rule["spec"]["groups"][0]["rules"][0]["expression"] = rule["spec"]["groups"][0]["rules"][0].pop(
        "expr"
    )
    assert any("expression" in error or "expr" in error for error in validation_errors(rule))


def test_the_metric_name_reader_finds_only_metrics():
    expr = (
        "histogram_quantile(0.99, sum by (le, model) (rate(mnist_request_latency_seconds_bucket"
        '{method=~"Classify|x"}[5m]))) / on (job) group_left up or vector(1) > bool 0.5'
    )
    assert metric_names(expr) == {"mnist_request_latency_seconds_bucket", "up"}


def test_the_dashboard_covers_what_the_issue_lists():
    names = set().union(*(metric_names(expr) for _, expr in panel_queries()))
    for metric in (
        "mnist_requests_total",
        "mnist_request_latency_seconds_bucket",
        "mnist_queue_wait_seconds_bucket",
        "mnist_batch_size_sum",
        "mnist_inference_seconds_bucket",
        "mnist_queue_depth",
        "mnist_dropped_requests_total",
        "mnist_model_version_loads_total",
        "mnist_model_load_failures_total",
        "mnist_worker_images",
        "up",
    ):
        assert metric in names, f"no panel shows {metric}"
