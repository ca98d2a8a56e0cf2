"""The load tests' pieces: the verdict on a wrong prediction, default processes, Prometheus's own
histogram quantile, the stats CSV, option parsing and the scripts' defaults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loadtest.locust_args import (
    LoadTestError,
    normalize_target,
    parse_mix_weights,
    parse_seconds,
    request_names,
)
from loadtest.locust_report import read_stats_csv
from loadtest.options import DEFAULTS


def test_wrong_prediction_is_a_failure(tmp_path):
    """The locustfile's correctness check (run in a child: importing Locust monkey-patches gevent)."""
    code = (
        "import numpy as np, loadtest.locustfile as lf\n"
        "assert lf._check('Classify x2', np.array([3, 5]), np.array([3, 5])) is None\n"
        "error = lf._check('Classify x2', np.array([3, 4]), np.array([3, 5]))\n"
        "assert isinstance(error, lf.WrongPrediction), error\n"
        "assert 'wrong prediction under load' in str(error) and 'Classify x2' in str(error)\n"
        "short = lf._check('Classify x2', np.array([3]), np.array([3, 5]))\n"
        "assert isinstance(short, lf.WrongPrediction) and 'Classify x2' in str(short), short\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_verdict_and_default_processes():
    from loadtest.ceiling import ceiling_scenario, verdict
    from loadtest.run import default_processes

    assert "BOUND BY THE LOAD GENERATOR" in verdict(900, 1000) and "1,000.0" in verdict(900, 1000)
    assert "bound by the server" in verdict(400, 1000) and "40 %" in verdict(400, 1000)
    assert (default_processes(2), default_processes(3), default_processes(8)) == (None, None, 4)
    assert ceiling_scenario("mix", "6,3,1,2") == ("mix", "6,3,1")  # no REST on the canned server
    assert ceiling_scenario("rest", "6,3,1") is None and ceiling_scenario("mix", "0,0,0,1") is None


def test_histogram_quantile_is_prometheus_own():
    from loadtest.server_view import histogram_quantile

    buckets = [(0.001, 10.0), (0.002, 30.0), (0.004, 40.0), (float("inf"), 40.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(
        0.0015
    )  # rank 20: halfway in (1, 2] ms
    assert histogram_quantile(0.625, buckets) == pytest.approx(0.00175)
    assert histogram_quantile(1.0, buckets) == pytest.approx(0.004)
    assert histogram_quantile(0.5, [(float("inf"), 0.0)]) != histogram_quantile(
        0.5, [(float("inf"), 0.0)]
    )


def test_stats_csv_aggregated_row(tmp_path):
    path = tmp_path / "x_stats.csv"
    path.write_text(
        "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
        "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,"
        "99.99%,100%\n"
        "grpc,Classify x1,100,2,3,3.5,1,40,60,50.5,1.0,3,4,4,5,6,8,12,20,40,40,40\n"
        ",Aggregated,100,2,3,3.5,1,40,60,50.5,1.0,3,4,4,5,6,8,12,20,40,40,40\n"
    )
    stats = read_stats_csv(path)
    total = stats["Aggregated"]
    assert (total.requests, total.failures, total.requests_per_s) == (100, 2, 50.5)
    assert (total.p50_ms, total.p95_ms, total.p99_ms) == (3, 8, 20)
    assert total.failure_ratio == pytest.approx(0.02)
    with pytest.raises(LoadTestError):
        read_stats_csv(tmp_path / "missing_stats.csv")


def test_option_parsing():
    assert normalize_target("grpc://127.0.0.1:8500") == "127.0.0.1:8500"
    assert normalize_target("localhost:8500") == "localhost:8500"
    for bad in ("http://localhost:8500", "localhost", ""):
        with pytest.raises(LoadTestError):
            normalize_target(bad)
    assert parse_seconds("60s") == 60 and parse_seconds("1m30s") == 90 and parse_seconds("15") == 15
    assert parse_mix_weights("6,3,1") == (6, 3, 1)
    for bad in ("6,3", "a,b,c", "0,0,0", "-1,2,3"):
        with pytest.raises(LoadTestError):
            parse_mix_weights(bad)
    assert request_names("batch", 8) == ["Classify x8"]


def test_every_script_takes_its_defaults_from_one_place():
    from loadtest import batching_study, run

    loadtest_args = run.parse_args(["--host", "127.0.0.1:8500"])
    study_args = batching_study.parse_args([])
    for args in (loadtest_args, study_args):
        assert (args.images_per_call, args.pool_size, args.mix_weights) == (
            DEFAULTS.images_per_call,
            DEFAULTS.pool_size,
            DEFAULTS.mix_weights_text,
        )
    assert (loadtest_args.users, loadtest_args.run_time, loadtest_args.scenario) == (
        DEFAULTS.users,
        DEFAULTS.run_time,
        DEFAULTS.scenario,
    )
