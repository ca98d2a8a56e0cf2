"""Sampled payload logging on a real server: JSON lines and CloudEvents, sampling, and a full sink.

Every record is checked against what the test sent and got back (the input's sha256, the
predicted class), the sampled share against binomial bounds, and a sink that never answers must
cost records, never calls.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import socket
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.contract import scale_pixels
from serving.generated import mnist_classifier_pb2 as pb
from serving.generated import mnist_classifier_pb2_grpc as pb_grpc
from serving.process import free_port, start_server
from tests.support.serving import serve_and_fail

tritonclient_grpc = pytest.importorskip(
    "tritonclient.grpc", reason="tritonclient is a dev dependency"
)


def images_of(mnist_test_set, count: int, offset: int = 0) -> np.ndarray:
    pixels, _labels = mnist_test_set
    return scale_pixels(pixels[offset : offset + count]).reshape(count, 28, 28, 1)


def kserve_call(client, image: np.ndarray, request_id: str) -> np.ndarray:
    tensor = tritonclient_grpc.InferInput("images", list(image.shape), "FP32")
    tensor.set_data_from_numpy(image)
    result = client.infer("mnist", [tensor], request_id=request_id)
    return result.as_numpy("probabilities")


def rest_call(http_url: str, image: np.ndarray, request_id: str) -> np.ndarray:
    body = {
        "id": request_id,
        "inputs": [
            {
                "name": "images",
                "shape": list(image.shape),
                "datatype": "FP32",
                "data": image.ravel().tolist(),
            }
        ],
    }
    request = urllib.request.Request(
        f"{http_url}/v2/models/mnist/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        output = json.loads(answer.read())["outputs"][0]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def records_metric(metrics_url: str) -> dict[str, float]:
    with urllib.request.urlopen(metrics_url, timeout=10) as answer:
        text = answer.read().decode()
    counts = {}
    for family in text_string_to_metric_families(text):
        if family.name == "mnist_payload_log_records":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["outcome"]] = sample.value
    return counts


def sha256_of(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest()


def test_sampled_records_match_the_calls_on_both_transports(
    trained_repository, mnist_test_set, tmp_path
):
    """--workers 2, rate 0.25: about a quarter of 600 calls recorded, each one exactly what was sent."""
    calls, rate = 600, 0.25
    images = images_of(mnist_test_set, calls)
    log_file = tmp_path / "payloads.jsonl"
    answers: dict[
        str, tuple[str, np.ndarray]
    ] = {}  # request id -> (sha256 of the input, probabilities)
    with start_server(
        trained_repository,
        "--workers",
        "2",
        "--payload-log",
        str(log_file),
        "--payload-log-sample-rate",
        str(rate),
    ) as server:
        client = tritonclient_grpc.InferenceServerClient(server.target)

        def call(i: int) -> None:
            image, request_id = images[i : i + 1], f"call-{i}"
            if i % 3 == 0:  # a third over REST
                probabilities = rest_call(server.http_url, image, request_id)
            else:
                probabilities = kserve_call(client, image, request_id)
            answers[request_id] = (sha256_of(image), probabilities)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(call, range(calls)))
        client.close()
        assert server.stop() == 0  # the drain writes what is still queued
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    # Binomial: mean n*p, sd sqrt(n*p*(1-p)); 5 sd either side fails about once in 3.5 million runs.
    mean, sd = calls * rate, math.sqrt(calls * rate * (1 - rate))
    assert mean - 5 * sd <= len(records) <= mean + 5 * sd, len(records)
    assert len({r["id"] for r in records}) == len(records)
    assert len({r["worker"] for r in records}) >= 1
    for record in records:
        sent_sha, probabilities = answers[record["id"]]
        assert (record["model"], record["version"], record["status"]) == ("mnist", "1", "OK")
        assert record["input"] == {"shape": [1, 28, 28, 1], "datatype": "FP32", "sha256": sent_sha}
        assert record["output"]["classes"] == [str(int(probabilities.argmax()))]
        assert np.allclose(record["output"]["probabilities"], probabilities, atol=1e-5)
        assert record["latency_ms"] > 0 and "pixels_uint8_base64" not in record["input"]


def test_pixels_only_when_asked_and_the_classifier_api_names_its_request(
    trained_repository, mnist_test_set, tmp_path
):
    images = images_of(mnist_test_set, 4)
    pixels = np.rint(images * 255).astype(np.uint8)
    log_file = tmp_path / "payloads.jsonl"
    with start_server(
        trained_repository,
        "--workers",
        "1",
        "--payload-log",
        str(log_file),
        "--payload-log-pixels",
        "true",
    ) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            request = pb.ClassifyRequest(images=[pb.Image(raw_pixels=p.tobytes()) for p in pixels])
            answer = stub.Classify(request, metadata=[("x-request-id", "classify-1")], timeout=30)
        assert server.stop() == 0
    (record,) = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert record["id"] == "classify-1"
    assert record["input"]["shape"] == [4, 28, 28, 1]
    logged = np.frombuffer(base64.b64decode(record["input"]["pixels_uint8_base64"]), np.uint8)
    assert np.array_equal(logged, pixels.ravel())
    assert record["output"]["labels"] == [p.label for p in answer.predictions]
    assert record["output"]["classes"] == [
        str(p.label) for p in answer.predictions
    ]  # MNIST's names


class _Collector(BaseHTTPRequestHandler):
    """A CloudEvents endpoint: keeps every request's headers and body."""

    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_cloudevents_reach_an_http_endpoint(trained_repository, mnist_test_set):
    from cloudevents.core.bindings.http import HTTPMessage, from_http
    from cloudevents.core.formats.json import JSONFormat

    _Collector.received = []
    endpoint = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    images = images_of(mnist_test_set, 20)
    try:
        with start_server(
            trained_repository,
            "--workers",
            "1",
            "--payload-log",
            f"http://127.0.0.1:{endpoint.server_port}/events",
        ) as server:
            client = tritonclient_grpc.InferenceServerClient(server.target)
            for i in range(20):
                kserve_call(client, images[i : i + 1], f"event-{i}")
            client.close()
            assert server.stop() == 0
    finally:
        endpoint.shutdown()
    assert len(_Collector.received) == 20
    for headers, body in _Collector.received:
        event = from_http(HTTPMessage(headers, body), JSONFormat())
        assert event.get_type() == "io.github.mnist-cnn-serving.inference"
        assert event.get_subject() == "mnist/1"
        data = event.get_data()
        assert event.get_id() == data["id"] and data["id"].startswith("event-")
        assert data["input"]["sha256"] == sha256_of(
            images[int(data["id"].split("-")[1])][np.newaxis]
        )


