"""Shared fixtures: the real MNIST files, a small model trained for the tests, a running server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.common import mnist_dir
from tests.support.quick_model import quick_model

# Fixtures shared by several test modules (the reference model, clients): defined beside their
# helpers in tests/support/, offered to every module from here.
pytest_plugins = [
    "tests.support.digits",
    "tests.support.lifecycle",
    "tests.support.secured",
    "tests.support.serving",
    "tests.support.tracing",
]

# tritonclient and serving/generated/grpc_predict_v2_pb2 define the same `inference.*` protobuf
# symbols, and whichever file registers first makes the other fail to import. ClassifierClient's
# KServe calls use whichever is registered (the wire format is the same), so tritonclient's are
# registered here, before any test can make the client load ours into this process.
try:
    import tritonclient.grpc  # noqa: F401
except ImportError:  # tests that need it say so themselves
    pass

# Test tiers, assigned here by module from this one table (a test module never marks itself):
#   unit         no server, no network: seconds        `pytest -m unit`
#   integration  real servers on loopback (the default for a module not named below)
#   system       real engines outside Python: containers, compose, a browser, kubectl, swarm
# `make test-fast` runs `-m fast`: the unit tier plus FAST_INTEGRATION, which share the session's
# one trained model and one server; `make test` (CI) runs every tier.
TIERS = {
    "unit": {
        "test_architecture",
        "test_batch_parallel",
        "test_batcher",
        "test_core",
        "test_decode_images",
        "test_decode_kserve",
        "test_decode_pixels",
        "test_docs",
        "test_lint",
        "test_proto_stubs",
        "test_security",
    },
    "system": {
        "test_images",
        "test_container_serving",
        "test_compose_tls_stack",
        "test_compose",
        "test_compose_tls",
        "test_compose_tls_loopback",
        "test_page",
        "test_manifests",
        "test_manifest_overlays",
        "test_swarm",
        "test_swarm_stack_files",
        "test_model_sync",
        "test_memory_limit",
        "test_monitoring",
        "test_monitoring_rules",
        "test_monitoring_labels",
    },
}
FAST_INTEGRATION = {"test_grpc_classify", "test_kserve_grpc", "test_predict_cli"}


def tier_of(module: str) -> str:
    return next((tier for tier, modules in TIERS.items() if module in modules), "integration")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        tier = tier_of(item.path.stem)
        item.add_marker(getattr(pytest.mark, tier))
        if tier == "unit" or item.path.stem in FAST_INTEGRATION:
            item.add_marker(pytest.mark.fast)


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
    """A model repository holding one small but competent model (tests/support/quick_model.py)."""
    return quick_model(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def server(trained_repository, tmp_path_factory):
    """One real `mnist-serve` process on loopback for the whole session (CPU provider)."""
    from serving.process import start_server

    log = tmp_path_factory.mktemp("server") / "server.log"
    with start_server(
        trained_repository, "--device", "auto", "--max-batch-size", "64", log_path=log
    ) as running:
        yield running


@pytest.fixture(scope="session")
def images():
    """The project's images, each target built once per session from a clean checkout of HEAD
    (tests/support/images.py); skips (fails under CI=true) when no Docker engine answers."""
    from tests.support.images import session_images

    with session_images() as built:
        yield built
