"""`--workers`: several real server processes on one port, one metrics endpoint, one clean drain."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from core.repository import load_version
from serving.automatic import resolve_automatic_settings as resolve
from serving.config import ServeConfig
from serving.process import free_port, serve_command
from tests.support.workers import child_pids, scrape, wait_for_both_workers, wait_until_gone


@pytest.fixture(scope="module")
def two_workers(trained_repository, tmp_path_factory):
    from serving.process import start_server

    log = tmp_path_factory.mktemp("workers") / "server.log"
    server = start_server(trained_repository, "--workers", "2", log_path=log)
    wait_for_both_workers(server)
    yield server
    server.stop()


def test_both_workers_serve_and_the_metrics_sum_over_them(two_workers, mnist_test_set):
    from serving.client import ClassifierClient

    images, labels = mnist_test_set
    calls, per_call = 24, 3
    correct = 0
    for start in range(0, calls * per_call, per_call):
        # A new client is a new connection; the kernel hands each one to either worker.
        with ClassifierClient(two_workers.target) as client:
            probabilities = client.infer_kserve(images[start : start + per_call])
        correct += int((probabilities.argmax(axis=1) == labels[start : start + per_call]).sum())
    assert correct >= 0.85 * calls * per_call

    samples = scrape(two_workers.metrics_url)
    # Every call's and batch's metrics name the model and version that answered.
    assert (
        samples['mnist_requests_total{code="OK",method="ModelInfer",model="mnist",version="1"}']
        == calls
    )
    assert samples['mnist_images_total{model="mnist",version="1"}'] == calls * per_call
    per_worker = {
        key: value for key, value in samples.items() if key.startswith("mnist_worker_images{")
    }
    workers = child_pids(two_workers.proc.pid)
    assert {int(key.split('pid="')[1].split('"')[0]) for key in per_worker} <= workers
    assert len(per_worker) == 2 and all(value > 0 for value in per_worker.values()), per_worker
    assert sum(per_worker.values()) == calls * per_call
    assert (
        samples['mnist_model_info{model="mnist",provider="CPUExecutionProvider",version="1"}'] == 1
    )
    assert samples['mnist_queue_depth{model="mnist",version="1"}'] == 0
    log = two_workers.log()
    assert "2 workers on 127.0.0.1" in log


def test_sigterm_drains_every_worker_and_exits_0(trained_repository, tmp_path, mnist_test_set):
    from serving.client import ClassifierClient
    from serving.process import start_server

    server = start_server(
        trained_repository,
        "--workers",
        "2",
        "--metrics-port",
        "0",
        log_path=tmp_path / "server.log",
    )
    wait_for_both_workers(server)
    workers = child_pids(server.proc.pid)
    with ClassifierClient(server.target) as client:
        assert client.infer_kserve(mnist_test_set[0][:4]).shape == (4, 10)
    assert server.stop(signal.SIGTERM) == 0
    log = server.log()
    assert "SIGTERM: draining 2 workers" in log
    assert (
        log.count("draining: NOT_SERVING") == 2
        and "[worker 0]: stopped" in log
        and "[worker 1]: stopped" in log
    )
    for pid in workers:  # no orphan left behind (the spawn resource tracker included)
        assert wait_until_gone(pid), f"process {pid} outlived the server"


def test_sigterm_while_the_workers_load_still_exits_0(trained_repository, tmp_path):
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            serve_command(trained_repository, "--workers", "2", port=free_port()),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while "2 workers on" not in log.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()


def test_a_taken_port_is_one_line_before_any_worker_starts(trained_repository):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            serve_command(trained_repository, "--workers", "2", port=port),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"mnist-serve: error: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "is another server running? choose another --port"
    ]


def serve_and_fail(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        serve_command(None, "--workers", "2", *args, port=free_port()),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_missing_model_is_one_line_from_the_parent(tmp_path):
    result = serve_and_fail("--model-repository", str(tmp_path / "empty"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        line
        for line in result.stderr.strip().splitlines()
        if line.startswith("mnist-serve: error: no versions of model")
    ]


def test_a_worker_that_fails_to_start_stops_the_server(trained_repository, tmp_path):
    # A model that passes the repository's checks but that onnxruntime cannot load: only workers find out.
    repository = tmp_path / "repo"
    shutil.copytree(trained_repository / "mnist", repository / "mnist")
    version = load_version(repository, "mnist")
    version.model_path.write_bytes(b"not an onnx model")
    record = json.loads((version.directory / "metadata.json").read_text())
    record["model_sha256"] = hashlib.sha256(b"not an onnx model").hexdigest()
    (version.directory / "metadata.json").write_text(json.dumps(record))
    result = serve_and_fail("--model-repository", str(repository))
    assert result.returncode == 1
    # Not replaced: a fresh worker would fail the same way (status 3: its start-up failed).
    assert "exited with status 3; stopping the others" in result.stderr


def test_automatic_settings_fit_the_machine():
    # Large batches may take every core (only while the other workers idle: inference.activity).
    on_four_cores = resolve(ServeConfig(device="cpu"), cores=4)
    assert (on_four_cores.workers, on_four_cores.intra_op_threads) == (4, 4)
    one_worker = resolve(ServeConfig(device="cpu", workers=1), cores=4)
    assert (one_worker.workers, one_worker.intra_op_threads) == (1, 4)
    two_workers = resolve(ServeConfig(device="cpu", workers=2), cores=5)
    assert (two_workers.workers, two_workers.intra_op_threads) == (2, 5)
    explicit = resolve(ServeConfig(device="cpu", workers=3, intra_op_threads=2), cores=2)
    assert (explicit.workers, explicit.intra_op_threads) == (3, 2)
    with pytest.raises(ValueError, match="--workers cannot be negative"):
        ServeConfig(workers=-1)
    # Explicit model control: a load call would reach one worker only, so one worker, or a clear error.
    assert resolve(ServeConfig(device="cpu", model_control_mode="explicit"), cores=4).workers == 1
    with pytest.raises(ValueError, match="--model-control-mode explicit needs --workers 1"):
        resolve(ServeConfig(device="cpu", model_control_mode="explicit", workers=2), cores=4)


def test_small_and_large_batches_give_the_same_answers(trained_repository, mnist_test_set):
    """Small batches run on the one-thread session, large ones on the threaded one: same model, same answers."""
    from core.contract import to_model_input
    from core.repository import load_version
    from serving.inference.runtime import OnnxRuntimeSession, RuntimeOptions

    model = str(load_version(trained_repository, "mnist").model_path)
    runtime = OnnxRuntimeSession(
        model, RuntimeOptions(device="cpu", intra_op_threads=2, multi_thread_min_batch=16)
    )
    assert "batches under 16 images on 1 thread, larger on 2" in runtime.threading()
    batch = to_model_input(mnist_test_set[0][:64])
    together = runtime.run(batch)
    one_by_one = np.concatenate([runtime.run(batch[i : i + 1]) for i in range(len(batch))])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    assert (
        "one session"
        in OnnxRuntimeSession(model, RuntimeOptions(device="cpu", intra_op_threads=1)).threading()
    )
