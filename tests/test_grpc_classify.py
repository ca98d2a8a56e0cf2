"""mnist.v1.Classifier on the session's server: real digits, pixels and PNG, describe, health,
reflection, the probe, batching, metrics and every bad request."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from core.repository import load_version
from serving.client import ClassifierClient
from serving.generated import mnist_classifier_pb2 as pb
from serving.process import free_port
from tests.support.serving import has_gpu, metric, png_bytes, rpc_error, served_provider


def test_classify_real_digits(client, mnist_test_set, reference):
    images, labels = mnist_test_set
    result = client.classify(images[:64])
    expected = reference(images[:64])
    assert result.labels.tolist() == expected.argmax(axis=1).tolist()
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    assert (result.labels == labels[:64]).mean() >= 0.9
    assert result.class_names == [str(label) for label in result.labels]
    assert result.model_name == "mnist" and result.model_version == "1"


def test_float_pixels_and_png_give_the_same_answers_as_raw_pixels(client, mnist_test_set):
    images, _ = mnist_test_set
    raw = client.classify(images[:32])
    floats = client.classify(images[:32].astype(np.float32) / 255)
    pngs = client.classify_encoded([png_bytes(image) for image in images[:32]])
    np.testing.assert_allclose(floats.probabilities, raw.probabilities, atol=1e-6)
    np.testing.assert_allclose(pngs.probabilities, raw.probabilities, atol=1e-6)


def test_a_photographed_style_digit_is_framed_like_mnist(client, mnist_test_set):
    images, labels = mnist_test_set
    hits = 0
    for image, label in zip(images[:20], labels[:20]):
        sheet = Image.fromarray(255 - image).resize(
            (120, 160), Image.LANCZOS
        )  # dark ink on white paper
        canvas = Image.new("L", (300, 260), 255)
        canvas.paste(sheet, (40, 50))
        buffer = io.BytesIO()
        canvas.convert("RGB").save(buffer, format="JPEG", quality=90)
        hits += int(client.classify_encoded([buffer.getvalue()]).labels[0] == label)
    assert hits >= 16


def test_describe_model(server, client, trained_repository):
    meta = load_version(trained_repository, "mnist").metadata
    description = client.describe()
    assert description.model_name == "mnist" and description.model_version == "1"
    assert list(description.class_names) == [str(i) for i in range(10)]
    assert list(description.input_shape) == [-1, 28, 28, 1] and description.max_batch_size == 64
    assert description.test_accuracy == pytest.approx(meta.test_accuracy)
    assert description.model_sha256 == meta.model_sha256
    assert description.execution_provider == served_provider(server)
    assert description.execution_provider in ort.get_available_providers()


def test_health_reports_serving_for_the_server_and_each_api(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "mnist.v1.Classifier", "inference.GRPCInferenceService"):
            assert (
                stub.Check(health_pb2.HealthCheckRequest(service=service)).status
                == health_pb2.HealthCheckResponse.SERVING
            )


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {
            "mnist.v1.Classifier",
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
        } <= services
        descriptor = database.FindFileContainingSymbol("mnist.v1.Classifier")
        assert descriptor.package == "mnist.v1"


def test_health_probe_cli(server):
    ok = subprocess.run(
        [sys.executable, "-m", "serving.health_probe", "--target", server.target],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    down = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.health_probe",
            "--target",
            f"127.0.0.1:{free_port()}",
            "--timeout",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode == 1 and "unhealthy" in down.stdout


def test_64_concurrent_clients_are_batched_and_all_correct(server, mnist_test_set, reference):
    # Two images per call: a call that is not a lone image runs in the inference thread, and the calls
    # that arrive meanwhile queue up and form the next batch. (Lone images on an idle CPU server run at
    # once on the loop, where nothing can queue behind them: see serving/inference/batcher.py.)
    images, _ = mnist_test_set
    batches_before = metric(server, "mnist_batch_requests_count")
    singles_before = metric(server, "mnist_batch_requests_bucket", le="1.0")
    expected = reference(images[:1280]).argmax(axis=1)
    barrier = threading.Barrier(64)

    def caller(worker: int) -> list[int]:
        with ClassifierClient(server.target, timeout=30) as c:
            c.describe()  # connect first, so the calls below arrive together
            barrier.wait()
            first = worker * 20
            return sum(
                (
                    c.classify(images[i : i + 2]).labels.tolist()
                    for i in range(first, first + 20, 2)
                ),
                [],
            )

    with ThreadPoolExecutor(64) as pool:
        answers = sum(pool.map(caller, range(64)), [])
    assert answers == expected.tolist()
    batches = metric(server, "mnist_batch_requests_count") - batches_before
    coalesced = batches - (metric(server, "mnist_batch_requests_bucket", le="1.0") - singles_before)
    assert coalesced >= 1, "under 64 concurrent callers some batch must hold more than one request"
    assert batches < 640, "640 calls must have been coalesced into fewer batches"


def test_metrics_count_what_a_call_did(server, client, mnist_test_set):
    names = (
        "mnist_request_latency_seconds_count",
        "mnist_queue_wait_seconds_count",
        "mnist_inference_seconds_count",
        "mnist_batch_size_sum",
        "mnist_batch_size_count",
        "mnist_batch_requests_sum",
        "mnist_batch_requests_count",
    )
    before = {name: metric(server, name) for name in ("mnist_images_total", *names)}
    calls_before = metric(server, "mnist_requests_total", 0.0, method="Classify", code="OK")
    client.classify(
        mnist_test_set[0][:3]
    )  # one call of 3 images: one batch of 3 images from 1 request
    after = {name: metric(server, name) for name in before}
    assert metric(server, "mnist_requests_total", method="Classify", code="OK") == calls_before + 1
    assert after["mnist_images_total"] - before["mnist_images_total"] == 3
    assert after["mnist_batch_size_sum"] - before["mnist_batch_size_sum"] == 3
    assert after["mnist_batch_requests_sum"] - before["mnist_batch_requests_sum"] == 1
    for name in (
        "mnist_request_latency_seconds_count",
        "mnist_queue_wait_seconds_count",
        "mnist_inference_seconds_count",
        "mnist_batch_size_count",
        "mnist_batch_requests_count",
    ):
        assert after[name] - before[name] == 1, name
    assert (
        metric(server, "mnist_queue_depth") == 0
    )  # the gauge's value at rest, not just its HELP line
    provider = served_provider(server)
    assert metric(server, "mnist_model_info", model="mnist", version="1", provider=provider) == 1


BAD_CLASSIFY = [
    (
        "short raw",
        pb.ClassifyRequest(images=[pb.Image(raw_pixels=bytes(783))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "783 bytes",
    ),
    (
        "NaN",
        pb.ClassifyRequest(
            images=[pb.Image(float_pixels=pb.FloatPixels(values=[float("nan")] * 784))]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NaN",
    ),
    (
        "Inf",
        pb.ClassifyRequest(
            images=[pb.Image(float_pixels=pb.FloatPixels(values=[float("inf")] * 784))]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Inf",
    ),
    (
        "out of range",
        pb.ClassifyRequest(images=[pb.Image(float_pixels=pb.FloatPixels(values=[255.0] * 784))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "[0, 1]",
    ),
    ("empty", pb.ClassifyRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no images"),
    (
        "too many",
        pb.ClassifyRequest(images=[pb.Image(raw_pixels=bytes(784))] * 65),
        grpc.StatusCode.INVALID_ARGUMENT,
        "the limit is 64",
    ),
    (
        "undecodable",
        pb.ClassifyRequest(images=[pb.Image(encoded=b"\x89PNG\r\n\x1a\nnot really")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "could not be decoded",
    ),
    (
        "unset image",
        pb.ClassifyRequest(images=[pb.Image()]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "image 0",
    ),
    (
        "unknown model",
        pb.ClassifyRequest(images=[pb.Image(raw_pixels=bytes(784))], model_name="resnet"),
        grpc.StatusCode.NOT_FOUND,
        "unknown model 'resnet'",
    ),
    (
        "unknown version",
        pb.ClassifyRequest(images=[pb.Image(raw_pixels=bytes(784))], model_version="9"),
        grpc.StatusCode.NOT_FOUND,
        "version '9'",
    ),
]


@pytest.mark.parametrize(
    "case,request_message,code,message", BAD_CLASSIFY, ids=[c[0] for c in BAD_CLASSIFY]
)
def test_bad_classify_requests(server, mnist_test_set, case, request_message, code, message):
    from serving.generated import mnist_classifier_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = mnist_classifier_pb2_grpc.ClassifierStub(channel)
        error = rpc_error(lambda: stub.Classify(request_message, timeout=10))
    assert error.code() == code and message in error.details(), error.details()
    with ClassifierClient(server.target) as c:  # and the next good request is answered correctly
        assert c.classify(mnist_test_set[0][:1]).labels.shape == (1,)


def test_a_message_over_the_size_limit_is_refused(server, client, mnist_test_set):
    huge = pb.Image(encoded=b"\x89PNG" + bytes(17 * 1024 * 1024))
    error = rpc_error(lambda: client._classify([huge], "", ""))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.classify(mnist_test_set[0][:1]).labels.shape == (1,)


def test_device_auto_falls_back_to_the_cpu_and_says_why(server):
    if has_gpu():
        pytest.skip("a GPU is present: test_device_cuda covers this machine")
    log = server.log()
    assert "fell back to the CPU" in log and "CPUExecutionProvider" in log
