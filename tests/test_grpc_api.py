"""The gRPC transport in-process: a grpc.aio server on a free loopback port inside the test.

The servicers run with the real model core (onnxruntime on the session's trained model, the
real batcher) and the server's own wrapping of each method (metrics, error mapping), so a call
takes milliseconds and an error mapping can be checked without starting a process. The KServe
stubs clash with tritonclient's (which other tests import into this process), so what needs them
runs in a child interpreter.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from core.contract import to_model_input
from core.repository import load_version
from serving.generated import mnist_classifier_pb2 as pb
from serving.generated import mnist_classifier_pb2_grpc as pb_grpc
from serving.grpc_api.classifier import ClassifierServicer
from serving.grpc_api.handlers import WrappingRegistrar, server_wrap
from serving.inference.batcher import DynamicBatcher
from serving.inference.runtime import OnnxRuntimeSession, RuntimeOptions
from serving.inference.served_model import ServedModel
from serving.process import free_port
from tests.support.common import ROOT


@pytest.fixture(scope="module")
def runtime(trained_repository) -> OnnxRuntimeSession:
    version = load_version(trained_repository, "mnist")
    return OnnxRuntimeSession(str(version.model_path), RuntimeOptions(device="cpu", warmup_runs=1))


def serve_classifier(
    trained_repository, runtime, scenario, *, start_batcher: bool = True, max_queue_size: int = 1024
):
    """Run `scenario(stub, batcher)` against an in-process Classifier server, then stop it."""

    async def main():
        batcher = DynamicBatcher(runtime.run, max_batch_size=64, max_queue_size=max_queue_size)
        model = ServedModel(
            load_version(trained_repository, "mnist"), runtime.provider, 64, batcher
        )
        server = grpc.aio.server()
        pb_grpc.add_ClassifierServicer_to_server(
            ClassifierServicer(model), WrappingRegistrar(server, server_wrap())
        )
        port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
        await server.start()
        if start_batcher:
            batcher.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await scenario(pb_grpc.ClassifierStub(channel), batcher)
        finally:
            if start_batcher:
                await batcher.close()
            await server.stop(0)

    return asyncio.run(main())


def raw_request(images: np.ndarray, **fields) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        images=[pb.Image(raw_pixels=image.tobytes()) for image in images], **fields
    )


async def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details()


# --- in-process calls ------------------------------------------------------------------------


def test_classify_in_process_answers_what_onnxruntime_computes(
    trained_repository, runtime, mnist_test_set
):
    images, _ = mnist_test_set

    async def scenario(stub, _batcher):
        return await stub.Classify(raw_request(images[:32]), timeout=10)

    response = serve_classifier(trained_repository, runtime, scenario)
    expected = runtime.run(to_model_input(images[:32]))
    assert [p.label for p in response.predictions] == expected.argmax(axis=1).tolist()
    assert np.allclose([p.probabilities for p in response.predictions], expected, atol=1e-6)
    assert response.model_version == "1"


def test_domain_errors_reach_the_caller_as_status_codes(
    trained_repository, runtime, mnist_test_set
):
    images, _ = mnist_test_set

    async def scenario(stub, batcher):
        found = {
            "model": await status_of(
                stub.Classify(raw_request(images[:1], model_name="resnet"), timeout=10)
            ),
            "version": await status_of(
                stub.DescribeModel(pb.DescribeModelRequest(model_version="7"), timeout=10)
            ),
            "input": await status_of(
                stub.Classify(pb.ClassifyRequest(images=[pb.Image(raw_pixels=b"1234")]), timeout=10)
            ),
        }
        await batcher.close()  # what drain does first: new predictions are refused
        found["closed"] = await status_of(stub.Classify(raw_request(images[:1]), timeout=10))
        return found

    # An unknown model's call is counted under no model (model="", version=""): none answered it.
    not_found = {"method": "Classify", "code": "NOT_FOUND", "model": "", "version": ""}
    before = REGISTRY.get_sample_value("mnist_requests_total", not_found) or 0
    found = serve_classifier(trained_repository, runtime, scenario)
    assert found["model"] == (
        grpc.StatusCode.NOT_FOUND,
        "unknown model 'resnet'; this server serves 'mnist'",
    )
    assert (
        found["version"][0] == grpc.StatusCode.NOT_FOUND
        and "version '7' is not served" in found["version"][1]
    )
    assert found["input"] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "image 0: raw_pixels holds 4 bytes; expected 784 (28x28 uint8, row-major)",
    )
    assert (
        found["closed"][0] == grpc.StatusCode.UNAVAILABLE and "shutting down" in found["closed"][1]
    )
    # The metrics wrap the error mapping, so they count the mapped code.
    after = REGISTRY.get_sample_value("mnist_requests_total", not_found)
    assert after == before + 1


def test_a_full_queue_is_resource_exhausted(trained_repository, runtime, mnist_test_set):
    images, _ = mnist_test_set
    batch = to_model_input(images[:1])

    async def scenario(stub, batcher):
        # The batcher is not started, so a request queued directly stays there and fills the queue.
        waiting = asyncio.ensure_future(batcher.submit(batch))
        await asyncio.sleep(0)
        try:
            return await status_of(stub.Classify(raw_request(images[:1]), timeout=10))
        finally:
            waiting.cancel()

    code, details = serve_classifier(
        trained_repository, runtime, scenario, start_batcher=False, max_queue_size=1
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in details


# --- the Server object, in a child interpreter (it loads the KServe stubs) ----------------------

SERVER_LIFECYCLE = """
import asyncio, sys
import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving.config import ServeConfig
from serving.generated import grpc_predict_v2_pb2 as kserve, grpc_predict_v2_pb2_grpc as kserve_grpc
from serving.generated import mnist_classifier_pb2 as pb, mnist_classifier_pb2_grpc as pb_grpc
from serving.process import free_port
from serving.server import Readiness, Server

async def main():
    server = Server(ServeConfig(model_repository=sys.argv[1], host="127.0.0.1", port=free_port(),
                                metrics_port=0, device="cpu", warmup_runs=1, grace_period=2.0))
    assert server.readiness is Readiness.STARTING and not server.is_ready()
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        ready = kserve_grpc.GRPCInferenceServiceStub(channel)
        classify = pb_grpc.ClassifierStub(channel)
        image = pb.Image(raw_pixels=bytes(784))
        serving = health_pb2.HealthCheckResponse.SERVING
        assert server.readiness is Readiness.SERVING
        assert (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == serving
        assert (await ready.ServerReady(kserve.ServerReadyRequest())).ready
        assert len((await classify.Classify(pb.ClassifyRequest(images=[image]))).predictions) == 1
        await server.drain()
        assert server.readiness is Readiness.DRAINING
        for name in ("", "mnist.v1.Classifier", "inference.GRPCInferenceService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING, name
        assert not (await ready.ServerReady(kserve.ServerReadyRequest())).ready
        assert not (await ready.ModelReady(kserve.ModelReadyRequest(name="mnist"))).ready
        try:
            await classify.Classify(pb.ClassifyRequest(images=[image]))
            raise AssertionError("a draining server answered a prediction")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    await server.stop()
    assert server.readiness is Readiness.STOPPED
    print("lifecycle ok")

asyncio.run(main())
"""


def test_server_object_reports_one_readiness_through_health_and_kserve(trained_repository):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SERVER_LIFECYCLE), str(trained_repository)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0 and "lifecycle ok" in result.stdout, result.stdout + result.stderr
