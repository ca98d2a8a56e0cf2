"""Every bad input of the gRPC tests, over REST: its HTTP code and a message, then a good call;
wrong paths and methods, and a body over the size limit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.rest_client import RestClient


def _tensor(datatype="UINT8", shape=(1, 28, 28, 1), data=None, **extra):
    values = [0] * int(np.prod(shape)) if data is None else data
    return {"name": "images", "datatype": datatype, "shape": list(shape), "data": values, **extra}


def _json(request) -> tuple[bytes, dict[str, str]]:
    return json.dumps(request).encode(), {"Content-Type": "application/json"}


def _binary(request, raw: bytes, header_length: int | None = None) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(request).encode()
    length = len(header) if header_length is None else header_length
    return header + raw, {
        "Inference-Header-Content-Length": str(length),
        "Content-Type": "application/octet-stream",
    }


NAN_JSON = (
    b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 784], "data": [NaN'
    + b", 0" * 783
    + b"]}]}"
)


BAD_REST = [
    # (case, path, (body, headers), HTTP code, part of the message)
    ("wrong shape", "mnist", _json({"inputs": [_tensor("FP32", (1, 27, 28, 1))]}), 400, "shape"),
    ("wrong datatype", "mnist", _json({"inputs": [_tensor("INT32")]}), 400, "INT32"),
    (
        "wrong binary length",
        "mnist",
        _binary(
            {
                "inputs": [
                    {**_tensor("FP32", data=[]), "parameters": {"binary_data_size": 4 * 784 - 1}}
                ]
            },
            bytes(4 * 784 - 1),
        ),
        400,
        "3135 bytes",
    ),
    (
        "wrong data count",
        "mnist",
        _json({"inputs": [_tensor(data=[1, 2, 3])]}),
        400,
        "holds 3 values; expected 784",
    ),
    (
        "NaN in JSON",
        "mnist",
        (NAN_JSON, {"Content-Type": "application/json"}),
        400,
        "not valid JSON",
    ),  # no NaN in JSON
    (
        "NaN binary",
        "mnist",
        _binary(
            {
                "inputs": [
                    {**_tensor("FP32"), "data": None, "parameters": {"binary_data_size": 4 * 784}}
                ]
            },
            np.full(784, np.nan, "<f4").tobytes(),
        ),
        400,
        "NaN",
    ),
    (
        "Inf binary",
        "mnist",
        _binary(
            {
                "inputs": [
                    {**_tensor("FP32"), "data": None, "parameters": {"binary_data_size": 4 * 784}}
                ]
            },
            np.full(784, np.inf, "<f4").tobytes(),
        ),
        400,
        "Inf",
    ),
    (
        "out of range",
        "mnist",
        _json({"inputs": [_tensor("FP32", data=[255.0] * 784)]}),
        400,
        "[0, 1]",
    ),
    ("UINT8 over 255", "mnist", _json({"inputs": [_tensor(data=[256] * 784)]}), 400, "0..255"),
    (
        "UINT8 fractions",
        "mnist",
        _json({"inputs": [_tensor(data=[0.5] * 784)]}),
        400,
        "integers 0..255",
    ),
    (
        "empty batch",
        "mnist",
        _json({"inputs": [_tensor("FP32", (0, 28, 28, 1))]}),
        400,
        "at least one",
    ),
    (
        "over the limit",
        "mnist",
        _json({"inputs": [_tensor(shape=(65, 28, 28, 1))]}),
        400,
        "the limit is 64",
    ),
    (
        "unknown output",
        "mnist",
        _json({"inputs": [_tensor()], "outputs": [{"name": "logits"}]}),
        400,
        "unknown output 'logits'",
    ),
    ("two inputs", "mnist", _json({"inputs": [_tensor(), _tensor()]}), 400, "exactly one"),
    ("no inputs", "mnist", _json({"id": "x"}), 400, "'inputs'"),
    (
        "not JSON",
        "mnist",
        (b"images=1", {"Content-Type": "application/x-www-form-urlencoded"}),
        400,
        "not valid JSON",
    ),
    (
        "ragged data",
        "mnist",
        _json({"inputs": [_tensor(shape=(1, 784), data=[[1, 2], [3]])]}),
        400,
        "ragged",
    ),
    ("strings", "mnist", _json({"inputs": [_tensor(data=["0"] * 784)]}), 400, "send numbers"),
    (
        "shape of strings",
        "mnist",
        _json({"inputs": [_tensor(shape=("1", "784"), data=[0] * 784)]}),
        400,
        "list of integers",
    ),
    (
        "bad header length",
        "mnist",
        _binary({"inputs": [_tensor()]}, b"", header_length=10**6),
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "undeclared binary",
        "mnist",
        _binary({"inputs": [_tensor()]}, bytes(10)),
        400,
        "binary_data_size",
    ),
    (
        "binary and data",
        "mnist",
        _binary({"inputs": [{**_tensor(), "parameters": {"binary_data_size": 784}}]}, bytes(784)),
        400,
        "binary data and 'data'",
    ),
    (
        "bad timeout",
        "mnist",
        _json({"inputs": [_tensor()], "parameters": {"timeout": "soon"}}),
        400,
        "timeout",
    ),
    ("unknown model", "resnet", _json({"inputs": [_tensor()]}), 404, "unknown model 'resnet'"),
    ("unknown version", "mnist/versions/9", _json({"inputs": [_tensor()]}), 404, "version '9'"),
]


@pytest.mark.parametrize(
    "case,model,request_body,status,message", BAD_REST, ids=[c[0] for c in BAD_REST]
)
def test_bad_rest_requests(
    rest, mnist_test_set, reference, case, model, request_body, status, message
):
    body, headers = request_body
    reply = rest.request("POST", f"/v2/models/{model}/infer", body, headers)
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    error = json.loads(reply.body)["error"]
    assert message in error, error
    images = mnist_test_set[0][
        :2
    ]  # and the next good call, on the same connection, is answered right
    np.testing.assert_allclose(rest.infer(images), reference(images), atol=1e-5)


@pytest.mark.parametrize(
    "method,path,status,message",
    [
        ("GET", "/v2/models/mnist/infer", 405, "not allowed"),
        ("GET", "/v3/anything", 404, "not an endpoint"),
        ("GET", "/v2/models/resnet", 404, "unknown model 'resnet'"),
    ],
)
def test_wrong_paths_and_methods_answer_json_errors(rest, method, path, status, message):
    reply = rest.request(method, path)
    assert reply.status == status and message in json.loads(reply.body)["error"]


def test_a_body_over_the_size_limit_is_refused(rest, mnist_test_set, reference):
    reply = rest.request(
        "POST",
        "/v2/models/mnist/infer",
        b"{" + b" " * (17 * 1024 * 1024) + b"}",
        {"Content-Type": "application/json"},
    )
    assert reply.status == 413 and "--max-message-bytes" in json.loads(reply.body)["error"]
    with RestClient(
        rest.address
    ) as fresh:  # the server may close that connection; a new one is served
        np.testing.assert_allclose(
            fresh.infer(mnist_test_set[0][:1]), reference(mnist_test_set[0][:1]), atol=1e-5
        )
