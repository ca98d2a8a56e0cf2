"""Servers of their own: device choice, start-up errors, taken ports, flags and environment."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from serving.client import ClassifierClient
from serving.process import start_server
from tests.support.common import ROOT
from tests.support.serving import has_gpu, rpc_error, serve_and_fail


def test_device_cuda_without_a_gpu_stops_with_a_clear_error(trained_repository):
    if has_gpu():
        pytest.skip("this machine has a GPU: test_device_cuda_serves_on_the_gpu runs instead")
    result = serve_and_fail("--model-repository", str(trained_repository), "--device", "cuda")
    assert result.returncode == 1
    assert "--device cuda:" in result.stderr and "Traceback" not in result.stderr


def test_device_cuda_serves_on_the_gpu(trained_repository, mnist_test_set, reference, tmp_path):
    if not has_gpu():
        pytest.skip("no NVIDIA GPU on this machine (the CPU fallback is tested instead)")
    images, _ = mnist_test_set
    with start_server(
        trained_repository, "--device", "cuda", log_path=tmp_path / "gpu.log"
    ) as server:
        with ClassifierClient(server.target) as c:
            assert c.describe().execution_provider == "CUDAExecutionProvider"
            np.testing.assert_allclose(
                c.classify(images[:64]).probabilities, reference(images[:64]), atol=1e-4
            )


def test_start_up_errors_are_one_line(trained_repository, tmp_path):
    missing = serve_and_fail("--model-repository", str(tmp_path / "empty"))
    assert missing.returncode == 1 and "run `mnist-train" in missing.stderr
    # Besides the log line of the configuration, one error line and no traceback.
    assert (
        missing.stderr.strip()
        .splitlines()[-1]
        .startswith("mnist-serve: error: no versions of model")
    )
    assert "Traceback" not in missing.stderr
    unknown = serve_and_fail("--model-repository", str(trained_repository), "--model-version", "42")
    assert unknown.returncode == 1 and "no version 42" in unknown.stderr
    bad_flag = serve_and_fail(
        "--model-repository", str(trained_repository), "--max-batch-size", "0"
    )
    assert bad_flag.returncode == 2 and "--max-batch-size" in bad_flag.stderr


def test_taken_ports_are_one_clear_line(server, trained_repository):
    grpc_taken = serve_and_fail("--model-repository", str(trained_repository), port=server.port)
    assert grpc_taken.returncode == 1 and "Traceback" not in grpc_taken.stderr
    assert (
        grpc_taken.stderr.strip()
        .splitlines()[-1]
        .startswith(f"mnist-serve: error: cannot listen on 127.0.0.1:{server.port}")
    )
    metrics_taken = serve_and_fail(
        "--model-repository",
        str(trained_repository),
        "--host",
        "127.0.0.1",
        "--metrics-port",
        str(server.metrics_port),
    )
    assert metrics_taken.returncode == 1 and "Traceback" not in metrics_taken.stderr
    assert "choose another --metrics-port" in metrics_taken.stderr.strip().splitlines()[-1]


def test_a_tampered_model_file_is_refused(trained_repository, tmp_path):
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(trained_repository, copy)
    model = copy / "mnist" / "1" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-10] + bytes(10))
    result = serve_and_fail("--model-repository", str(copy))
    assert result.returncode == 1 and "does not match metadata.json" in result.stderr


# The command line of test_flags_and_environment_configure_the_server, with the environment that
# it partly overrides (--max-queue-size 7 wins over MNIST_SERVE_MAX_QUEUE_SIZE=3).
FLAG_ARGS = (
    "--model-name",
    "digits",
    "--max-queue-size",
    "7",  # the command line wins
    "--graph-optimization",
    "basic",
    "--intra-op-threads",
    "2",
    "--inter-op-threads",
    "1",
    "--multi-thread-min-batch",
    "8",
    "--warmup-runs",
    "5",
    "--max-message-bytes",
    "65536",
    "--workers",
    "1",
    "--metrics-port",
    "0",
)
FLAG_ENVIRONMENT = {
    "MNIST_SERVE_MAX_BATCH_SIZE": "16",
    "MNIST_SERVE_MAX_QUEUE_DELAY_US": "250",
    "MNIST_SERVE_MAX_QUEUE_SIZE": "3",
    "MNIST_SERVE_GRAPH_OPTIMIZATION": "extended",
}
LOGGED_SETTINGS = (
    "max_batch_size=16",
    "max_queue_delay_us=250",
    "max_queue_size=7",
    "graph_optimization=basic",
    "intra_op_threads=2",
    "warmup_runs=5",
    "max_message_bytes=65536",
)


def digits_repository(trained_repository, tmp_path):
    """The same model published under another name, for --model-name."""
    import shutil

    repository = tmp_path / "repo"
    shutil.copytree(trained_repository / "mnist", repository / "digits")
    config = repository / "digits" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "mnist"', 'name: "digits"'))
    return repository


def check_the_configured_server(server, images, reference) -> None:
    with pytest.raises(urllib.error.URLError):  # --metrics-port 0: no Prometheus endpoint at all
        urllib.request.urlopen(server.metrics_url, timeout=5)
    with ClassifierClient(server.target) as c:
        description = c.describe()
        assert (description.model_name, description.max_batch_size) == ("digits", 16)
        # 16 images: the two-thread session; 2 images: the one-thread one. Both compute what
        # onnxruntime does.
        for count in (16, 2):
            np.testing.assert_allclose(
                c.classify(images[:count]).probabilities, reference(images[:count]), atol=1e-5
            )
        # --max-message-bytes 65536: 16 float images (50 kB) pass, 32 (100 kB) are refused.
        floats = images[:32].astype(np.float32) / 255
        assert c.classify(floats[:16]).labels.shape == (16,)
        error = rpc_error(lambda: c.classify(floats[:32]))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert (
            rpc_error(lambda: c.classify(images[:1], model_name="mnist")).code()
            == grpc.StatusCode.NOT_FOUND
        )


def test_flags_and_environment_configure_the_server(
    trained_repository, mnist_test_set, reference, tmp_path
):
    images, _ = mnist_test_set
    with start_server(
        digits_repository(trained_repository, tmp_path),
        *FLAG_ARGS,
        log_path=tmp_path / "flags.log",
        env=FLAG_ENVIRONMENT,
    ) as server:
        check_the_configured_server(server, images, reference)
    log = server.log()
    for setting in LOGGED_SETTINGS:
        assert setting in log, setting
    assert "batches under 8 images on 1 thread, larger on 2" in log
    assert "metrics on :off" in log


FLAGS_TO_ONNXRUNTIME = """
import onnxruntime as ort
from serving.config import load_config
from serving.inference.runtime import _session_options
from serving.server import registry_options

config = load_config(["--graph-optimization", "disable", "--intra-op-threads", "3", "--inter-op-threads", "2",
                      "--warmup-runs", "9"], environ={"MNIST_SERVE_INTRA_OP_THREADS": "5"})
runtime = registry_options(config).runtime
assert (runtime.intra_op_threads, runtime.inter_op_threads, runtime.warmup_runs) == (3, 2, 9), runtime
settings = _session_options(runtime)
assert settings.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
assert (settings.intra_op_num_threads, settings.inter_op_num_threads) == (3, 2)
for flag, level in (("basic", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
                    ("extended", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
                    ("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)):
    options = registry_options(load_config(["--graph-optimization", flag], environ={})).runtime
    assert _session_options(options).graph_optimization_level == level, flag
print("flags reach onnxruntime")
"""


def test_graph_optimization_and_threads_reach_onnxruntime():
    """The flags' path from the command line to onnxruntime's session options (in a child interpreter:
    serving.server loads the project's KServe stubs, which clash with tritonclient's in this one)."""
    result = subprocess.run(
        [sys.executable, "-c", FLAGS_TO_ONNXRUNTIME],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0 and "flags reach onnxruntime" in result.stdout, result.stderr[
        -3000:
    ]
