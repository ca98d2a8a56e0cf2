"""The Locust load tests: a short real run, a fast failure when no server listens, the batching study."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.locust_runner import (
    LoadTestError,
    normalize_target,
    parse_mix_weights,
    parse_seconds,
    read_stats_csv,
    request_names,
)
from loadtest.options import DEFAULTS
from tests.conftest import ROOT


def run_module(module: str, *args: str, mnist_path: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "MNIST_DATA_DIR": str(mnist_path)}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


# --- a short real Locust run against the session's server --------------------------------------

@pytest.mark.timeout(120)
def test_mix_run_exercises_every_scenario_without_failures(server, mnist_path, tmp_path):
    result = run_module("loadtest.run", "--host", server.target, "--scenario", "mix", "--users", "4",
                        "--spawn-rate", "4", "--run-time", "4s", "--pool-size", "500",
                        "--reports-dir", str(tmp_path), "--name", "mix", mnist_path=mnist_path, timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr + (tmp_path / "mix.log").read_text()

    stats = read_stats_csv(tmp_path / "mix_stats.csv")
    total = stats["Aggregated"]
    assert total.requests > 0 and total.failures == 0
    for name in request_names("mix", DEFAULTS.images_per_call):  # Classify x1, Classify x16, KServe ModelInfer x1
        assert name in stats, f"no {name!r} row in the stats CSV: {sorted(stats)}"
        assert stats[name].requests > 0 and stats[name].failures == 0
    assert (tmp_path / "mix.html").stat().st_size > 0
    assert "requests/s" in result.stdout and "p99" in result.stdout
    log = (tmp_path / "mix.log").read_text()
    assert "load pool:" in log  # screened against the idle server before the load


@pytest.mark.timeout(60)
def test_unreachable_server_fails_fast_with_one_line(mnist_path, tmp_path):
    from serving.process import free_port

    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = run_module("loadtest.run", "--host", target, "--connect-timeout", "2", "--reports-dir", str(tmp_path),
                        mnist_path=mnist_path, timeout=45)
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    assert elapsed < 15, f"took {elapsed:.1f} s"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and target in lines[0] and "not SERVING" in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "loadtest_stats.csv").exists()  # Locust never started


# --- the batching study, very briefly --------------------------------------------------------

@pytest.mark.timeout(150)
def test_batching_study_writes_table_and_chart(trained_repository, mnist_path, tmp_path):
    result = run_module("loadtest.batching_study", "--model-repository", str(trained_repository), "--users", "1,4",
                        "--run-time", "3s", "--pool-size", "300", "--reports-dir", str(tmp_path),
                        mnist_path=mnist_path, timeout=140)
    assert result.returncode == 0, result.stdout + result.stderr

    png = tmp_path / "batching_study.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "batching_study.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(int(r["max_batch_size"]), int(r["users"])) for r in rows} == {(1, 1), (1, 4), (64, 1), (64, 4)}
    for row in rows:
        assert float(row["requests_per_s"]) > 0 and int(row["failures"]) == 0
        if int(row["max_batch_size"]) == 1 and row["mean_batch_images"]:
            assert float(row["mean_batch_images"]) == pytest.approx(1.0)  # batching off really is off
    table = (tmp_path / "batching_study.md").read_text()
    assert table.count("| off (max batch 1) |") == 2 and table.count("| on (max batch 64) |") == 2
    assert "| batching | users | requests/s |" in result.stdout  # the table is printed too


# --- the pieces --------------------------------------------------------------------------------

def test_wrong_prediction_is_a_failure(tmp_path):
    """The locustfile's correctness check (run in a child: importing Locust monkey-patches gevent)."""
    code = (
        "import numpy as np, loadtest.locustfile as lf\n"
        "assert lf._check('Classify x2', np.array([3, 5]), np.array([3, 5])) is None\n"
        "error = lf._check('Classify x2', np.array([3, 4]), np.array([3, 5]))\n"
        "assert isinstance(error, lf.WrongPrediction), error\n"
        "assert 'wrong prediction under load' in str(error) and 'Classify x2' in str(error)\n"
        "assert lf._check('Classify x2', np.array([3]), np.array([3, 5])) is not None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr


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
            DEFAULTS.images_per_call, DEFAULTS.pool_size, DEFAULTS.mix_weights_text)
    assert (loadtest_args.users, loadtest_args.run_time, loadtest_args.scenario) == (
        DEFAULTS.users, DEFAULTS.run_time, DEFAULTS.scenario)
