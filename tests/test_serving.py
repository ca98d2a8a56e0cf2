"""The real server over loopback: both APIs, tritonclient, health, reflection, batching, bad input."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from core.repository import load_version
from serving.client import ClassifierClient
from serving.generated import mnist_classifier_pb2 as pb
from serving.process import free_port, start_server
from tests.support.common import ROOT
from tests.support.lifecycle import wait_for

# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(trained_repository):
    """In-process onnxruntime on the same model file: what the server must answer."""
    session = ort.InferenceSession(
        str(load_version(trained_repository, "mnist").model_path),
        providers=["CPUExecutionProvider"],
    )
    return lambda images: session.run(
        None, {"images": (images.astype(np.float32) / 255)[..., None]}
    )[0]


@pytest.fixture()
def client(server):
    with ClassifierClient(server.target, timeout=20) as c:
        yield c


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def metric(server, name: str, default: float | None = None, **labels) -> float:
    """The sum of the samples of `name` whose labels include `labels`, read from /metrics.

    A series that is not there fails the test (a misspelt name cannot read as 0), unless a default
    is given for a labelled child that the server creates on first use.
    """
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    values = []
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            values.append(float(match.group(2)))
    if not values and default is None:
        raise AssertionError(f"no sample of {name} {labels or ''} in /metrics")
    return sum(values) if values else default


def served_provider(server) -> str:
    """The execution provider the server itself logged at start (--device auto decides it)."""
    found = re.findall(r"onnxruntime \S+ on (\w+ExecutionProvider)", server.log())
    assert found, server.log()[-2000:]
    return found[-1]


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# --- mnist.v1.Classifier ------------------------------------------------------------------------


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


# --- KServe v2 through NVIDIA's own client --------------------------------------------------------


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.target) as c:
        yield c


def triton_infer(triton, batch: np.ndarray, datatype: str, model: str = "mnist", version: str = ""):
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("images", list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch)
    return triton.infer(
        model,
        [tensor],
        model_version=version,
        outputs=[grpcclient.InferRequestedOutput("probabilities")],
    )


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


# --- operations -----------------------------------------------------------------------------------


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


# --- bad input: a clear status, and the server goes on -------------------------------------------

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


# --- servers of their own: load shedding, draining, device choice, start-up errors ---------------


# A server that holds a lone call in its queue for 4 s (a partial batch waiting for company), with
# room for two: calls are in the queue, deterministically, while a test looks.
HOLD_US = 4_000_000


@pytest.fixture(scope="module")
def holding_server(trained_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("holding") / "server.log"
    with start_server(
        trained_repository,
        "--workers",
        "1",
        "--max-queue-delay-us",
        str(HOLD_US),
        "--max-queue-size",
        "2",
        log_path=log,
    ) as running:
        yield running


def call_in_background(
    target: str, images: np.ndarray, timeout: float = 30, together: threading.Barrier | None = None
):
    """Start one Classify call on its own thread; returns a function that waits for its outcome.

    The channel connects first (and the callers sharing `together` wait for each other), so on a
    busy machine the calls still reach the queue within the hold, not a connection set-up apart.
    """
    outcome: dict[str, object] = {}

    def call():
        with ClassifierClient(target, timeout=timeout) as c:
            c.wait_until_ready(30)
            if together is not None:
                together.wait(30)
            try:
                outcome["labels"] = c.classify(images).labels.tolist()
            except grpc.RpcError as err:
                outcome["error"] = (err.code(), err.details())

    thread = threading.Thread(target=call)
    thread.start()

    def result():
        thread.join(60)
        assert not thread.is_alive(), "the call never returned"
        return outcome

    return result


def test_a_full_queue_answers_resource_exhausted_and_the_queued_are_served(
    holding_server, mnist_test_set, reference
):
    images, _ = mnist_test_set
    server = holding_server
    shed_before = metric(server, "mnist_dropped_requests_total", 0.0, reason="queue_full")
    together = threading.Barrier(2)
    held = [call_in_background(server.target, images[i : i + 1], together=together) for i in (0, 1)]
    wait_for(lambda: metric(server, "mnist_queue_depth") == 2, 30, "two calls held in the queue")
    with ClassifierClient(server.target, timeout=30) as c:
        error = rpc_error(lambda: c.classify(images[2:3]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        "the request queue is full (2 requests waiting); retry with backoff" in error.details()
    ), error.details()
    assert metric(server, "mnist_dropped_requests_total", reason="queue_full") == shed_before + 1
    expected = reference(images[:2]).argmax(axis=1).tolist()
    assert [outcome()["labels"] for outcome in held] == [[expected[0]], [expected[1]]]


def test_calls_that_expire_while_queued_are_dropped_not_computed(holding_server, mnist_test_set):
    images, _ = mnist_test_set
    server = holding_server
    images_before, batches_before = (
        metric(server, "mnist_images_total"),
        metric(server, "mnist_batch_size_count"),
    )
    cancelled_before = metric(server, "mnist_dropped_requests_total", 0.0, reason="cancelled")
    expired_before = metric(server, "mnist_dropped_requests_total", 0.0, reason="deadline")

    # gRPC: the caller's deadline (1.5 s) ends the call while it waits in the queue (4 s). The client's
    # own DEADLINE_EXCEEDED, and gRPC cancels the call on the server, which drops it unrun.
    outcome = call_in_background(server.target, images[:1], timeout=1.5)
    wait_for(lambda: metric(server, "mnist_queue_depth") == 1, 30, "the call held in the queue")
    assert outcome()["error"] == (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    wait_for(
        lambda: (
            metric(server, "mnist_dropped_requests_total", 0.0, reason="cancelled")
            == cancelled_before + 1
        ),
        30,
        "the cancelled call dropped from the queue",
    )

    # REST: the request's own `timeout` (µs) is the server's deadline: its own 504, with its own words.
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [1, 784],
                    "data": images[0].ravel().tolist(),
                }
            ],
            "parameters": {"timeout": 1_500_000},
        }
    ).encode()
    request = urllib.request.Request(
        f"{server.http_url}/v2/models/mnist/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 504
    assert "the deadline passed while the request was queued" in caught.value.read().decode()
    assert metric(server, "mnist_dropped_requests_total", reason="deadline") == expired_before + 1

    # Neither was ever computed: the model saw no image and ran no batch.
    assert metric(server, "mnist_images_total") == images_before
    assert metric(server, "mnist_batch_size_count") == batches_before
    with ClassifierClient(server.target) as c:
        assert c.classify(images[:64]).labels.shape == (64,)  # a full batch runs at once


def _serve_and_fail(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "--port",
            str(free_port()),
            "--metrics-port",
            "0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def has_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except OSError:
        return False


def test_device_auto_falls_back_to_the_cpu_and_says_why(server):
    if has_gpu():
        pytest.skip("a GPU is present: test_device_cuda covers this machine")
    log = server.log()
    assert "fell back to the CPU" in log and "CPUExecutionProvider" in log


def test_device_cuda_without_a_gpu_stops_with_a_clear_error(trained_repository):
    if has_gpu():
        pytest.skip("this machine has a GPU: test_device_cuda_serves_on_the_gpu runs instead")
    result = _serve_and_fail("--model-repository", str(trained_repository), "--device", "cuda")
    assert result.returncode == 1
    assert "--device cuda:" in result.stderr and "Traceback" not in result.stderr


def test_device_cuda_serves_on_the_gpu(trained_repository, mnist_test_set, reference, tmp_path):
    if not has_gpu():
        pytest.skip("no NVIDIA GPU on this machine (the CPU fallback is tested instead)")
    images, _ = mnist_test_set
    with start_server(
        trained_repository, "--device", "cuda", log_path=tmp_path / "gpu.log"
    ) as server:
        with ClassifierClient(server.target) as c:
            assert c.describe().execution_provider == "CUDAExecutionProvider"
            np.testing.assert_allclose(
                c.classify(images[:64]).probabilities, reference(images[:64]), atol=1e-4
            )


def test_start_up_errors_are_one_line(trained_repository, tmp_path):
    missing = _serve_and_fail("--model-repository", str(tmp_path / "empty"))
    assert missing.returncode == 1 and "run `mnist-train" in missing.stderr
    # Besides the log line of the configuration, one error line and no traceback.
    assert (
        missing.stderr.strip()
        .splitlines()[-1]
        .startswith("mnist-serve: error: no versions of model")
    )
    assert "Traceback" not in missing.stderr
    unknown = _serve_and_fail(
        "--model-repository", str(trained_repository), "--model-version", "42"
    )
    assert unknown.returncode == 1 and "no version 42" in unknown.stderr
    bad_flag = _serve_and_fail(
        "--model-repository", str(trained_repository), "--max-batch-size", "0"
    )
    assert bad_flag.returncode == 2 and "--max-batch-size" in bad_flag.stderr


def test_taken_ports_are_one_clear_line(server, trained_repository):
    grpc_taken = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "--model-repository",
            str(trained_repository),
            "--host",
            "127.0.0.1",
            "--port",
            str(server.port),
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert grpc_taken.returncode == 1 and "Traceback" not in grpc_taken.stderr
    assert (
        grpc_taken.stderr.strip()
        .splitlines()[-1]
        .startswith(f"mnist-serve: error: cannot listen on 127.0.0.1:{server.port}")
    )
    metrics_taken = _serve_and_fail(
        "--model-repository",
        str(trained_repository),
        "--host",
        "127.0.0.1",
        "--metrics-port",
        str(server.metrics_port),
    )
    assert metrics_taken.returncode == 1 and "Traceback" not in metrics_taken.stderr
    assert "choose another --metrics-port" in metrics_taken.stderr.strip().splitlines()[-1]


def test_a_tampered_model_file_is_refused(trained_repository, tmp_path):
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(trained_repository, copy)
    model = copy / "mnist" / "1" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-10] + bytes(10))
    result = _serve_and_fail("--model-repository", str(copy))
    assert result.returncode == 1 and "does not match metadata.json" in result.stderr


def test_flags_and_environment_configure_the_server(
    trained_repository, mnist_test_set, reference, tmp_path
):
    import shutil

    images, _ = mnist_test_set
    # The same model published under another name, for --model-name.
    repository = tmp_path / "repo"
    shutil.copytree(trained_repository / "mnist", repository / "digits")
    config = repository / "digits" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "mnist"', 'name: "digits"'))
    environment = {
        "MNIST_SERVE_MAX_BATCH_SIZE": "16",
        "MNIST_SERVE_MAX_QUEUE_DELAY_US": "250",
        "MNIST_SERVE_MAX_QUEUE_SIZE": "3",
        "MNIST_SERVE_GRAPH_OPTIMIZATION": "extended",
    }
    with start_server(
        repository,
        "--model-name",
        "digits",
        "--max-queue-size",
        "7",  # the command line wins
        "--graph-optimization",
        "basic",
        "--intra-op-threads",
        "2",
        "--inter-op-threads",
        "1",
        "--multi-thread-min-batch",
        "8",
        "--warmup-runs",
        "5",
        "--max-message-bytes",
        "65536",
        "--workers",
        "1",
        "--metrics-port",
        "0",
        log_path=tmp_path / "flags.log",
        env=environment,
    ) as server:
        with pytest.raises(
            urllib.error.URLError
        ):  # --metrics-port 0: no Prometheus endpoint at all
            urllib.request.urlopen(server.metrics_url, timeout=5)
        with ClassifierClient(server.target) as c:
            description = c.describe()
            assert (description.model_name, description.max_batch_size) == ("digits", 16)
            # 16 images: the two-thread session; 2 images: the one-thread one. Both compute what onnxruntime does.
            for count in (16, 2):
                np.testing.assert_allclose(
                    c.classify(images[:count]).probabilities, reference(images[:count]), atol=1e-5
                )
            # --max-message-bytes 65536: 16 float images (50 kB) pass, 32 (100 kB) are refused.
            floats = images[:32].astype(np.float32) / 255
            assert c.classify(floats[:16]).labels.shape == (16,)
            error = rpc_error(lambda: c.classify(floats[:32]))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert (
                rpc_error(lambda: c.classify(images[:1], model_name="mnist")).code()
                == grpc.StatusCode.NOT_FOUND
            )
    log = server.log()
    for setting in (
        "max_batch_size=16",
        "max_queue_delay_us=250",
        "max_queue_size=7",
        "graph_optimization=basic",
        "intra_op_threads=2",
        "warmup_runs=5",
        "max_message_bytes=65536",
    ):
        assert setting in log, setting
    assert "batches under 8 images on 1 thread, larger on 2" in log
    assert "metrics on :off" in log


FLAGS_TO_ONNXRUNTIME = """
import onnxruntime as ort
from serving.config import load_config
from serving.inference.runtime import _session_options
from serving.server import registry_options

config = load_config(["--graph-optimization", "disable", "--intra-op-threads", "3", "--inter-op-threads", "2",
                      "--warmup-runs", "9"], environ={"MNIST_SERVE_INTRA_OP_THREADS": "5"})
runtime = registry_options(config).runtime
assert (runtime.intra_op_threads, runtime.inter_op_threads, runtime.warmup_runs) == (3, 2, 9), runtime
settings = _session_options(runtime)
assert settings.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
assert (settings.intra_op_num_threads, settings.inter_op_num_threads) == (3, 2)
for flag, level in (("basic", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
                    ("extended", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
                    ("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)):
    options = registry_options(load_config(["--graph-optimization", flag], environ={})).runtime
    assert _session_options(options).graph_optimization_level == level, flag
print("flags reach onnxruntime")
"""


def test_graph_optimization_and_threads_reach_onnxruntime():
    """The flags' path from the command line to onnxruntime's session options (in a child interpreter:
    serving.server loads the project's KServe stubs, which clash with tritonclient's in this one)."""
    result = subprocess.run(
        [sys.executable, "-c", FLAGS_TO_ONNXRUNTIME],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0 and "flags reach onnxruntime" in result.stdout, result.stderr[
        -3000:
    ]
