"""The Locust load tests: a short real run, a fast failure when no server listens, the batching study."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
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
from tests.support.common import ROOT


def run_module(
    module: str, *args: str, mnist_path: Path, timeout: float
) -> subprocess.CompletedProcess:
    env = {**os.environ, "MNIST_DATA_DIR": str(mnist_path)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


# --- a short real Locust run against the session's server --------------------------------------


@pytest.mark.timeout(400)  # the session's model is trained first; the machine is loaded
def test_mix_run_exercises_every_scenario_without_failures(server, mnist_path, tmp_path):
    result = run_module(
        "loadtest.run",
        "--host",
        server.target,
        "--scenario",
        "mix",
        "--users",
        "4",
        "--spawn-rate",
        "4",
        "--run-time",
        "4s",
        "--pool-size",
        "500",
        "--metrics-url",
        server.metrics_url,
        "--ceiling-run-time",
        "3s",
        "--reports-dir",
        str(tmp_path),
        "--name",
        "mix",
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


# --- the batching study, very briefly --------------------------------------------------------


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


# --- the pieces --------------------------------------------------------------------------------


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


# --- whole runs that must fail, and run.py's own server -------------------------------------------


def failures_csv(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def always_three(trained_repository: Path, destination: Path) -> Path:
    """A copy of the trained model whose final bias makes it answer 3 for every image."""
    import onnx
    from onnx import numpy_helper

    from core.repository import sha256_of

    shutil.copytree(trained_repository, destination)
    version = destination / "mnist" / "1"
    model = onnx.load(version / "model.onnx")
    bias = next(t for t in model.graph.initializer if list(t.dims) == [10])
    values = numpy_helper.to_array(bias).copy()
    values[3] += 1000.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, version / "model.onnx")
    metadata = json.loads((version / "metadata.json").read_text())
    metadata["model_sha256"] = sha256_of(version / "model.onnx")
    (version / "metadata.json").write_text(json.dumps(metadata))
    return destination


@pytest.mark.timeout(200)
def test_wrong_answers_under_load_are_locust_failures_and_exit_1(
    server, trained_repository, mnist_path, tmp_path
):
    """Two replicas that disagree: the pool is screened over both, so under load some digits reach the
    replica that reads every digit as 3. Those answers must be failures in the CSV, and run.py exits 1."""
    from serving.process import start_server

    with start_server(
        always_three(trained_repository, tmp_path / "bad"),
        "--workers",
        "1",
        log_path=tmp_path / "bad.log",
    ) as bad:
        result = run_module(
            "loadtest.run",
            "--host",
            f"ipv4:127.0.0.1:{server.port},127.0.0.1:{bad.port}",
            "--scenario",
            "single",
            "--users",
            "2",
            "--spawn-rate",
            "2",
            "--run-time",
            "3s",
            "--pool-size",
            "300",
            "--reports-dir",
            str(tmp_path),
            "--name",
            "wrong",
            "--ceiling-run-time",
            "0",
            mnist_path=mnist_path,
            timeout=150,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    total = read_stats_csv(tmp_path / "wrong_stats.csv")["Aggregated"]
    assert (
        total.failures > 0 and total.requests > total.failures
    )  # the good replica still answers right
    assert "wrong prediction under load" in failures_csv(tmp_path / "wrong_failures.csv")
    assert "FAILED:" in result.stderr and "calls failed" in result.stderr


@pytest.mark.timeout(200)
def test_a_server_killed_mid_run_gives_failures_and_exit_1(
    trained_repository, mnist_path, tmp_path
):
    from serving.process import start_server

    server = start_server(trained_repository, "--workers", "1", log_path=tmp_path / "server.log")
    try:
        env = {**os.environ, "MNIST_DATA_DIR": str(mnist_path)}
        run = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loadtest.run",
                "--host",
                server.target,
                "--scenario",
                "single",
                "--users",
                "2",
                "--spawn-rate",
                "2",
                "--run-time",
                "8s",
                "--pool-size",
                "200",
                "--reports-dir",
                str(tmp_path),
                "--name",
                "killed",
                "--ceiling-run-time",
                "0",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        log = tmp_path / "killed.log"
        deadline = time.monotonic() + 120
        # Once the pool is screened, the load is on: kill the server under it.
        while "load pool:" not in (log.read_text() if log.exists() else ""):
            assert run.poll() is None and time.monotonic() < deadline, "the load never started"
            time.sleep(0.05)
        server.proc.kill()
        stdout, stderr = run.communicate(timeout=150)
    finally:
        server.stop(signal.SIGKILL)
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1, stdout + stderr
    total = read_stats_csv(tmp_path / "killed_stats.csv")["Aggregated"]
    assert total.failures > 0
    assert "UNAVAILABLE" in failures_csv(tmp_path / "killed_failures.csv")


@pytest.mark.timeout(200)
def test_run_starts_its_own_server_and_spreads_locust_over_processes(
    trained_repository, mnist_path, tmp_path
):
    result = run_module(
        "loadtest.run",
        "--model-repository",
        str(trained_repository),
        "--server-args",
        "--workers 1",
        "--scenario",
        "single",
        "--users",
        "4",
        "--spawn-rate",
        "4",
        "--run-time",
        "10s",
        "--pool-size",
        "200",
        "--processes",
        "2",
        "--reports-dir",
        str(tmp_path),
        "--name",
        "own",
        "--ceiling-run-time",
        "3s",
        mnist_path=mnist_path,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mnist-serve on 127.0.0.1:" in result.stdout and "on 2 Locust processes" in result.stdout
    server_log = (tmp_path / "own-server.log").read_text()
    assert (
        "serving mnist 1" in server_log and "stopped" in server_log
    )  # started, then stopped by run.py
    total = read_stats_csv(tmp_path / "own_stats.csv")["Aggregated"]
    assert total.requests > 0 and total.failures == 0
    log = (tmp_path / "own.log").read_text()
    assert log.count("load pool:") >= 2, "each of the 2 worker processes screens its own pool"
    # Its own server's /metrics give the server's view; the ceiling ran on the same 2 processes.
    assert "the server's own view of the same window" in result.stdout, result.stdout
    assert read_stats_csv(tmp_path / "own-ceiling_stats.csv")["Aggregated"].requests > 0