def test_a_sink_that_never_answers_costs_records_not_calls(trained_repository, mnist_test_set):
    """The endpoint accepts the connection and never replies: the queue fills, records drop, calls pass."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # connections complete in the kernel; nobody ever reads or answers
    images = images_of(mnist_test_set, 300)
    try:
        with start_server(
            trained_repository,
            "--workers",
            "1",
            "--payload-log-queue-size",
            "8",
            "--payload-log",
            f"http://127.0.0.1:{silent.getsockname()[1]}/",
        ) as server:
            client = tritonclient_grpc.InferenceServerClient(server.target)
            answers = [kserve_call(client, images[i : i + 1], f"full-{i}") for i in range(300)]
            client.close()
            counts = records_metric(server.metrics_url)
            server.stop()
    finally:
        silent.close()
    assert len(answers) == 300 and all(a.shape == (1, 10) for a in answers)
    # At most the queue plus the one record the thread is stuck sending are not dropped.
    assert counts.get("dropped", 0) >= 300 - 8 - 1
    assert counts.get("written", 0) == 0


def test_bad_payload_log_settings_are_one_line(trained_repository):
    result = serve_and_fail(
        *("--model-repository", str(trained_repository), "--payload-log", "x.jsonl"),
        *("--payload-log-sample-rate", "0"),
        timeout=120,
    )
    assert result.returncode != 0
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("--payload-log-sample-rate must be in (0, 1]")
    )
    assert "Traceback" not in result.stderr


def test_a_payload_log_file_that_cannot_be_opened_is_one_line(trained_repository, tmp_path):
    target = Path(tmp_path) / "missing-folder" / "payloads.jsonl"
    result = serve_and_fail(
        *("--model-repository", str(trained_repository), "--workers", "1"),
        *("--http-port", str(free_port()), "--payload-log", str(target)),
        timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "payload" in result.stderr.strip().splitlines()[-1]
