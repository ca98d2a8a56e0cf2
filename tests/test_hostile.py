"""Hostile callers against the real server: one caller must not stall, bloat or confuse the server.

Each of issue 14's four defects has a test here (heavy decoding on the event loop, unbounded
error messages, large malformed requests that keep memory, typed contents beside raw ones),
plus the minor ones: malformed protobuf, Pillow's object reprs, float32 values printed exactly.
"""

from __future__ import annotations

import io
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from PIL import Image, ImageDraw

from serving.client import ClassifierClient
from serving.generated import mnist_classifier_pb2 as pb
from serving.memory import rss_bytes
from serving.process import start_server

MESSAGE_LIMIT = 512  # bytes: the bound every error message keeps (serving.inference.errors)
BIG_SIDE = 4096
BUDGET = 4 * BIG_SIDE * BIG_SIDE  # the server below admits four 4096x4096 images per call


@pytest.fixture(scope="module")
def hostile_server(trained_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    # One worker: the log and the RSS below are one process's.
    with start_server(
        trained_repository,
        "--max-decoded-pixels",
        str(BUDGET),
        "--max-batch-size",
        "64",
        "--workers",
        "1",
        log_path=log,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A 4096x4096 RGBA PNG of a '1' (about 75 KB: far under the message limit, 64 MB once decoded)."""
    image = Image.new("RGBA", (BIG_SIDE, BIG_SIDE), (255, 255, 255, 255))
    ImageDraw.Draw(image).line([(2048, 600), (2048, 3500)], fill=(0, 0, 0, 255), width=300)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def metric(server, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def server_rss(server) -> int:
    return rss_bytes(server.proc.pid)


def model_infer(server, request, timeout: float = 30):
    from tritonclient.grpc import service_pb2_grpc

    options = [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20),
    ]
    with grpc.insecure_channel(server.target, options=options) as channel:
        return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=timeout
        )


def infer_request(
    shape=(1, 28, 28, 1),
    datatype="UINT8",
    raw: bytes | None = bytes(784),
    name="images",
    model="mnist",
    version="",
):
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request


def assert_bounded(error: grpc.RpcError, code: grpc.StatusCode, *, cut: bool = True) -> None:
    """The right code, a message within the bound, and (for huge client strings) a visible cut."""
    details = error.details() or ""
    assert error.code() == code, f"{error.code()}: {details[:300]}"
    assert len(details.encode()) <= MESSAGE_LIMIT, len(details.encode())
    if cut:
        assert "[cut," in details, details


# --- defect 1: heavy decoding stalled every caller ------------------------------------------------


def test_a_heavy_decoding_call_does_not_stall_other_callers(
    hostile_server, big_png, mnist_test_set
):
    """Four 4096x4096 PNGs take seconds to decode; meanwhile other callers are answered."""
    images, _ = mnist_test_set
    heavy_request = pb.ClassifyRequest(images=[pb.Image(encoded=big_png)] * 4)
    with (
        ClassifierClient(hostile_server.target, timeout=120) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        heavy = pool.submit(lambda: client._classifier.Classify(heavy_request, timeout=120))
        time.sleep(0.3)  # let the heavy call reach the server
        answered_meanwhile = 0
        for index in range(5):
            client.classify(images[index : index + 1])
            answered_meanwhile += not heavy.done()
        assert answered_meanwhile == 5, "ordinary calls waited for the heavy call's decoding"
        assert len(heavy.result().predictions) == 4


def test_a_call_over_the_pixel_budget_is_refused_from_the_headers(hostile_server, big_png):
    request = pb.ClassifyRequest(images=[pb.Image(encoded=big_png)] * 64)
    with ClassifierClient(hostile_server.target, timeout=60) as client:
        error = rpc_error(lambda: client._classifier.Classify(request, timeout=60))
    assert_bounded(error, grpc.StatusCode.INVALID_ARGUMENT, cut=False)
    assert "--max-decoded-pixels" in error.details() and f"{BUDGET:,}" in error.details(), (
        error.details()
    )


# --- defect 2: error messages echoed client input without a bound ---------------------------------

HUGE = "x" * (1 << 20)


@pytest.mark.parametrize("field", ["model", "version"])
def test_a_huge_model_name_or_version_gets_not_found_with_a_bounded_message(hostile_server, field):
    kwargs = {"model": HUGE} if field == "model" else {"version": HUGE}
    assert_bounded(
        rpc_error(lambda: model_infer(hostile_server, infer_request(**kwargs))),
        grpc.StatusCode.NOT_FOUND,
    )
    request = pb.ClassifyRequest(
        images=[pb.Image(raw_pixels=bytes(784))],
        **({"model_name": HUGE} if field == "model" else {"model_version": HUGE}),
    )
    with ClassifierClient(hostile_server.target) as client:
        assert_bounded(
            rpc_error(lambda: client._classifier.Classify(request, timeout=30)),
            grpc.StatusCode.NOT_FOUND,
        )


@pytest.mark.parametrize("case", ["input name", "datatype", "100,000 dims", "output name"])
def test_huge_tensor_fields_get_invalid_argument_with_a_bounded_message(hostile_server, case):
    request = {
        "input name": lambda: infer_request(name=HUGE),
        "datatype": lambda: infer_request(datatype=HUGE),
        "100,000 dims": lambda: infer_request(shape=[7] * 100_000),
    }.get(case, infer_request)()
    if case == "output name":
        request.outputs.add(name=HUGE)
    assert_bounded(
        rpc_error(lambda: model_infer(hostile_server, request)), grpc.StatusCode.INVALID_ARGUMENT
    )


# --- defect 3: large malformed requests bloated the process and kept it bloated --------------------


def test_large_bad_requests_leave_memory_where_it_was(hostile_server, mnist_test_set):
    """Three 15 MB requests whose shape has 15 million dims: refused cheaply, memory back at once."""
    request = infer_request(shape=[3] * 15_000_000)
    with ClassifierClient(hostile_server.target) as client:
        for _ in range(20):
            client.classify(mnist_test_set[0][:8])
    # One large request first: gRPC's and the allocator's first-time growth for a 15 MB message is
    # not what is measured here; what a burst leaves behind is (it was 1.8 GB for three before).
    rpc_error(lambda: model_infer(hostile_server, request, timeout=60))
    time.sleep(2.0)
    baseline = server_rss(hostile_server)
    for _ in range(3):
        assert_bounded(
            rpc_error(lambda: model_infer(hostile_server, request, timeout=60)),
            grpc.StatusCode.INVALID_ARGUMENT,
            cut=False,
        )
    deadline = time.monotonic() + 5.0
    while (after := server_rss(hostile_server)) > 1.10 * baseline and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after <= 1.10 * baseline, f"RSS {baseline / 2**20:.0f} MiB -> {after / 2**20:.0f} MiB"


# --- defect 4: typed contents beside raw contents were accepted ------------------------------------

TYPED_FIELDS = {
    "bool_contents": [True],
    "int_contents": [1],
    "int64_contents": [1],
    "uint_contents": [1],
    "uint64_contents": [1],
    "fp32_contents": [0.5],
    "fp64_contents": [0.5],
    "bytes_contents": [b"x"],
}


@pytest.mark.parametrize("field", sorted(TYPED_FIELDS))
def test_typed_contents_beside_raw_contents_are_refused(hostile_server, field):
    request = infer_request()
    getattr(request.inputs[0].contents, field).extend(TYPED_FIELDS[field])
    error = rpc_error(lambda: model_infer(hostile_server, request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field in error.details(), error.details()


def test_typed_contents_of_another_type_are_refused(hostile_server):
    request = infer_request(datatype="UINT8", raw=None)
    request.inputs[0].contents.int_contents.extend([0] * 784)
    error = rpc_error(lambda: model_infer(hostile_server, request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "int_contents" in error.details(), (
        error.details()
    )


# --- minor: malformed protobuf, Pillow's reprs, float32 values ------------------------------------


@pytest.mark.parametrize(
    "method", ["/inference.GRPCInferenceService/ModelInfer", "/mnist.v1.Classifier/Classify"]
)
def test_malformed_protobuf_is_invalid_argument_counted_and_logged_once(hostile_server, method):
    short = method.rsplit("/", 1)[-1]
    before = metric(hostile_server, "mnist_requests_total", method=short, code="INVALID_ARGUMENT")
    with grpc.insecure_channel(hostile_server.target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        for _ in range(20):
            error = rpc_error(lambda: call(b"\x0a\xff\xff\xff\xff\x0f", timeout=10))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert len(error.details()) < 200 and "protobuf" in error.details(), error.details()
    after = metric(hostile_server, "mnist_requests_total", method=short, code="INVALID_ARGUMENT")
    assert after - before == 20
    assert (
        hostile_server.log().count("malformed") == 1
    )  # once per interval, whichever method came first
    assert "Traceback" not in hostile_server.log()


@pytest.mark.parametrize("cut", [200, 16])
def test_a_broken_png_is_described_without_object_reprs(hostile_server, big_png, cut):
    broken = big_png[:cut] + b"junk" * 8  # 16: the signature and half a header
    with ClassifierClient(hostile_server.target) as client:
        error = rpc_error(lambda: client.classify_encoded([broken]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert " at 0x" not in error.details() and "<_io" not in error.details(), error.details()
    assert "PNG" in error.details()


def test_an_out_of_range_float_is_printed_exactly(hostile_server):
    values = [0.0] * 784
    values[5] = 1.0000001
    with ClassifierClient(hostile_server.target) as client:
        error = rpc_error(
            lambda: client._classify([pb.Image(float_pixels=pb.FloatPixels(values=values))], "", "")
        )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1.0000001 " in error.details(), error.details()
