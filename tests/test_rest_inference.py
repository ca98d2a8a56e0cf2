"""KServe v2 over HTTP/REST on the session's server: one interface over both clients,
tritonclient.http, nested JSON, versioned paths and curl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from core.repository import load_version
from serving.client import ClassifierClient, InferenceClient, KServeAnswer
from serving.rest_client import RestClient


def test_both_clients_offer_one_inference_interface(server, mnist_test_set, reference):
    """The same code over gRPC and REST: the same method names, arguments and answers."""
    images = mnist_test_set[0][:4]
    clients = [
        ClassifierClient(server.target, timeout=20),
        RestClient(f"127.0.0.1:{server.http_port}", timeout=20),
    ]
    for client in clients:
        with client:
            assert isinstance(client, InferenceClient), type(client)
            client.wait_until_ready(30)
            answer = client.infer_kserve_answer(images, "mnist", "1")
            assert isinstance(answer, KServeAnswer) and (
                answer.model_name,
                answer.model_version,
            ) == ("mnist", "1")
            np.testing.assert_allclose(answer.probabilities, reference(images), atol=1e-5)
            np.testing.assert_allclose(client.infer_kserve(images), reference(images), atol=1e-5)


def test_tritonclient_http_health_and_metadata(triton_http, trained_repository):
    version = str(load_version(trained_repository, "mnist").version)
    assert triton_http.is_server_live() and triton_http.is_server_ready()
    assert triton_http.is_model_ready("mnist") and triton_http.is_model_ready("mnist", version)
    assert not triton_http.is_model_ready("resnet") and not triton_http.is_model_ready(
        "mnist", "99"
    )
    assert triton_http.get_server_metadata() == {
        "name": "mnist-serve",
        "version": "0.1.0",
        "extensions": [
            "model_repository",
            "model_configuration",
            "statistics",
            "binary_tensor_data",
        ],
    }
    for metadata in (
        triton_http.get_model_metadata("mnist"),
        triton_http.get_model_metadata("mnist", version),
    ):
        assert metadata["name"] == "mnist" and metadata["versions"] == [version]
        assert metadata["inputs"] == [
            {"name": "images", "datatype": "FP32", "shape": [-1, 28, 28, 1]}
        ]
        assert metadata["outputs"] == [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
        ]


@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
@pytest.mark.parametrize("binary_input", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize(
    "binary_output", [True, False, None], ids=["binary-out", "json-out", "default-out"]
)
def test_tritonclient_http_infer_equals_onnxruntime(
    triton_http, mnist_test_set, reference, datatype, binary_input, binary_output
):
    import tritonclient.http as httpclient

    images = mnist_test_set[0][:16]
    batch = (
        images[..., None] if datatype == "UINT8" else (images.astype(np.float32) / 255)[..., None]
    )
    tensor = httpclient.InferInput("images", list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch, binary_data=binary_input)
    # None: no outputs named, so tritonclient asks for every output as binary (binary_data_output).
    outputs = (
        None
        if binary_output is None
        else [httpclient.InferRequestedOutput("probabilities", binary_output)]
    )
    result = triton_http.infer("mnist", [tensor], outputs=outputs, request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference(images), atol=1e-5)
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_name"] == "mnist"
    assert ("data" in response["outputs"][0]) == (binary_output is False)


def test_nested_json_data_and_a_versioned_path(
    rest, server, trained_repository, mnist_test_set, reference
):
    version = load_version(trained_repository, "mnist").version
    images = mnist_test_set[0][:3]
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [3, 28, 28, 1],
                    "data": images[..., None].tolist(),
                }
            ]
        }
    ).encode()  # nested lists
    reply = rest.request(
        "POST",
        f"/v2/models/mnist/versions/{version}/infer",
        body,
        {"Content-Type": "application/json"},
    )
    assert reply.status == 200, reply.body
    answer = json.loads(reply.body)
    assert answer["model_version"] == str(version) and answer["outputs"][0]["shape"] == [3, 10]
    np.testing.assert_allclose(
        np.reshape(answer["outputs"][0]["data"], (3, 10)), reference(images), atol=1e-5
    )


def test_curl_with_a_json_body(server, mnist_test_set, reference, tmp_path):
    curl = shutil.which("curl")
    if curl is None:
        if os.environ.get("CI") == "true":
            pytest.fail("curl is missing in CI (Debian package curl)")
        pytest.skip("curl is not installed (Debian package curl)")
    images = mnist_test_set[0][:2]
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "UINT8",
                        "shape": [2, 784],
                        "data": images.ravel().tolist(),
                    }
                ]
            }
        )
    )
    result = subprocess.run(
        [
            curl,
            "-sS",
            "--fail-with-body",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            f"@{request}",
            f"http://127.0.0.1:{server.http_port}/v2/models/mnist/infer",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = json.loads(result.stdout)["outputs"][0]
    assert output["name"] == "probabilities" and output["shape"] == [2, 10]
    np.testing.assert_allclose(np.reshape(output["data"], (2, 10)), reference(images), atol=1e-5)
