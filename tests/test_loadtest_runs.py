"""The Locust load tests, really run: a short mix run against the session's server, a fast
failure when no server listens, the batching study very briefly."""

from __future__ import annotations

import csv
import re

import pytest

from loadtest.locust_args import request_names
from loadtest.locust_report import read_stats_csv
from loadtest.options import DEFAULTS
from tests.support.loadtest_runs import locust_args, run_module


@pytest.mark.timeout(400)  # the session's model is trained first; the machine is loaded
def test_mix_run_exercises_every_scenario_without_failures(server, mnist_path, tmp_path):
    result = run_module(
        "loadtest.run",
        "--host",
        server.target,
        *locust_args("mix", 4, "4s", 500, tmp_path, "mix"),
        *("--metrics-url", server.metrics_url, "--ceiling-run-time", "3s"),
        mnist_path=mnist_path,
        timeout=300,
    )
    assert result.returncode == 0, (
        result.stdout + result.stderr + (tmp_path / "mix.log").read_text()
    )

    stats = read_stats_csv(tmp_path / "mix_stats.csv")
    total = stats["Aggregated"]
    assert total.requests > 0 and total.failures == 0
    for name in request_names(
        "mix", DEFAULTS.images_per_call
    ):  # Classify x1, Classify x16, KServe ModelInfer x1
        assert name in stats, f"no {name!r} row in the stats CSV: {sorted(stats)}"
        assert stats[name].requests > 0 and stats[name].failures == 0
    assert (tmp_path / "mix.html").stat().st_size > 0
    assert "requests/s" in result.stdout and "p99" in result.stdout
    log = (tmp_path / "mix.log").read_text()
    assert "load pool:" in log  # screened against the idle server before the load

    # The server's own view of the same window, from its /metrics, beside Locust's.
    assert "the server's own view of the same window" in result.stdout, result.stdout
    served = re.search(r"^all\s+(\d+)\s+([\d.]+)\s+([\d.]+)", result.stdout, re.M)
    assert served, result.stdout
    assert abs(int(served.group(1)) - total.requests) <= 0.05 * total.requests + 50, result.stdout
    for method in ("Classify", "ModelInfer"):
        assert re.search(rf"^{method}\s+\d+", result.stdout, re.M), result.stdout
    assert "images and" in result.stdout and "requests per batch" in result.stdout
    assert float(served.group(3)) < total.p99_ms  # the core's median is under Locust's p99
    # The load generator's ceiling, measured in the same run against a server with no model.
    ceiling = read_stats_csv(tmp_path / "mix-ceiling_stats.csv")["Aggregated"]
    assert ceiling.requests > 0 and ceiling.failures == 0  # the canned server's 7s judged right
    assert "load generator's ceiling" in result.stdout
    assert ("BOUND BY THE LOAD GENERATOR" in result.stdout) != (
        "bound by the server" in result.stdout
    )


@pytest.mark.timeout(60)
def test_unreachable_server_fails_fast_with_one_line(mnist_path, tmp_path):
    from serving.process import free_port

    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = run_module(
        "loadtest.run",
        "--host",
        target,
        "--connect-timeout",
        "2",
        "--reports-dir",
        str(tmp_path),
        mnist_path=mnist_path,
        timeout=45,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and target in lines[0] and "not SERVING" in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "loadtest_stats.csv").exists()  # Locust never started


@pytest.mark.timeout(150)
def test_batching_study_writes_table_and_chart(trained_repository, mnist_path, tmp_path):
    result = run_module(
        "loadtest.batching_study",
        "--model-repository",
        str(trained_repository),
        "--users",
        "1,4",
        "--run-time",
        "3s",
        "--pool-size",
        "300",
        "--reports-dir",
        str(tmp_path),
        mnist_path=mnist_path,
        timeout=140,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    png = tmp_path / "batching_study.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "batching_study.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(int(r["max_batch_size"]), int(r["users"])) for r in rows} == {
        (1, 1),
        (1, 4),
        (64, 1),
        (64, 4),
    }
    for row in rows:
        assert float(row["requests_per_s"]) > 0 and int(row["failures"]) == 0
        assert row["mean_batch_images"], f"no batch figure scraped from the server's metrics: {row}"
        if int(row["max_batch_size"]) == 1:
            assert float(row["mean_batch_images"]) == 1.0  # batching off really is off
    table = (tmp_path / "batching_study.md").read_text()
    assert table.count("| off (max batch 1) |") == 2 and table.count("| on (max batch 64) |") == 2
    assert "| batching | users | requests/s |" in result.stdout  # the table is printed too
