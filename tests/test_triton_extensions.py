"""Triton's gRPC extensions through NVIDIA's own client (tritonclient), checked against the files.

ModelConfig against config.pbtxt, ModelStatistics against the calls made, RepositoryIndex against
the repository's folders, RepositoryModelLoad/Unload in explicit mode (and refused otherwise, in
Triton's words), ServerMetadata's extensions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tritonclient_grpc  # noqa: E402  (a dev dependency: its absence fails)
from tritonclient.utils import InferenceServerException  # noqa: E402

from serving.process import start_server
from tests.support.lifecycle import Reference

SERVER_ARGS = ("--workers", "1")


@pytest.fixture(scope="module")
def repository(trained_repository, tmp_path_factory) -> Path:
    """The trained repository as training wrote it: `mnist` and `mnist_int8`, version 1 each."""
    copy = tmp_path_factory.mktemp("triton") / "repository"
    shutil.copytree(trained_repository, copy)
    return copy


@pytest.fixture(scope="module")
def polling_server(repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton-log") / "server.log"
    with start_server(repository, *SERVER_ARGS, log_path=log) as server:
        yield server


def infer(client, images: np.ndarray, model: str = "mnist", version: str = ""):
    tensor = tritonclient_grpc.InferInput("images", [len(images), 28, 28, 1], "UINT8")
    tensor.set_data_from_numpy(images.reshape(-1, 28, 28, 1).astype(np.uint8))
    return client.infer(model, [tensor], model_version=version)


def test_server_metadata_lists_the_extensions(polling_server):
    client = tritonclient_grpc.InferenceServerClient(polling_server.target)
    extensions = set(client.get_server_metadata().extensions)
    assert {"model_repository", "model_configuration", "statistics"} <= extensions


def test_model_config_is_the_config_pbtxt(polling_server, repository):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    client = tritonclient_grpc.InferenceServerClient(polling_server.target)
    config = client.get_model_config("mnist").config
    on_disk = text_format.Parse(
        (repository / "mnist" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.name == on_disk.name == "mnist"
    assert config.platform == on_disk.platform == "onnxruntime_onnx"
    assert config.max_batch_size == on_disk.max_batch_size == 64
    assert (
        [(t.name, t.data_type, list(t.dims)) for t in config.input]
        == [(t.name, t.data_type, list(t.dims)) for t in on_disk.input]
        == [("images", model_config_pb2.TYPE_FP32, [28, 28, 1])]
    )
    assert [(t.name, list(t.dims)) for t in config.output] == [
        (t.name, list(t.dims)) for t in on_disk.output
    ]
    assert config.HasField("dynamic_batching")
    assert config.version_policy.latest.num_versions == 1  # Triton's default, filled in
    as_json = client.get_model_config("mnist_int8", as_json=True)
    assert as_json["config"]["name"] == "mnist_int8"
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_config("resnet")


def test_model_statistics_count_the_calls(polling_server, mnist_test_set):
    images, _ = mnist_test_set
    client = tritonclient_grpc.InferenceServerClient(polling_server.target)
    before = client.get_inference_statistics("mnist_int8", "1").model_stats[0]
    sizes = [1, 3, 8, 5]
    for size in sizes:
        infer(client, images[:size], "mnist_int8")
    after = client.get_inference_statistics("mnist_int8", "1").model_stats[0]
    assert (after.name, after.version) == ("mnist_int8", "1")
    assert after.inference_count - before.inference_count == sum(sizes)
    assert 1 <= after.execution_count - before.execution_count <= len(sizes)
    stats, old = after.inference_stats, before.inference_stats
    assert (
        stats.success.count - old.success.count == len(sizes) and stats.success.ns > old.success.ns
    )
    assert stats.fail.count == old.fail.count
    for name in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(stats, name).count - getattr(old, name).count == len(sizes), name
    assert stats.compute_infer.ns > old.compute_infer.ns
    assert after.last_inference >= before.last_inference > 0 or before.last_inference == 0
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count
    everything = client.get_inference_statistics()  # every model, every ready version
    assert {(s.name, s.version) for s in everything.model_stats} == {
        ("mnist", "1"),
        ("mnist_int8", "1"),
    }


def test_repository_index_lists_the_folders(polling_server, repository):
    client = tritonclient_grpc.InferenceServerClient(polling_server.target)
    index = client.get_model_repository_index()
    on_disk = sorted(p.name for p in repository.iterdir() if p.is_dir())
    assert sorted((m.name, m.version, m.state) for m in index.models) == [
        (name, "1", "READY") for name in on_disk
    ]


def test_load_and_unload_are_refused_in_poll_mode_in_tritons_words(polling_server):
    client = tritonclient_grpc.InferenceServerClient(polling_server.target)
    for action in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as refused:
            action("mnist")
        assert "StatusCode.UNAVAILABLE" in str(refused.value)
        assert "explicit model load / unload is not allowed if polling is enabled" in str(
            refused.value
        )
    assert client.is_model_ready("mnist")


def test_explicit_mode_loads_and_unloads_on_request(repository, mnist_test_set, tmp_path):
    images, _ = mnist_test_set
    reference = Reference()
    with start_server(
        repository,
        *SERVER_ARGS,
        "--model-control-mode",
        "explicit",
        "--model-name",
        "mnist",
        log_path=tmp_path / "server.log",
    ) as server:
        client = tritonclient_grpc.InferenceServerClient(server.target)
        assert client.is_model_ready("mnist") and not client.is_model_ready("mnist_int8")
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert index["mnist"].state == "READY" and index["mnist_int8"].state == ""

        with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT.*not supported"):
            client.load_model(
                "mnist_int8", config='{"max_batch_size": 8}'
            )  # Triton's config override
        client.load_model("mnist_int8")
        assert client.is_model_ready("mnist_int8", "1")
        result = infer(client, images[:16], "mnist_int8")
        assert result.get_response().model_name == "mnist_int8"
        np.testing.assert_allclose(
            result.as_numpy("probabilities"),
            reference(repository / "mnist_int8" / "1" / "model.onnx", images[:16]),
            atol=1e-4,
        )

        client.unload_model("mnist")
        assert not client.is_model_ready("mnist")
        with pytest.raises(InferenceServerException, match="unknown model 'mnist'"):
            infer(client, images[:1], "mnist")
        assert client.is_model_ready("mnist_int8")  # the other model keeps serving
        with pytest.raises(InferenceServerException, match="no model 'resnet'"):
            client.load_model("resnet")
        client.load_model("mnist")
        assert client.is_model_ready("mnist")
