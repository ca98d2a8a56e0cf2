"""Whole load-test runs that must fail (wrong answers under load, a server killed mid-run), and
run.py starting its own server and spreading Locust over processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.locust_report import read_stats_csv
from tests.support.common import ROOT
from tests.support.loadtest_runs import locust_args, run_module


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
            *locust_args("single", 2, "3s", 300, tmp_path, "wrong"),
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
                *(sys.executable, "-m", "loadtest.run", "--host", server.target),
                *locust_args("single", 2, "8s", 200, tmp_path, "killed"),
                *("--ceiling-run-time", "0"),
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
        *locust_args("single", 4, "10s", 200, tmp_path, "own"),
        *("--processes", "2"),
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
