"""Every client string that becomes a number or a name is bounded and checked before conversion.

A version is a positive integer of at most 19 digits; a 1 MB string of digits used to reach
int() and come back as UNKNOWN ("Exceeds the limit (4300 digits) for integer string conversion")
or HTTP 500, and other scripts' digits ("²") did the same. Each case below is refused with the
project's own error (NOT_FOUND / 404, INVALID_ARGUMENT / 400) and a bounded message, over gRPC
and REST, and the server goes on answering a correct call correctly.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse

import grpc
import numpy as np
import pytest

from serving.client import ClassifierClient
from serving.generated import mnist_classifier_pb2 as pb
from serving.inference.names import MAX_VERSION, is_model_name, version_number
from serving.process import start_server

MESSAGE_LIMIT = 512  # bytes (serving.inference.errors.MESSAGE_LIMIT)
RULE = "a model version is a positive integer of at most 19 digits"
MEGABYTE_OF_DIGITS = "9" * (1 << 20)
# Longer than int()'s 4,300-digit limit, short enough for aiohttp's 8 KiB request line.
PATH_DIGITS = "7" * 5000
BAD_VERSIONS = [
    MEGABYTE_OF_DIGITS,
    "²",
    "١",
    "+1",
    " 1",
    "1_0",
    "0",
    str(MAX_VERSION + 1),
    "-1",
    "1.0",
]


@pytest.fixture(scope="module")
def strings_server(trained_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("strings") / "server.log"
    with start_server(trained_repository, "--workers", "1", log_path=log) as running:
        yield running


@pytest.fixture(scope="module")
def explicit_server(trained_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("strings-explicit") / "server.log"
    with start_server(
        trained_repository,
        "--workers",
        "1",
        "--model-control-mode",
        "explicit",
        "--model-name",
        "mnist",
        log_path=log,
    ) as running:
        yield running


def test_the_rules_themselves():
    assert [version_number(text) for text in ("1", "007", "9223372036854775807")] == [
        1,
        7,
        MAX_VERSION,
    ]
    assert [version_number(text) for text in BAD_VERSIONS + [""]] == [None] * (
        len(BAD_VERSIONS) + 1
    )
    assert is_model_name("mnist") and is_model_name("fashion-mnist_2") and is_model_name("é" * 127)
    for name in ("", ".", "..", "../etc", "a/b", "a\\b", "a\x00b", ".staging-1-2", "é" * 128):
        assert not is_model_name(name), name


def kserve_stub(server):
    from tritonclient.grpc import service_pb2_grpc

    channel = grpc.insecure_channel(
        server.target, options=[("grpc.max_send_message_length", 8 << 20)]
    )
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def infer_request(version: str):
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="mnist", model_version=version)
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 28, 28, 1])
    request.raw_input_contents.append(bytes(784))
    return request


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert len(error.details().encode()) <= MESSAGE_LIMIT, len(error.details())
    return error


@pytest.mark.parametrize(
    "version", BAD_VERSIONS, ids=lambda v: repr(v[:12]) + (f"..{len(v)}" if len(v) > 12 else "")
)
def test_a_bad_version_is_not_found_on_every_grpc_method(strings_server, version):
    from tritonclient.grpc import service_pb2

    channel, stub = kserve_stub(strings_server)
    with channel:
        calls = {
            "ModelInfer": lambda: stub.ModelInfer(infer_request(version), timeout=30),
            "ModelMetadata": lambda: stub.ModelMetadata(
                service_pb2.ModelMetadataRequest(name="mnist", version=version), timeout=30
            ),
            "ModelConfig": lambda: stub.ModelConfig(
                service_pb2.ModelConfigRequest(name="mnist", version=version), timeout=30
            ),
            "ModelStatistics": lambda: stub.ModelStatistics(
                service_pb2.ModelStatisticsRequest(name="mnist", version=version), timeout=30
            ),
        }
        for method, call in calls.items():
            error = refused(call)
            assert error.code() == grpc.StatusCode.NOT_FOUND, (
                method,
                error.code(),
                error.details(),
            )
            assert RULE in error.details() and "ready versions: 1" in error.details(), (
                method,
                error.details(),
            )
        ready = stub.ModelReady(
            service_pb2.ModelReadyRequest(name="mnist", version=version), timeout=30
        )
        assert ready.ready is False
    with ClassifierClient(strings_server.target) as client:
        request = pb.ClassifyRequest(
            images=[pb.Image(raw_pixels=bytes(784))], model_version=version
        )
        error = refused(lambda: client._classifier.Classify(request, timeout=30))
        assert error.code() == grpc.StatusCode.NOT_FOUND and RULE in error.details(), (
            error.details()
        )
        error = refused(
            lambda: client._classifier.DescribeModel(
                pb.DescribeModelRequest(model_version=version), timeout=30
            )
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND and RULE in error.details(), (
            error.details()
        )


def test_a_served_version_with_leading_zeros_still_answers(strings_server, mnist_test_set):
    channel, stub = kserve_stub(strings_server)
    with channel:
        assert stub.ModelInfer(infer_request("0001"), timeout=30).model_version == "1"


def rest(
    server, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        reply = connection.getresponse()
        data = reply.read()
        return reply.status, (json.loads(data) if data else {})
    finally:
        connection.close()


INFER_BODY = json.dumps(
    {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 784], "data": [0] * 784}]}
).encode()


@pytest.mark.parametrize(
    "version",
    [PATH_DIGITS, "²", "+1", "0", str(MAX_VERSION + 1), "-1", "1_0"],
    ids=lambda v: repr(v[:12]) + (f"..{len(v)}" if len(v) > 12 else ""),
)
def test_a_bad_version_in_a_rest_path_is_404(strings_server, version):
    base = f"/v2/models/mnist/versions/{urllib.parse.quote(version)}"
    for method, suffix, body in [
        ("GET", "", None),
        ("POST", "/infer", INFER_BODY),
        ("GET", "/config", None),
        ("GET", "/stats", None),
    ]:
        status, answer = rest(strings_server, method, base + suffix, body)
        assert status == 404, (suffix, status, answer)
        assert RULE in answer["error"] and len(answer["error"].encode()) <= MESSAGE_LIMIT, answer
    assert rest(strings_server, "GET", base + "/ready")[0] == 400  # "not ready", as Triton answers


@pytest.mark.parametrize("length", ["9" * 8000, "²", "-1", "1e3", ""])
def test_a_bad_binary_header_length_is_400(strings_server, length):
    status, answer = rest(
        strings_server,
        "POST",
        "/v2/models/mnist/infer",
        INFER_BODY,
        {"Inference-Header-Content-Length": length},
    )
    assert status == 400, (status, answer)
    assert (
        "Inference-Header-Content-Length" in answer["error"]
        and len(answer["error"].encode()) <= MESSAGE_LIMIT
    )


@pytest.mark.parametrize("timeout", ["1" * 5000, "soon", -1, True])
def test_a_bad_timeout_parameter_is_400(strings_server, timeout):
    body = json.loads(INFER_BODY)
    body["parameters"] = {"timeout": timeout}
    status, answer = rest(
        strings_server, "POST", "/v2/models/mnist/infer", json.dumps(body).encode()
    )
    assert status == 400 and "timeout" in answer["error"], (status, answer)


def test_a_huge_timeout_parameter_is_no_deadline_problem(strings_server):
    body = json.loads(INFER_BODY)
    body["parameters"] = {"timeout": 1e300}
    status, answer = rest(
        strings_server, "POST", "/v2/models/mnist/infer", json.dumps(body).encode()
    )
    assert status == 200 and answer["outputs"][0]["shape"] == [1, 10], (status, answer)


@pytest.mark.parametrize(
    "name",
    ["..", "../mnist", "a\x00b", "x" * (1 << 20), ".staging-1-1"],
    ids=["dotdot", "traversal", "nul", "megabyte", "staging"],
)
def test_a_model_name_that_cannot_be_a_folder_is_not_found_on_load_and_unload(
    explicit_server, name
):
    from tritonclient.grpc import service_pb2

    channel, stub = kserve_stub(explicit_server)
    with channel:
        calls = [
            lambda: stub.RepositoryModelLoad(
                service_pb2.RepositoryModelLoadRequest(model_name=name), timeout=30
            ),
            lambda: stub.RepositoryModelUnload(
                service_pb2.RepositoryModelUnloadRequest(model_name=name), timeout=30
            ),
        ]
        for call in calls:
            error = refused(call)
            assert error.code() == grpc.StatusCode.NOT_FOUND, (error.code(), error.details())
            assert "a model name is a folder of the model repository" in error.details(), (
                error.details()
            )
        index = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=30)
        names = [model.name for model in index.models]
        assert "mnist" in names and name not in names, names
    if len(name) < 100:
        status, answer = rest(
            explicit_server,
            "POST",
            f"/v2/repository/models/{urllib.parse.quote(name, safe='')}/load",
        )
        assert status == 404 and "a model name is a folder" in answer["error"], (status, answer)


def test_the_servers_keep_serving_and_log_no_traceback(
    strings_server, explicit_server, mnist_test_set
):
    images, labels = mnist_test_set
    for server in (strings_server, explicit_server):
        with ClassifierClient(server.target, timeout=30) as client:
            predicted = client.infer_kserve(images[:32]).argmax(axis=1)
        assert np.mean(predicted == labels[:32]) >= 0.8
        assert "Traceback" not in server.log() and "internal error" not in server.log(), (
            server.log()[-3000:]
        )
