"""Triton's repository, model-control, configuration and statistics endpoints over REST, on real
server processes.

Each REST answer is checked against the files (config.pbtxt, the repository's folders, the calls
made) and against the gRPC answer to the same question: both transports call one implementation
(serving.grpc_api.triton.TritonExtensions), so they must agree field for field."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tritonclient_grpc  # noqa: E402  (a dev dependency: its absence fails)
import tritonclient.http as tritonclient_http  # noqa: E402
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2, service_pb2  # noqa: E402  (tritonclient's copies: see conftest)
from tritonclient.utils import InferenceServerException  # noqa: E402

from serving.process import start_server
from serving.rest_client import RestClient
from tests.support.lifecycle import Reference, metric_value

SERVER_ARGS = ("--workers", "1")


@pytest.fixture(scope="module")
def repository(trained_repository, tmp_path_factory) -> Path:
    """The trained repository as training wrote it: `mnist` and `mnist_int8`, version 1 each."""
    copy = tmp_path_factory.mktemp("rest-repository") / "repository"
    shutil.copytree(trained_repository, copy)
    return copy


@pytest.fixture(scope="module")
def polling_server(repository, tmp_path_factory):
    with start_server(
        repository, *SERVER_ARGS, log_path=tmp_path_factory.mktemp("rest-poll") / "server.log"
    ) as server:
        yield server


def clients(server):
    """tritonclient's HTTP and gRPC clients of one server."""
    return (
        tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.http_port}"),
        tritonclient_grpc.InferenceServerClient(server.target),
    )


def infer_http(client, images: np.ndarray, model: str = "mnist"):
    tensor = tritonclient_http.InferInput("images", [len(images), 28, 28, 1], "UINT8")
    tensor.set_data_from_numpy(images.reshape(-1, 28, 28, 1).astype(np.uint8), binary_data=True)
    return client.infer(model, [tensor])


