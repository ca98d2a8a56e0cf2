"""deploy/monitoring read as the monitoring tests need it: the rules and the dashboard's queries,
the metric names a PromQL expression selects, a real Prometheus's HTTP API, and a server's own
/metrics samples."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.common import ROOT

MONITORING = ROOT / "deploy" / "monitoring"
RULES = sorted((MONITORING / "rules").glob("*.yml"))
DASHBOARD = MONITORING / "grafana-dashboard.json"
RATE_INTERVAL = "15s"  # what Grafana's $__rate_interval stands for here (scrapes every 1 s)
# Dashboard variables as "All" selects them (their allValue).
VARIABLES = {"$__rate_interval": RATE_INTERVAL, "$model": ".*", "$version": ".*"}
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def engine(name: str) -> str:
    found = shutil.which(name) or (
        f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None
    )
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing, and CI must run it (Debian's prometheus package)")
        pytest.skip(
            f"{name} is not installed (apt-get install prometheus; CI=true makes this a failure)"
        )
    return found


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)


def rule_groups() -> list[dict]:
    return [
        group for rule_file in RULES for group in yaml.safe_load(rule_file.read_text())["groups"]
    ]


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' panels included."""
    found = []

    def visit(panels):
        for panel in panels:
            visit(panel.get("panels", []))
            for target in panel.get("targets", []):
                found.append((panel["title"], target["expr"]))

    visit(json.loads(DASHBOARD.read_text())["panels"])
    return found


def with_variables(expr: str) -> str:
    for name, value in sorted(VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a dashboard variable this test does not know: {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, keywords or labels)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][\w:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group() in PROMQL_WORDS:
            continue  # a function, or a keyword
        names.add(match.group())
    return names


def recorded_names() -> set[str]:
    return {
        rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule
    }


def exported_names(metrics_text: str) -> set[str]:
    """Every sample name the server's /metrics shows (counters' _total, histograms' parts)."""
    return {
        line.split("{")[0].split(" ")[0]
        for line in metrics_text.splitlines()
        if line and not line.startswith("#")
    }


def query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    answer = json.loads(urllib.request.urlopen(url, timeout=30).read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def series(metrics_url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted labels: value} of every sample called `name`."""
    found = {}
    for line in urllib.request.urlopen(metrics_url, timeout=10).read().decode().splitlines():
        match = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
        if match:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(1) or "")))
            found[labels] = float(match.group(2))
    return found
