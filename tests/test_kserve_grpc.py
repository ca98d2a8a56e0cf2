"""KServe v2 over gRPC on the session's server, through NVIDIA's own client and raw requests."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from tests.support.serving import metric, rpc_error, triton_infer


def test_tritonclient_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("mnist") and triton.is_model_ready("mnist", "1")
    assert not triton.is_model_ready("fashion") and not triton.is_model_ready("mnist", "2")
    assert triton.get_server_metadata().name == "mnist-serve"
    meta = triton.get_model_metadata("mnist")
    assert meta.platform == "onnxruntime_onnx" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("images", "FP32", [-1, 28, 28, 1])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("probabilities", "FP32", [-1, 10])
    ]


def test_tritonclient_infer_fp32_and_uint8(triton, mnist_test_set, reference):
    images, labels = mnist_test_set
    expected = reference(images[:16])
    as_float = triton_infer(triton, (images[:16, ..., None] / 255).astype(np.float32), "FP32")
    as_bytes = triton_infer(triton, images[:16, ..., None], "UINT8")
    for result in (as_float, as_bytes):
        probabilities = result.as_numpy("probabilities")
        assert probabilities.shape == (16, 10)
        np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert as_float.get_response().model_version == "1"


def test_kserve_typed_contents_answered_in_kind(server, mnist_test_set, reference):
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    images, _ = mnist_test_set
    request = service_pb2.ModelInferRequest(model_name="mnist", id="req-7")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=[4, 28, 28, 1])
    tensor.contents.uint_contents.extend(images[:4].ravel().tolist())
    with grpc.insecure_channel(server.target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=10
        )
    assert response.id == "req-7" and not response.raw_output_contents
    got = np.array(response.outputs[0].contents.fp32_contents, dtype=np.float32).reshape(4, 10)
    np.testing.assert_allclose(got, reference(images[:4]), atol=1e-5)


def test_metrics_label_the_kserve_calls_by_method(server, triton, mnist_test_set):
    methods = ("ServerLive", "ServerReady", "ModelReady", "ModelMetadata", "ModelInfer")
    before = {m: metric(server, "mnist_requests_total", 0.0, method=m, code="OK") for m in methods}
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("mnist")
    triton.get_model_metadata("mnist")
    triton_infer(triton, mnist_test_set[0][:2, ..., None], "UINT8")
    for method in methods:
        assert (
            metric(server, "mnist_requests_total", method=method, code="OK") == before[method] + 1
        ), method


def _raw_kserve(
    server,
    datatype: str,
    shape: list[int],
    raw: bytes,
    model: str = "mnist",
    version: str = "",
    output: str = "",
):
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="images", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    if output:
        request.outputs.add(name=output)
    with grpc.insecure_channel(server.target) as channel:
        return rpc_error(
            lambda: service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, timeout=10
            )
        )


BAD_KSERVE = [
    (
        "wrong shape",
        "FP32",
        [1, 27, 28, 1],
        bytes(4 * 27 * 28),
        "mnist",
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "shape",
    ),
    (
        "wrong datatype",
        "INT32",
        [1, 28, 28, 1],
        bytes(4 * 784),
        "mnist",
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "INT32",
    ),
    (
        "wrong raw length",
        "FP32",
        [1, 28, 28, 1],
        bytes(4 * 784 - 1),
        "mnist",
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "3135 bytes",
    ),
    (
        "out of range",
        "FP32",
        [1, 28, 28, 1],
        np.full(784, 1.5, "<f4").tobytes(),
        "mnist",
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "holds 1.5 at image 0, pixel 0, outside [0, 1]",
    ),
    (
        "NaN",
        "FP32",
        [1, 28, 28, 1],
        np.full(784, np.nan, "<f4").tobytes(),
        "mnist",
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "NaN",
    ),
    (
        "empty batch",
        "FP32",
        [0, 28, 28, 1],
        b"",
        "mnist",
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "batch size 0 (shape[0]); send at least one image",
    ),
    (
        "over the limit",
        "UINT8",
        [65, 28, 28, 1],
        bytes(65 * 784),
        "mnist",
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "64",
    ),
    (
        "unknown model",
        "UINT8",
        [1, 28, 28, 1],
        bytes(784),
        "resnet",
        "",
        grpc.StatusCode.NOT_FOUND,
        "resnet",
    ),
    (
        "unknown version",
        "UINT8",
        [1, 28, 28, 1],
        bytes(784),
        "mnist",
        "3",
        grpc.StatusCode.NOT_FOUND,
        "'3'",
    ),
]


def test_an_unknown_output_name_is_invalid_argument(server, triton, mnist_test_set):
    error = _raw_kserve(server, "UINT8", [1, 28, 28, 1], bytes(784), output="logits")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "unknown output 'logits'; this model's only output is 'probabilities'" in error.details()
    ), error.details()
    assert triton_infer(triton, mnist_test_set[0][:1, ..., None], "UINT8").as_numpy(
        "probabilities"
    ).shape == (1, 10)


@pytest.mark.parametrize(
    "case,datatype,shape,raw,model,version,code,message", BAD_KSERVE, ids=[c[0] for c in BAD_KSERVE]
)
def test_bad_kserve_requests(
    server, triton, mnist_test_set, case, datatype, shape, raw, model, version, code, message
):
    error = _raw_kserve(server, datatype, shape, raw, model, version)
    assert error.code() == code and message in error.details(), error.details()
    assert triton_infer(triton, mnist_test_set[0][:1, ..., None], "UINT8").as_numpy(
        "probabilities"
    ).shape == (1, 10)
