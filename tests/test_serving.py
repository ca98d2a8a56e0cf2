"""The real server over loopback: both APIs, tritonclient, health, reflection, batching, bad input."""
from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from serving.client import ClassifierClient
from serving.generated import mnist_classifier_pb2 as pb
from serving.process import free_port, start_server
from core.repository import load_version
from tests.conftest import ROOT

# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(trained_repository):
    """In-process onnxruntime on the same model file: what the server must answer."""
    session = ort.InferenceSession(str(load_version(trained_repository, "mnist").model_path),
                                   providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": (images.astype(np.float32) / 255)[..., None]})[0]


@pytest.fixture()
def client(server):
    with ClassifierClient(server.target, timeout=20) as c:
        yield c


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def metric(server, name: str, **labels) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    assert wanted is not None
    return total


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
        sheet = Image.fromarray(255 - image).resize((120, 160), Image.LANCZOS)  # dark ink on white paper
        canvas = Image.new("L", (300, 260), 255)
        canvas.paste(sheet, (40, 50))
        buffer = io.BytesIO()
        canvas.convert("RGB").save(buffer, format="JPEG", quality=90)
        hits += int(client.classify_encoded([buffer.getvalue()]).labels[0] == label)
    assert hits >= 16


def test_describe_model(client, trained_repository):
    meta = load_version(trained_repository, "mnist").metadata
    description = client.describe()
    assert description.model_name == "mnist" and description.model_version == "1"
    assert list(description.class_names) == [str(i) for i in range(10)]
    assert list(description.input_shape) == [-1, 28, 28, 1] and description.max_batch_size == 64
    assert description.test_accuracy == pytest.approx(meta.test_accuracy)
    assert description.model_sha256 == meta.model_sha256
    assert description.execution_provider == "CPUExecutionProvider"


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
    return triton.infer(model, [tensor], model_version=version,
                        outputs=[grpcclient.InferRequestedOutput("probabilities")])


def test_tritonclient_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("mnist") and triton.is_model_ready("mnist", "1")
    assert not triton.is_model_ready("fashion") and not triton.is_model_ready("mnist", "2")
    assert triton.get_server_metadata().name == "mnist-serve"
    meta = triton.get_model_metadata("mnist")
    assert meta.platform == "onnxruntime_onnx" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("images", "FP32", [-1, 28, 28, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("probabilities", "FP32", [-1, 10])]


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
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert response.id == "req-7" and not response.raw_output_contents
    got = np.array(response.outputs[0].contents.fp32_contents, dtype=np.float32).reshape(4, 10)
    np.testing.assert_allclose(got, reference(images[:4]), atol=1e-5)


# --- operations -----------------------------------------------------------------------------------


def test_health_reports_serving_for_the_server_and_each_api(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "mnist.v1.Classifier", "inference.GRPCInferenceService"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"mnist.v1.Classifier", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        descriptor = database.FindFileContainingSymbol("mnist.v1.Classifier")
        assert descriptor.package == "mnist.v1"


def test_health_probe_cli(server):
    ok = subprocess.run([sys.executable, "-m", "serving.health_probe", "--target", server.target],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    down = subprocess.run([sys.executable, "-m", "serving.health_probe", "--target", f"127.0.0.1:{free_port()}",
                           "--timeout", "0.5"], capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "unhealthy" in down.stdout


def test_64_concurrent_clients_are_batched_and_all_correct(server, mnist_test_set, reference):
    images, _ = mnist_test_set
    batches_before = metric(server, "mnist_batch_size_count")
    singles_before = metric(server, "mnist_batch_size_bucket", le="1.0")
    expected = reference(images[:640]).argmax(axis=1)
    barrier = threading.Barrier(64)

    def caller(worker: int) -> list[int]:
        with ClassifierClient(server.target, timeout=30) as c:
            c.describe()  # connect first, so the calls below arrive together
            barrier.wait()
            return [int(c.classify(images[i: i + 1]).labels[0]) for i in range(worker * 10, worker * 10 + 10)]

    with ThreadPoolExecutor(64) as pool:
        answers = sum(pool.map(caller, range(64)), [])
    assert answers == expected.tolist()
    batches = metric(server, "mnist_batch_size_count") - batches_before
    multi = batches - (metric(server, "mnist_batch_size_bucket", le="1.0") - singles_before)
    assert multi >= 1, "under 64 concurrent callers some batch must hold more than one image"
    assert batches < 640, "640 single-image calls must have been coalesced into fewer batches"


def test_metrics_expose_the_promised_series(server, client, mnist_test_set):
    client.classify(mnist_test_set[0][:2])
    assert metric(server, "mnist_requests_total", method="Classify", code="OK") >= 1
    for name in ("mnist_request_latency_seconds_count", "mnist_queue_wait_seconds_count",
                 "mnist_inference_seconds_count", "mnist_images_total"):
        assert metric(server, name) >= 1, name
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    assert "mnist_queue_depth" in text
    assert 'mnist_model_info{model="mnist",provider="CPUExecutionProvider",version="1"} 1.0' in text


def test_mnist_predict_cli(server, mnist_path):
    result = subprocess.run([sys.executable, "-m", "serving.predict_cli", "--target", server.target,
                             "--mnist-test", "200", "--data-dir", str(mnist_path), "--quiet"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    correct = int(re.search(r"accuracy: (\d+)/200", result.stdout).group(1))
    assert correct >= 180
    dead = subprocess.run([sys.executable, "-m", "serving.predict_cli", "--target", f"127.0.0.1:{free_port()}",
                           "--mnist-test", "5", "--data-dir", str(mnist_path), "--timeout", "1"],
                          capture_output=True, text=True, timeout=60)
    assert dead.returncode == 1 and len(dead.stderr.strip().splitlines()) == 1 and "UNAVAILABLE" in dead.stderr


# --- bad input: a clear status, and the server goes on -------------------------------------------

BAD_CLASSIFY = [
    ("short raw", pb.ClassifyRequest(images=[pb.Image(raw_pixels=bytes(783))]),
     grpc.StatusCode.INVALID_ARGUMENT, "783 bytes"),
    ("NaN", pb.ClassifyRequest(images=[pb.Image(float_pixels=pb.FloatPixels(values=[float("nan")] * 784))]),
     grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    ("Inf", pb.ClassifyRequest(images=[pb.Image(float_pixels=pb.FloatPixels(values=[float("inf")] * 784))]),
     grpc.StatusCode.INVALID_ARGUMENT, "Inf"),
    ("out of range", pb.ClassifyRequest(images=[pb.Image(float_pixels=pb.FloatPixels(values=[255.0] * 784))]),
     grpc.StatusCode.INVALID_ARGUMENT, "[0, 1]"),
    ("empty", pb.ClassifyRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no images"),
    ("too many", pb.ClassifyRequest(images=[pb.Image(raw_pixels=bytes(784))] * 65),
     grpc.StatusCode.INVALID_ARGUMENT, "the limit is 64"),
    ("undecodable", pb.ClassifyRequest(images=[pb.Image(encoded=b"\x89PNG\r\n\x1a\nnot really")]),
     grpc.StatusCode.INVALID_ARGUMENT, "could not be decoded"),
    ("unset image", pb.ClassifyRequest(images=[pb.Image()]), grpc.StatusCode.INVALID_ARGUMENT, "image 0"),
    ("unknown model", pb.ClassifyRequest(images=[pb.Image(raw_pixels=bytes(784))], model_name="resnet"),
     grpc.StatusCode.NOT_FOUND, "unknown model 'resnet'"),
    ("unknown version", pb.ClassifyRequest(images=[pb.Image(raw_pixels=bytes(784))], model_version="9"),
     grpc.StatusCode.NOT_FOUND, "version '9'"),
]


@pytest.mark.parametrize("case,request_message,code,message", BAD_CLASSIFY, ids=[c[0] for c in BAD_CLASSIFY])
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


def _raw_kserve(server, datatype: str, shape: list[int], raw: bytes, model: str = "mnist", version: str = ""):
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="images", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    with grpc.insecure_channel(server.target) as channel:
        return rpc_error(lambda: service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10))


BAD_KSERVE = [
    ("wrong shape", "FP32", [1, 27, 28, 1], bytes(4 * 27 * 28), "mnist", "", grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    ("wrong datatype", "INT32", [1, 28, 28, 1], bytes(4 * 784), "mnist", "", grpc.StatusCode.INVALID_ARGUMENT, "INT32"),
    ("wrong raw length", "FP32", [1, 28, 28, 1], bytes(4 * 784 - 1), "mnist", "", grpc.StatusCode.INVALID_ARGUMENT,
     "3135 bytes"),
    ("NaN", "FP32", [1, 28, 28, 1], np.full(784, np.nan, "<f4").tobytes(), "mnist", "",
     grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    ("empty batch", "FP32", [0, 28, 28, 1], b"", "mnist", "", grpc.StatusCode.INVALID_ARGUMENT, ""),
    ("over the limit", "UINT8", [65, 28, 28, 1], bytes(65 * 784), "mnist", "", grpc.StatusCode.INVALID_ARGUMENT, "64"),
    ("unknown model", "UINT8", [1, 28, 28, 1], bytes(784), "resnet", "", grpc.StatusCode.NOT_FOUND, "resnet"),
    ("unknown version", "UINT8", [1, 28, 28, 1], bytes(784), "mnist", "3", grpc.StatusCode.NOT_FOUND, "'3'"),
]


@pytest.mark.parametrize("case,datatype,shape,raw,model,version,code,message", BAD_KSERVE,
                         ids=[c[0] for c in BAD_KSERVE])
def test_bad_kserve_requests(server, triton, mnist_test_set, case, datatype, shape, raw, model, version, code, message):
    error = _raw_kserve(server, datatype, shape, raw, model, version)
    assert error.code() == code and message in error.details(), error.details()
    assert triton_infer(triton, mnist_test_set[0][:1, ..., None], "UINT8").as_numpy("probabilities").shape == (1, 10)


# --- servers of their own: load shedding, draining, device choice, start-up errors ---------------


def test_a_full_queue_answers_resource_exhausted_and_the_rest_are_served(trained_repository, mnist_test_set, tmp_path):
    images, _ = mnist_test_set
    with start_server(trained_repository, "--max-queue-size", "2", "--max-batch-size", "64",
                      log_path=tmp_path / "server.log") as server:
        def call(_):
            with ClassifierClient(server.target, timeout=30) as c:
                try:
                    return int(c.classify(images[:64]).labels[0])
                except grpc.RpcError as err:
                    return err.code()

        with ThreadPoolExecutor(48) as pool:
            outcomes = list(pool.map(call, range(96)))
    shed = [o for o in outcomes if o == grpc.StatusCode.RESOURCE_EXHAUSTED]
    served = [o for o in outcomes if isinstance(o, int)]
    assert shed and served and len(shed) + len(served) == len(outcomes)
    assert set(served) == {int(np.argmax(np.bincount(served)))}  # all served answers agree


def test_calls_that_expire_while_queued_are_dropped_not_computed(trained_repository, mnist_test_set, tmp_path):
    images, _ = mnist_test_set
    # One worker: the heavy calls must fill the very queue the hasty ones wait in.
    with start_server(trained_repository, "--workers", "1", log_path=tmp_path / "server.log") as server:
        def heavy(_):  # keeps the queue busy with 64-image batches
            with ClassifierClient(server.target, timeout=30) as c:
                return sum(len(c.classify(images[:64]).labels) for _ in range(8))

        def hasty(_):  # one image with a deadline shorter than the wait
            with ClassifierClient(server.target, timeout=0.002) as c:
                try:
                    return len(c.classify(images[:1]).labels)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
                    return 0

        with ThreadPoolExecutor(24) as pool:
            heavy_calls = [pool.submit(heavy, i) for i in range(8)]
            hasty_answered = sum(pool.map(hasty, range(64)))
            heavy_images = sum(call.result() for call in heavy_calls)
        computed = metric(server, "mnist_images_total")
        dropped = metric(server, "mnist_dropped_requests_total")
        assert dropped >= 1 and hasty_answered < 64
        # What was dropped was never run: the model saw fewer images than were asked of it.
        assert computed < heavy_images + 64
        with ClassifierClient(server.target) as c:
            assert c.classify(images[:4]).labels.shape == (4,)


def test_sigterm_during_load_loses_no_accepted_call(trained_repository, mnist_test_set, reference, tmp_path):
    images, _ = mnist_test_set
    expected = reference(images[:32]).argmax(axis=1).tolist()
    server = start_server(trained_repository, "--grace-period", "10", log_path=tmp_path / "server.log")
    outcomes: list[object] = []
    lock = threading.Lock()
    stop = threading.Event()

    def caller():
        with ClassifierClient(server.target, timeout=20) as c:
            while not stop.is_set():
                try:
                    labels = c.classify(images[:32]).labels.tolist()
                    outcome = "ok" if labels == expected else f"wrong answer {labels}"
                except grpc.RpcError as err:
                    outcome = err.code()
                with lock:
                    outcomes.append(outcome)
                if outcome != "ok":
                    return

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for thread in threads:
        thread.start()
    while len(outcomes) < 50:
        threading.Event().wait(0.05)
    server.proc.send_signal(signal.SIGTERM)
    exit_code = server.proc.wait(30)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert exit_code == 0, server.log()
    assert outcomes.count("ok") >= 50
    # Every call either completed correctly or was refused before it was accepted (UNAVAILABLE).
    assert set(outcomes) <= {"ok", grpc.StatusCode.UNAVAILABLE}, set(map(str, outcomes))
    assert "draining" in server.log()


def _serve_and_fail(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", "--port", str(free_port()),
                           "--metrics-port", "0", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


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
    with start_server(trained_repository, "--device", "cuda", log_path=tmp_path / "gpu.log") as server:
        with ClassifierClient(server.target) as c:
            assert c.describe().execution_provider == "CUDAExecutionProvider"
            np.testing.assert_allclose(c.classify(images[:64]).probabilities, reference(images[:64]), atol=1e-4)


def test_start_up_errors_are_one_line(trained_repository, tmp_path):
    missing = _serve_and_fail("--model-repository", str(tmp_path / "empty"))
    assert missing.returncode == 1 and "run `mnist-train" in missing.stderr
    # Besides the log line of the configuration, one error line and no traceback.
    assert missing.stderr.strip().splitlines()[-1].startswith("mnist-serve: error: no versions of model")
    assert "Traceback" not in missing.stderr
    unknown = _serve_and_fail("--model-repository", str(trained_repository), "--model-version", "42")
    assert unknown.returncode == 1 and "no version 42" in unknown.stderr
    bad_flag = _serve_and_fail("--model-repository", str(trained_repository), "--max-batch-size", "0")
    assert bad_flag.returncode == 2 and "--max-batch-size" in bad_flag.stderr


def test_taken_ports_are_one_clear_line(server, trained_repository):
    grpc_taken = subprocess.run([sys.executable, "-m", "serving.cli", "--model-repository", str(trained_repository),
                                 "--host", "127.0.0.1", "--port", str(server.port), "--metrics-port", "0"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert grpc_taken.returncode == 1 and "Traceback" not in grpc_taken.stderr
    assert grpc_taken.stderr.strip().splitlines()[-1].startswith(f"mnist-serve: error: cannot listen on 127.0.0.1:{server.port}")
    metrics_taken = _serve_and_fail("--model-repository", str(trained_repository), "--host", "127.0.0.1",
                                    "--metrics-port", str(server.metrics_port))
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


def test_environment_variables_configure_the_server(trained_repository, tmp_path):
    with start_server(trained_repository, log_path=tmp_path / "env.log",
                      env={"MNIST_SERVE_MAX_BATCH_SIZE": "16", "MNIST_SERVE_MAX_QUEUE_DELAY_US": "250"}) as server:
        with ClassifierClient(server.target) as c:
            assert c.describe().max_batch_size == 16
    assert "max_batch_size=16" in server.log() and "max_queue_delay_us=250" in server.log()
