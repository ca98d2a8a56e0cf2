"""Fuzzing both APIs over real calls: byte mutations of valid messages, sent to the real server.

Every mutated call must get a considered answer: OK (with a well-formed answer), or a client
error code (INVALID_ARGUMENT, NOT_FOUND; HTTP 400/404/413) with a bounded message. Never UNKNOWN,
INTERNAL or HTTP 500, never a traceback in the log, and the server must answer a correct call
correctly afterwards. The size is bounded for CI (FUZZ_CASES per API, default 150); FUZZ_SEED
repeats a run (the seed is printed on failure).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import random

import grpc
import numpy as np
import pytest
from PIL import Image

from serving.client import ClassifierClient
from serving.generated import mnist_classifier_pb2 as pb
from serving.process import start_server

CASES = int(os.environ.get("FUZZ_CASES", "150"))
SEED = int(os.environ.get("FUZZ_SEED", str(random.SystemRandom().randrange(1 << 30))))
MESSAGE_LIMIT = 512
GRPC_ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
HTTP_ALLOWED = {200, 400, 404, 413}


@pytest.fixture(scope="module")
def fuzz_server(trained_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    with start_server(trained_repository, "--workers", "1", log_path=log) as running:
        yield running


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits: bit flips, byte changes, cuts, insertions, duplicated or huge varints."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(7)
        at = rng.randrange(len(buf) + 1) if buf else 0
        if kind == 0 and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1 and buf:
            buf[min(at, len(buf) - 1)] = rng.randrange(256)
        elif kind == 2:
            del buf[at : at + rng.randint(1, 64)]
        elif kind == 3:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == 4 and buf:
            start = rng.randrange(len(buf))
            buf[at:at] = buf[start : start + rng.randint(1, 128)]
        elif kind == 5:
            buf[at:at] = b"\xff\xff\xff\xff\x0f"  # a varint of 2^32 - 1: a length or a value
        else:
            buf = buf[:at]
    return bytes(buf)


def png(digit: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, "PNG")
    return buffer.getvalue()


def classify_seeds(images: np.ndarray) -> list[bytes]:
    return [
        pb.ClassifyRequest(images=[pb.Image(raw_pixels=images[0].tobytes())]).SerializeToString(),
        pb.ClassifyRequest(
            images=[
                pb.Image(float_pixels=pb.FloatPixels(values=(images[1] / 255).ravel().tolist()))
            ],
            model_name="mnist",
        ).SerializeToString(),
        pb.ClassifyRequest(images=[pb.Image(encoded=png(images[2]))]).SerializeToString(),
    ]


def kserve_seeds(images: np.ndarray) -> list[bytes]:
    from tritonclient.grpc import service_pb2

    uint8 = service_pb2.ModelInferRequest(model_name="mnist")
    uint8.inputs.add(name="images", datatype="UINT8", shape=[2, 28, 28, 1])
    uint8.raw_input_contents.append(images[:2].tobytes())
    typed = service_pb2.ModelInferRequest(model_name="mnist", id="fuzz")
    tensor = typed.inputs.add(name="images", datatype="FP32", shape=[1, 784])
    tensor.contents.fp32_contents.extend((images[3] / 255).ravel().tolist())
    typed.outputs.add(name="probabilities")
    return [uint8.SerializeToString(), typed.SerializeToString()]


def check_grpc(
    channel: grpc.Channel, method: str, seeds: list[bytes], rng: random.Random
) -> dict[str, int]:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    codes: dict[str, int] = {}
    for case in range(CASES):
        data = mutate(seeds[case % len(seeds)], rng)
        try:
            call(data, timeout=30)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
        assert code in GRPC_ALLOWED, (
            f"seed {SEED}, {method} case {case}: {code} {details[:300]} ({data[:64]!r})"
        )
        assert len(details.encode()) <= MESSAGE_LIMIT, f"seed {SEED}: {len(details.encode())} bytes"
        codes[code.name] = codes.get(code.name, 0) + 1
    return codes


def test_fuzzed_classify_calls_get_considered_answers(fuzz_server, mnist_test_set):
    rng = random.Random(SEED)
    with grpc.insecure_channel(fuzz_server.target) as channel:
        codes = check_grpc(
            channel, "/mnist.v1.Classifier/Classify", classify_seeds(mnist_test_set[0]), rng
        )
    assert codes.get("INVALID_ARGUMENT", 0) > 0  # the mutations do reach the checks
    _still_correct(fuzz_server, mnist_test_set)


def test_fuzzed_kserve_calls_get_considered_answers(fuzz_server, mnist_test_set):
    rng = random.Random(SEED + 1)
    with grpc.insecure_channel(fuzz_server.target) as channel:
        codes = check_grpc(
            channel,
            "/inference.GRPCInferenceService/ModelInfer",
            kserve_seeds(mnist_test_set[0]),
            rng,
        )
    assert codes.get("INVALID_ARGUMENT", 0) > 0
    _still_correct(fuzz_server, mnist_test_set)


def test_fuzzed_rest_calls_get_considered_answers(fuzz_server, mnist_test_set):
    """KServe v2 over HTTP: mutated JSON bodies and mutated binary-tensor bodies."""
    rng = random.Random(SEED + 2)
    images = mnist_test_set[0]
    json_body = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [1, 28, 28, 1],
                    "data": images[0].ravel().tolist(),
                }
            ]
        }
    ).encode()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [1, 784],
                    "parameters": {"binary_data_size": 784},
                }
            ]
        }
    ).encode()
    seeds = [(json_body, None), (header + images[1].tobytes(), len(header))]
    connection = http.client.HTTPConnection("127.0.0.1", fuzz_server.http_port, timeout=30)
    try:
        for case in range(CASES):
            body, header_length = seeds[case % 2]
            body = mutate(body, rng)
            headers = {
                "Content-Type": "application/octet-stream" if header_length else "application/json"
            }
            if header_length is not None:
                headers["Inference-Header-Content-Length"] = str(min(header_length, len(body)))
            connection.request("POST", "/v2/models/mnist/infer", body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
            assert response.status in HTTP_ALLOWED, (
                f"seed {SEED}, case {case}: {response.status} {answer[:300]!r}"
            )
            assert len(answer) <= MESSAGE_LIMIT + 64 or response.status == 200, (
                f"seed {SEED}: {len(answer)} bytes"
            )
            if response.getheader("Connection", "").lower() == "close":
                connection.close()
                connection = http.client.HTTPConnection(
                    "127.0.0.1", fuzz_server.http_port, timeout=30
                )
    finally:
        connection.close()
    _still_correct(fuzz_server, mnist_test_set)


def _still_correct(server, mnist_test_set) -> None:
    images, _ = mnist_test_set
    with ClassifierClient(server.target) as client:
        idle = client.classify(images[:32]).labels
        assert np.array_equal(client.classify(images[:32]).labels, idle)
        assert client.infer_kserve(images[:32]).argmax(axis=1).tolist() == idle.tolist()
    assert server.proc.poll() is None
    assert "Traceback" not in server.log(), server.log()[-3000:]


def test_a_short_soak_is_correct_with_flat_memory(trained_repository, mnist_path, tmp_path):
    """`make soak` at CI size: mixed and hostile calls for 20 s, every answer checked, RSS flat."""
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.soak",
            "--model-repository",
            str(trained_repository),
            "--minutes",
            "0.34",
            "--interval",
            "5",
            "--callers",
            "4",
            "--data-dir",
            str(mnist_path),
            "--out",
            str(tmp_path / "soak.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert summary["calls"] > 0 and summary["hostile_refused"] > 0 and summary["wrong"] == 0
    assert (tmp_path / "soak.png").stat().st_size > 0