def refusal(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as refused:
        call()
    return refused.value


def test_model_config_is_the_config_pbtxt_and_the_grpc_answer(polling_server, repository):
    http, grpc_client = clients(polling_server)
    config = http.get_model_config("mnist")
    assert config == http.get_model_config("mnist", "1")
    on_disk = text_format.Parse(
        (repository / "mnist" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert (
        (config["name"], config["platform"], config["max_batch_size"])
        == (on_disk.name, on_disk.platform, on_disk.max_batch_size)
        == ("mnist", "onnxruntime_onnx", 64)
    )
    # Triton's JSON: enums by name, 64-bit integers as numbers (protobuf's JSON would write "28").
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("images", "TYPE_FP32", [28, 28, 1])
    ]
    assert [(t["name"], t["dims"]) for t in config["output"]] == [
        (t.name, list(t.dims)) for t in on_disk.output
    ]
    assert config["version_policy"] == {
        "latest": {"num_versions": 1}
    }  # Triton's default, filled in
    # tritonclient 2.41's copy of model_config.proto predates a few fields (all at their defaults here).
    as_message = json_format.ParseDict(
        config, model_config_pb2.ModelConfig(), ignore_unknown_fields=True
    )
    assert as_message == grpc_client.get_model_config("mnist").config
    assert http.get_model_config("mnist_int8")["name"] == "mnist_int8"

    unknown = refusal(lambda: http.get_model_config("resnet"))
    assert unknown.status() == "404" and "unknown model 'resnet'" in unknown.message()
    assert refusal(lambda: http.get_model_config("mnist", "7")).status() == "404"


def test_statistics_count_the_calls_and_equal_the_grpc_answer(polling_server, mnist_test_set):
    images, _ = mnist_test_set
    http, grpc_client = clients(polling_server)
    before = http.get_inference_statistics("mnist_int8", "1")["model_stats"][0]
    sizes = [1, 4, 7]
    for size in sizes:
        infer_http(http, images[:size], "mnist_int8")
    after = http.get_inference_statistics("mnist_int8", "1")["model_stats"][0]
    assert (after["name"], after["version"]) == ("mnist_int8", "1")
    assert after["inference_count"] - before["inference_count"] == sum(sizes)
    stats, old = after["inference_stats"], before["inference_stats"]
    assert stats["success"]["count"] - old["success"]["count"] == len(sizes)
    assert stats["success"]["ns"] > old["success"]["ns"] and stats["fail"] == old["fail"]
    assert after["last_inference"] > 0
    # Nothing ran in between: the gRPC answer must be the same message, every field.
    grpc_stats = grpc_client.get_inference_statistics("mnist_int8", "1")
    assert (
        json_format.ParseDict(
            http.get_inference_statistics("mnist_int8", "1"),
            service_pb2.ModelStatisticsResponse(),
            ignore_unknown_fields=True,
        )
        == grpc_stats
    )
    everything = (
        http.get_inference_statistics()
    )  # GET /v2/models/stats: every model, every ready version
    assert {(s["name"], s["version"]) for s in everything["model_stats"]} == {
        ("mnist", "1"),
        ("mnist_int8", "1"),
    }
    assert [s["name"] for s in http.get_inference_statistics("mnist")["model_stats"]] == ["mnist"]
    assert refusal(lambda: http.get_inference_statistics("resnet")).status() == "404"


def test_repository_index_lists_the_folders_as_grpc_does(polling_server, repository):
    http, grpc_client = clients(polling_server)
    index = http.get_model_repository_index()
    on_disk = sorted(p.name for p in repository.iterdir() if p.is_dir())
    assert sorted((m["name"], m["version"], m["state"]) for m in index) == [
        (name, "1", "READY") for name in on_disk
    ]
    grpc_index = grpc_client.get_model_repository_index(as_json=True)["models"]
    assert index == [
        {"reason": "", **m} for m in grpc_index
    ]  # gRPC's JSON leaves the empty reason out
    with RestClient(f"127.0.0.1:{polling_server.http_port}") as rest:
        ready_only = rest.json_call("POST", "/v2/repository/index", b'{"ready": true}')
        assert sorted((m["name"], m["state"]) for m in ready_only) == [
            (name, "READY") for name in on_disk
        ]
        bad = rest.request("POST", "/v2/repository/index", b'{"ready": "yes"}')
        assert bad.status == 400 and b"'ready' must be true or false" in bad.body
        for body in (b"{not json", b"[1]", b'{"parameters": 3}'):
            bad = rest.request("POST", "/v2/repository/models/mnist/load", body)
            assert bad.status == 400 and (b"JSON" in bad.body or b"'parameters'" in bad.body), body


def test_load_and_unload_are_refused_in_poll_mode_in_tritons_words(polling_server):
    http, _ = clients(polling_server)
    for action in (http.load_model, http.unload_model):
        refused = refusal(lambda: action("mnist"))
        assert refused.status() == "503"
        assert (
            "explicit model load / unload is not allowed if polling is enabled" in refused.message()
        )
    assert http.is_model_ready("mnist")


def test_the_extensions_are_counted_in_the_metrics(polling_server):
    http, _ = clients(polling_server)
    labels = {"method": "POST /v2/repository/index", "code": "200"}
    before = metric_value(polling_server.metrics_url, "mnist_requests_total", **labels)
    http.get_model_repository_index()
    assert metric_value(polling_server.metrics_url, "mnist_requests_total", **labels) == before + 1
    refused = {"method": "POST /v2/repository/models/{model}/load", "code": "503"}
    before = metric_value(polling_server.metrics_url, "mnist_requests_total", **refused)
    refusal(lambda: http.load_model("mnist"))
    assert metric_value(polling_server.metrics_url, "mnist_requests_total", **refused) == before + 1


def test_explicit_mode_loads_and_unloads_over_rest(repository, mnist_test_set, tmp_path):
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
        http, grpc_client = clients(server)
        assert http.is_model_ready("mnist") and not http.is_model_ready("mnist_int8")
        index = {m["name"]: m for m in http.get_model_repository_index()}
        assert index["mnist"]["state"] == "READY" and index["mnist_int8"]["state"] == ""

        override = refusal(lambda: http.load_model("mnist_int8", config='{"max_batch_size": 8}'))
        assert override.status() == "400" and "not supported" in override.message()
        http.load_model("mnist_int8")
        assert http.is_model_ready("mnist_int8", "1") and grpc_client.is_model_ready(
            "mnist_int8", "1"
        )
        result = infer_http(http, images[:16], "mnist_int8")
        assert result.get_response()["model_name"] == "mnist_int8"
        np.testing.assert_allclose(
            result.as_numpy("probabilities"),
            reference(repository / "mnist_int8" / "1" / "model.onnx", images[:16]),
            atol=1e-5,
        )

        http.unload_model("mnist")
        assert not http.is_model_ready("mnist") and not grpc_client.is_model_ready("mnist")
        gone = refusal(lambda: infer_http(http, images[:1], "mnist"))
        assert gone.status() == "404" and "unknown model 'mnist'" in gone.message()
        assert http.is_model_ready("mnist_int8")  # the other model keeps serving
        assert {s["name"] for s in http.get_inference_statistics()["model_stats"]} == {"mnist_int8"}
        missing = refusal(lambda: http.load_model("resnet"))
        assert missing.status() == "404" and "no model 'resnet'" in missing.message()
        http.load_model("mnist")
        assert http.is_model_ready("mnist")
        index = http.get_model_repository_index()
        assert sorted((m["name"], m["state"]) for m in index) == [
            ("mnist", "READY"),
            ("mnist_int8", "READY"),
        ]
        assert index == [
            {"reason": "", **m}
            for m in grpc_client.get_model_repository_index(as_json=True)["models"]
        ]
