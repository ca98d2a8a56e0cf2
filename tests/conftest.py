"""Shared fixtures: the real MNIST files, a small model trained for the tests, a running server."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.common import QUICK_TRAIN_ARGS, ROOT, mnist_dir, run_train  # noqa: F401 (ROOT: older imports)

# tritonclient and serving/generated/grpc_predict_v2_pb2 define the same `inference.*` protobuf
# symbols, and whichever file registers first makes the other fail to import. ClassifierClient's
# KServe calls use whichever is registered (the wire format is the same), so tritonclient's are
# registered here, before any test can make the client load ours into this process.
try:
    import tritonclient.grpc  # noqa: F401
except ImportError:  # tests that need it say so themselves
    pass


@pytest.fixture(scope="session")
def mnist_path() -> Path:
    return mnist_dir()


@pytest.fixture(scope="session")
def mnist_test_set(mnist_path) -> tuple[np.ndarray, np.ndarray]:
    """The real 10,000 MNIST test images (uint8 [N,28,28]) and labels."""
    from core.idx import load_idx_dir

    data = load_idx_dir(mnist_path)
    return data.test_images, data.test_labels


@pytest.fixture(scope="session")
def trained_repository(tmp_path_factory) -> Path:
    """A model repository holding one small but competent model, trained once per session."""
    root = tmp_path_factory.mktemp("trained")
    result = run_train(*QUICK_TRAIN_ARGS, "--out", str(root / "model_repository"),
                       "--artifacts", str(root / "artifacts"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "model_repository"


@pytest.fixture(scope="session")
def server(trained_repository, tmp_path_factory):
    """One real `mnist-serve` process on loopback for the whole session (CPU provider)."""
    from serving.process import start_server

    log = tmp_path_factory.mktemp("server") / "server.log"
    with start_server(trained_repository, "--device", "auto", "--max-batch-size", "64",
                      log_path=log) as running:
        yield running
